"""`python training/cifar.py ...` runs `python -m keras_preact.train.cifar ...` (docs/training.md)."""

from absl import flags

from keras_preact.train import cifar

flags.adopt_module_key_flags(cifar)  # `--help` lists its flags
if __name__ == "__main__":
    cifar.run_main()
