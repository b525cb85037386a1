"""training/cifar.py end to end, and the trainer's pieces in training/common.py."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from training import common  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"


def _fake_cifar(root):
    from keras_preact.data import cifar_files

    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64))
    test = (rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 16))
    cifar_files.write_cifar("cifar10", str(root), train, test)
    return str(root)


def _cifar_cmd(data_dir, model_dir, *extra):
    return [
        sys.executable,
        "training/cifar.py",
        "--dataset=cifar10",
        "--source=files",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        "--batch_size=16",
        "--lr_schedule=constant",
        "--base_lr=0.02",
        "--verbose=2",
        *extra,
    ]


def test_schedule_paper_cifar_and_cosine():
    paper = common.WarmupSchedule(
        0.1,
        64000,
        decay="step",
        boundaries=[32000, 48000],
        warmup_steps=400,
        warmup="constant",
        warmup_lr=0.01,
    )
    got = [float(paper(s)) for s in (0, 399, 400, 31999, 32000, 48000, 63999)]
    np.testing.assert_allclose(got, [0.01, 0.01, 0.1, 0.1, 0.01, 0.001, 0.001], rtol=1e-6)
    cosine = common.WarmupSchedule(0.2, 1000, decay="cosine", warmup_steps=100)
    np.testing.assert_allclose(float(cosine(49)), 0.1, rtol=1e-6)  # linear warm-up
    np.testing.assert_allclose(float(cosine(550)), 0.1, rtol=1e-5)  # half-way
    assert float(cosine(1000)) < 1e-7
    restored = common.WarmupSchedule.from_config(cosine.get_config())
    assert float(restored(300)) == float(cosine(300))
    with pytest.raises(ValueError, match="linear"):
        common.WarmupSchedule(0.1, 10, decay="linear")


def test_weight_decay_on_kernels_only():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(x))
    assert common.add_weight_decay(model, 1e-4) == 2
    kernels = [model.get_layer("conv").kernel, model.get_layer("fc").kernel]
    expected = sum(
        0.5e-4 * float(np.sum(np.square(keras.ops.convert_to_numpy(k)))) for k in kernels
    )
    np.testing.assert_allclose(
        float(sum(keras.ops.convert_to_numpy(v) for v in model.losses)), expected, rtol=1e-5
    )
    assert common.add_weight_decay(model, 1e-4, on="all") == 6
    with pytest.raises(ValueError, match="biases"):
        common.add_weight_decay(model, 1e-4, on="biases")


def test_nan_guard_stops_loudly():
    with pytest.raises(FloatingPointError, match="nan"):
        common.NaNGuard().on_train_batch_end(3, {"loss": float("nan")})
    common.NaNGuard().on_train_batch_end(3, {"loss": 1.0})


def test_atomic_weights_and_json(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = str(tmp_path / "w.weights.h5")
    common.save_weights_atomic(model, path)
    common.write_json_atomic(str(tmp_path / "s.json"), {"epoch": 1})
    assert sorted(os.listdir(tmp_path)) == ["s.json", "w.weights.h5"]


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """A run killed with SIGKILL mid-training resumes from its last epoch and finishes."""
    data = _fake_cifar(tmp_path / "data")
    model_dir = tmp_path / "run"
    cmd = _cifar_cmd(data, model_dir, "--epochs=10", "--steps_per_epoch=2")
    state = model_dir / "checkpoints" / "latest.json"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and json.loads(state.read_text())["epoch"] >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert 2 <= killed_at < 10
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "Resuming from" in rerun.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["resumed_from_epoch"] >= killed_at
    assert summary["steps"] == 20  # no step lost or repeated across the kill
    assert summary["epochs_run"] == 10 - summary["resumed_from_epoch"]
    assert (model_dir / "final.weights.h5").exists()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["batch_size"] == 16 and config["strategy"] == "default"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_smoke_real_fashion_mnist(tmp_path):
    """A few hundred steps on the real Fashion-MNIST: the loss falls."""
    cmd = [
        sys.executable,
        "training/cifar.py",
        "--dataset=fashion_mnist",
        "--source=files",
        f"--data_dir={FMNIST}",
        f"--model_dir={tmp_path}",
        "--batch_size=64",
        "--epochs=3",
        "--steps_per_epoch=100",
        "--lr_schedule=cosine",
        "--warmup_steps=30",
        "--eval_examples=2000",
        "--verbose=2",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    losses = summary["train_loss_per_epoch"]
    assert summary["steps"] == 300
    assert losses[-1] < losses[0] * 0.6, losses
    assert summary["test_top1"] > 0.7, summary
    assert os.path.exists(tmp_path / "log.csv")


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="checks the jax/torch path on a machine without TensorFlow",
)
def test_cifar_trainer_runs_without_tensorflow(tmp_path):
    """jax and torch train in-memory data with TensorFlow made unimportable."""
    data = _fake_cifar(tmp_path / "data")
    argv = _cifar_cmd(data, tmp_path / "run", "--epochs=2", "--steps_per_epoch=2")[1:]
    code = (
        "import runpy, sys\n"
        "sys.modules['tensorflow'] = None\n"
        "sys.modules['tensorboard'] = None\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_path('training/cifar.py', run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["backend"] == keras.backend.backend()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["pipeline"] == "numpy"


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution is JAX's")
def test_jax_data_parallel_two_host_devices(tmp_path):
    """--strategy=mirrored under jax: DataParallel over two (forced) CPU devices."""
    data = _fake_cifar(tmp_path / "data")
    cmd = _cifar_cmd(
        data, tmp_path / "run", "--epochs=1", "--steps_per_epoch=2", "--strategy=mirrored"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["replicas"] == 2 and summary["steps"] == 2
