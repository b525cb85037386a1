"""Shared by the trainer tests: a tiny CIFAR-format dataset, `training/cifar.py` runs and a
small CNN for the trainer's pieces."""

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cnn():
    """A conv, a BatchNorm and a dense layer: kernels, a bias, gamma and beta to decay or not,
    and moving statistics."""
    import keras

    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="fc")(x))


def fake_cifar(root):
    """Writes 64 training and 16 test random 32x32 images in CIFAR-10's file format."""
    from keras_preact.data import cifar_files

    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64))
    test = (rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 16))
    cifar_files.write_cifar("cifar10", str(root), train, test)
    return str(root)


def cifar_cmd(data_dir, model_dir, *extra):
    """The command line of a batch-16 `training/cifar.py` run on `fake_cifar` data."""
    return [
        sys.executable,
        "training/cifar.py",
        "--dataset=cifar10",
        "--source=files",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        "--batch_size=16",
        "--verbose=2",
        *extra,
    ]


def run(cmd, timeout=600):
    """Runs `cmd` in the repository root; asserts it succeeds, showing its output's end."""
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out
