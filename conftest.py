"""pytest's root configuration (`--doctest-modules keras_preact` collects the package).

The trainers' entry modules define their absl flags when imported, and absl flags are
global to a process: collecting all three in one process would define `--model` three
times. They hold no doctests; their behaviour is tested by running them.
"""

collect_ignore = [
    "keras_preact/train/cifar.py",
    "keras_preact/train/imagenet.py",
    "keras_preact/train/evaluate.py",
]
