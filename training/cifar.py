"""`python training/cifar.py ...` runs `python -m keras_preact.train.cifar ...` (docs/training.md)."""

from keras_preact.train import cifar

cifar.define_flags()  # where the program starts: `--help` lists them
if __name__ == "__main__":
    cifar.run_main()
