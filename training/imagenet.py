"""`python training/imagenet.py ...` runs `python -m keras_preact.train.imagenet ...` (docs/training.md)."""

from keras_preact.train import imagenet

imagenet.define_flags()  # where the program starts: `--help` lists them
if __name__ == "__main__":
    imagenet.run_main()
