"""`python training/evaluate.py ...` runs `python -m keras_preact.train.evaluate ...` (docs/training.md)."""

from absl import flags

from keras_preact.train import evaluate

flags.adopt_module_key_flags(evaluate)  # `--help` lists its flags
if __name__ == "__main__":
    evaluate.run_main()
