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

    def saved_epoch():  # the newest complete checkpoint (a folder appears whole)
        return max((int(p.name[6:]) for p in model_dir.glob("checkpoints/epoch-*")), default=0)

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


@pytest.mark.slow
def test_resume_continues_momentum_exactly(tmp_path):
    """2 epochs, then the same command resumed to 4, ends with the weights of an
    uninterrupted 4-epoch run: the numpy pipeline replays the same batches and the
    optimizer resumes its step and momentum (a constant rate, so --epochs does not change
    the schedule)."""
    data = fake_cifar(tmp_path / "data")
    common = ["--steps_per_epoch=2", "--pipeline=numpy", "--loop=fit"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(_cifar_cmd(data, straight, "--epochs=4", *common))
    run(_cifar_cmd(data, resumed, "--epochs=2", *common))
    run(_cifar_cmd(data, resumed, "--epochs=4", *common))
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 2 and summary["steps"] == 8
    a = _h5_arrays(straight / "final.weights.h5")
    b = _h5_arrays(resumed / "final.weights.h5")
    assert a.keys() == b.keys() and len(a) > 10
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
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
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution is JAX's")
def test_jax_data_parallel_two_host_devices(tmp_path):
    """--strategy=mirrored under jax: DataParallel over two (forced) CPU devices, the
    train step jitted (run op by op, a replicated step's collectives could stall past XLA's
    rendezvous timeout on a loaded machine and abort the process)."""
    data = fake_cifar(tmp_path / "data")
    cmd = _cifar_cmd(
        data, tmp_path / "run", "--epochs=1", "--steps_per_epoch=2", "--strategy=mirrored"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["replicas"] == 2 and summary["steps"] == 2 and summary["jit_compile"]
