"""`python training/imagenet.py`: the imagenet trainer of keras_preact, `keras_preact.train.imagenet`.

The same program as `python -m keras_preact.train.imagenet` from an installed package; its
flags, examples and docs are in `keras_preact/train/imagenet.py` and docs/training.md.
"""

from keras_preact.train.imagenet import run_main

if __name__ == "__main__":
    run_main()
