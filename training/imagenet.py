"""`python training/imagenet.py ...` runs `python -m keras_preact.train.imagenet ...` (docs/training.md)."""

from absl import flags

from keras_preact.train import imagenet

flags.adopt_module_key_flags(imagenet)  # `--help` lists its flags
if __name__ == "__main__":
    imagenet.run_main()
