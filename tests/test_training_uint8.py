"""uint8 batches to the accelerator: the pipelines' `normalize=False` and on-device normalization."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from trainer_runs import REPO

from keras_preact.data import numpy_pipeline
from keras_preact.train import modeling

MEAN, STD = np.array([0.3, 0.5, 0.7], np.float32), np.array([0.2, 0.25, 0.3], np.float32)


def _arrays(n=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, n)


def test_numpy_pipeline_ships_uint8():
    x, y = _arrays()
    for training in (True, False):
        host = numpy_pipeline.ArrayDataset(x, y, 8, MEAN, STD, training=training, seed=3)
        device = numpy_pipeline.ArrayDataset(
            x, y, 8, MEAN, STD, training=training, seed=3, normalize=False
        )
        (xf, yf), (xu, yu) = host[1], device[1]
        assert xf.dtype == np.float32 and xu.dtype == np.uint8
        assert xf.nbytes == 4 * xu.nbytes
        np.testing.assert_array_equal(yf, yu)  # same examples, same augmentation
        np.testing.assert_allclose(numpy_pipeline.normalize(xu, MEAN, STD), xf, rtol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data")
def test_tfdata_array_pipeline_ships_uint8():
    from keras_preact.data import tfdata

    x, y = _arrays()
    kw = dict(
        batch_size=8, training=True, mean=MEAN, std=STD, seed=3, deterministic=True, num_batches=1
    )
    xf, yf = next(iter(tfdata.array_dataset(x, y, **kw)))
    xu, yu = next(iter(tfdata.array_dataset(x, y, normalize=False, **kw)))
    assert xf.dtype == "float32" and xu.dtype == "uint8"
    np.testing.assert_array_equal(yf, yu)
    np.testing.assert_allclose(
        numpy_pipeline.normalize(np.asarray(xu), MEAN, STD), np.asarray(xf), rtol=1e-5, atol=1e-6
    )


def test_on_device_normalization_matches_host_normalization(tmp_path):
    """The trainers' model with `include_preprocessing` fed uint8 gives the logits of the
    same weights fed host-normalized float32; its weights file loads into either."""
    x, _ = _arrays(4)
    keras.utils.set_random_seed(0)
    options = {"unit": "full_preact"}
    common = dict(model="PreActResNet20", input_shape=(8, 8, 3), classes=5)
    on_device = modeling.build_base(options, mean=MEAN, std=STD, **common)
    on_host = modeling.build_base(options, **common)
    path = str(tmp_path / "device.weights.h5")
    on_device.save_weights(path)
    on_host.load_weights(path)
    want = on_host.predict(numpy_pipeline.normalize(x, MEAN, STD), verbose=0)
    got = on_device.predict(x, verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert on_device.layers[1].name == "preprocessing"


@pytest.mark.slow
def test_trainer_trains_alike_on_host_and_device_normalization(tmp_path):
    """`--normalize_on_device` (uint8 batches) and `--nonormalize_on_device` (float32)
    train to the same losses: the normalization only moved."""
    from keras_preact.data import cifar_files

    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64))
    test = (rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 16))
    cifar_files.write_cifar("cifar10", str(tmp_path / "data"), train, test)
    summaries = {}
    for flag in ("--normalize_on_device", "--nonormalize_on_device"):
        model_dir = tmp_path / flag.strip("-")
        cmd = [
            sys.executable,
            "training/cifar.py",
            "--dataset=cifar10",
            "--source=files",
            f"--data_dir={tmp_path / 'data'}",
            f"--model_dir={model_dir}",
            "--batch_size=16",
            "--epochs=1",
            # One step: the two runs' inputs differ by float32 rounding (the device divides by
            # 255 as a multiplication), which BatchNorm at batch 16 amplifies step by step
            # (under JAX on this 2-core machine test losses 1.1e-3 apart after three steps,
            # also on the code before the training core's controller; 5e-6 after one).
            "--steps_per_epoch=1",
            "--pipeline=numpy",
            "--lr_schedule=constant",
            "--base_lr=0.05",
            "--verbose=0",
            # Op by op on every backend: XLA fuses the normalization into the first
            # convolution differently in the two programs (float32 rounding apart by
            # ~4e-4 after three steps under JAX's default jit), which is not what moved.
            "--nojit_compile",
            flag,
        ]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        summaries[flag] = json.loads((model_dir / "summary.json").read_text())
    a, b = summaries.values()
    np.testing.assert_allclose(a["train_loss_per_epoch"], b["train_loss_per_epoch"], rtol=1e-4)
    np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-4)
