"""`python training/imagenet.py`: the imagenet trainer of keras_preact, `keras_preact.train.imagenet`.

The same program as `python -m keras_preact.train.imagenet` from an installed package; its
flags, examples and docs are in `keras_preact/train/imagenet.py` and docs/training.md.
"""

from absl import flags

from keras_preact.train import imagenet
from keras_preact.train.imagenet import run_main

flags.adopt_module_key_flags(imagenet)  # `--help` lists the trainer's flags

if __name__ == "__main__":
    run_main()
