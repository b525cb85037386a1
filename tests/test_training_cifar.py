"""training/cifar.py end to end: resuming after a kill, on every loop and backend.

The trainer's pieces have their own modules: test_optimization.py, test_callbacks.py,
test_checkpoints.py, test_training_config.py.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from trainer_runs import REPO, cifar_cmd, fake_cifar, run

from keras_preact.train import optimization

LOOPS = [
    "fit",
    pytest.param(
        "custom",
        marks=pytest.mark.skipif(
            keras.backend.backend() != "tensorflow", reason="the custom loop is tf.distribute's"
        ),
    ),
]


def _cifar_cmd(data_dir, model_dir, *extra):
    """A run at a constant learning rate (the flags in `extra` override it)."""
    return cifar_cmd(data_dir, model_dir, "--lr_schedule=constant", "--base_lr=0.02", *extra)


def _log_rows(model_dir):
    with open(os.path.join(model_dir, "log.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("loop", LOOPS)
def test_resume_after_sigkill(tmp_path, loop):
    """A run killed with SIGKILL resumes at its last epoch with the optimizer's step, so the
    learning-rate schedule and the step count continue exactly."""
    data = fake_cifar(tmp_path / "data")
    model_dir = tmp_path / "run"
    epochs, steps = 6, 2
    cmd = _cifar_cmd(
        data,
        model_dir,
        f"--epochs={epochs}",
        f"--steps_per_epoch={steps}",
        f"--loop={loop}",
        "--lr_schedule=cosine",
        "--warmup_steps=5",
        "--base_lr=0.05",
    )

    def saved_epoch():  # the newest committed checkpoint (its state.json is written last)
        found = model_dir.glob("checkpoints/epoch-*/state.json")
        return max((int(p.parent.name[6:]) for p in found), default=0)

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if saved_epoch() >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = saved_epoch()
    assert 2 <= killed_at < epochs
    rerun = run(cmd)
    # The optimizer comes back at the step the checkpoint was written at (not 0).
    resumed_step = killed_at * steps
    assert f"{killed_at} epoch(s) done, optimizer step {resumed_step}," in rerun.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["resumed_from_epoch"] >= killed_at
    assert summary["steps"] == epochs * steps  # no step lost or repeated across the kill
    assert summary["epochs_run"] == epochs  # the whole run, not only the last process
    assert summary["epochs_run_this_process"] == epochs - summary["resumed_from_epoch"]
    # One row per epoch (none lost or repeated across the kill), each with the learning
    # rate of the schedule at the step the epoch ended and the epoch's time (every loop).
    schedule = optimization.WarmupSchedule(0.05, epochs * steps, decay="cosine", warmup_steps=5)
    rows = _log_rows(model_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    for row in rows:
        assert 0 < float(row["epoch_time_s"]) < 300, row
        expected = float(schedule((int(row["epoch"]) + 1) * steps))
        np.testing.assert_allclose(float(row["lr"]), expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(summary["final_lr"], float(schedule(epochs * steps)), atol=1e-8)
    assert (model_dir / "final.weights.h5").exists()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["batch_size"] == 16 and config["strategy"] == "default"
    assert config["loop"] == loop


ALL_LOOPS = [
    # `fit` under TensorFlow and PyTorch (whose trainer draws a first batch before the
    # epoch); under JAX the JAX loop, the backend's own.
    pytest.param("fit", marks=pytest.mark.skipif(keras.backend.backend() == "jax",
                                                 reason="fit runs under tensorflow and torch")),
    pytest.param("custom", marks=pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                                    reason="the custom loop is tf.distribute's")),
    pytest.param("jax", marks=pytest.mark.skipif(keras.backend.backend() != "jax",
                                                 reason="the JAX loop runs under JAX")),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("loop", ALL_LOOPS)
def test_max_steps_then_resume_ends_as_one_run(tmp_path, loop):
    """`--max_steps=3` stops inside epoch 1 with a checkpoint there; the same command without
    it resumes at step 3 and ends with the steps, log rows and weights of an uninterrupted
    run (the batches, the schedule, momentum and the epoch's sums continue exactly)."""
    data = fake_cifar(tmp_path / "data")
    common = ["--epochs=2", "--steps_per_epoch=4", f"--loop={loop}", "--lr_schedule=cosine",
              "--warmup_steps=2", "--deterministic"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(_cifar_cmd(data, straight, *common))
    out = run(_cifar_cmd(data, stopped, *common, "--max_steps=3"))
    summary = json.loads((stopped / "summary.json").read_text())
    assert (summary["steps"], summary["stopped_by"]) == (3, "max_steps"), out.stdout[-2000:]
    assert sorted(os.listdir(stopped / "checkpoints")) == ["epoch-0000-step-000003"]
    out = run(_cifar_cmd(data, stopped, *common))
    assert "0 epoch(s) and 3 step(s) of the next done, optimizer step 3," in out.stdout
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, stopped))
    assert b["steps"] == a["steps"] == 8 and b["epochs_run"] == 2 and b["stopped_by"] is None
    assert [r["epoch"] for r in _log_rows(stopped)] == ["0", "1"]
    np.testing.assert_allclose(b["train_loss_per_epoch"], a["train_loss_per_epoch"], rtol=1e-5)
    np.testing.assert_allclose(b["test_loss"], a["test_loss"], rtol=1e-5)
    x, y = _h5_arrays(straight / "final.weights.h5"), _h5_arrays(stopped / "final.weights.h5")
    assert x.keys() == y.keys() and len(x) > 10
    worst = max(float(np.max(np.abs(x[k] - y[k]))) for k in x)
    assert worst < 1e-5, worst


def _h5_arrays(path):
    import h5py

    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if hasattr(v, "shape") else None)
    return out


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="checks the jax/torch path on a machine without TensorFlow",
)
def test_cifar_trainer_runs_without_tensorflow(tmp_path):
    """jax and torch train in-memory data with TensorFlow made unimportable."""
    data = fake_cifar(tmp_path / "data")
    argv = _cifar_cmd(data, tmp_path / "run", "--epochs=2", "--steps_per_epoch=2")[1:]
    code = (
        "import runpy, sys\n"
        "sys.modules['tensorflow'] = None\n"
        "sys.modules['tensorboard'] = None\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_path('training/cifar.py', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # JAX keeps the run's compiled programs for a resume (--compilation_cache, default on).
    cache = tmp_path / "run" / "jax_cache"
    if keras.backend.backend() == "jax":
        assert len(os.listdir(cache)) > 0
    else:
        assert not cache.exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["backend"] == keras.backend.backend()
    # An unset --jit_compile compiles JAX's train step (Keras' default there), not torch's.
    assert summary["jit_compile"] == (keras.backend.backend() == "jax")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["pipeline"] == "numpy"


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's devices and mesh")
@pytest.mark.parametrize("loop", ["fit", "jax"])
def test_two_host_devices_train_as_one(tmp_path, loop):
    """--strategy=mirrored under jax on two (forced) CPU devices: `fit` through
    keras.distribution.DataParallel, the JAX loop through its own mesh. Each batch is split
    over the devices, BatchNorm sees the global batch: the run ends with one device's
    weights. (Jitted: run op by op, a replicated step's collectives could stall past XLA's
    rendezvous timeout on a loaded machine and abort the process.)"""
    data = fake_cifar(tmp_path / "data")
    finals = {}
    for devices in (1, 2):
        d = tmp_path / f"run{devices}"
        cmd = _cifar_cmd(data, d, "--epochs=1", "--steps_per_epoch=3", "--strategy=mirrored",
                         f"--loop={loop}", "--pipeline=numpy")  # fmt: skip
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        summary = json.loads((d / "summary.json").read_text())
        assert summary["replicas"] == devices and summary["steps"] == 3 and summary["jit_compile"]
        finals[devices] = _h5_arrays(d / "final.weights.h5")
    one, two = finals[1], finals[2]
    worst = max(float(np.max(np.abs(one[k] - two[k]))) for k in one)
    assert worst < 1e-4, worst
