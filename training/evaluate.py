"""`python training/evaluate.py ...` runs `python -m keras_preact.train.evaluate ...` (docs/training.md)."""

from keras_preact.train import evaluate

evaluate.define_flags()  # where the program starts: `--help` lists them
if __name__ == "__main__":
    evaluate.run_main()
