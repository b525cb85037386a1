"""`python training/evaluate.py`: the evaluate evaluation of keras_preact, `keras_preact.train.evaluate`.

The same program as `python -m keras_preact.train.evaluate` from an installed package; its
flags, examples and docs are in `keras_preact/train/evaluate.py` and docs/training.md.
"""

from absl import flags

from keras_preact.train import evaluate
from keras_preact.train.evaluate import run_main

flags.adopt_module_key_flags(evaluate)  # `--help` lists the trainer's flags

if __name__ == "__main__":
    run_main()
