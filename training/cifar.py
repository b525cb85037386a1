"""`python training/cifar.py`: the cifar trainer of keras_preact, `keras_preact.train.cifar`.

The same program as `python -m keras_preact.train.cifar` from an installed package; its
flags, examples and docs are in `keras_preact/train/cifar.py` and docs/training.md.
"""

from absl import flags

from keras_preact.train import cifar
from keras_preact.train.cifar import run_main

flags.adopt_module_key_flags(cifar)  # `--help` lists the trainer's flags

if __name__ == "__main__":
    run_main()
