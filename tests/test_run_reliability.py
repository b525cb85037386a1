"""Training runs that stop loudly and lose nothing: divergence, two trainers on one folder,
a resume with changed options, SIGTERM and Ctrl-C (docs/reliability.md).

The in-process tests use a tiny compiled model (every backend, a few seconds). The signal
tests run a real trainer and signal it: the `fit` loop under TensorFlow, the JAX loop under
JAX (the code they test does not depend on the backend otherwise).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from trainer_runs import REPO, fake_cifar, small_cnn

from keras_preact.data import numpy_pipeline
from keras_preact.train import callbacks, checkpoints, config, resume


def _compiled():
    keras.utils.set_random_seed(0)
    model = small_cnn()
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 6, 6, 2)).astype("float32"), np.arange(16) % 2


class _Overflow(keras.callbacks.Callback):
    """Makes a kernel infinite at the end of epoch `at` (1-based), as an exploding run's
    weights overflow while each batch loss it reported was still finite."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.at:
            kernel = self.model.get_layer("fc").kernel
            kernel.assign(np.full(kernel.shape, np.inf, "float32"))


def test_divergence_stops_the_run_and_keeps_the_finite_checkpoints(tmp_path):
    model, (x, y) = _compiled(), _data()
    checkpointer = checkpoints.Checkpointer(str(tmp_path))
    cbs = [_Overflow(at=3), *callbacks.epoch_callbacks(checkpointer)]
    with pytest.raises(callbacks.Diverged, match=r"epoch 3: .*1 of \d+ weight tensors"):
        model.fit(x, y, batch_size=8, epochs=4, callbacks=cbs, verbose=0)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch-0001", "epoch-0002"]
    assert len(checkpointer.history()["loss"]) == 2


def test_non_finite_metrics_stop_the_run(tmp_path):
    model = _compiled()
    with pytest.raises(callbacks.Diverged, match=r"epoch 5: val_loss=nan not finite"):
        callbacks.check_finite(model, {"loss": 5.5e23, "val_loss": float("nan")}, 5)
    callbacks.check_finite(model, {"loss": 5.5e23, "val_loss": 1.0}, 5)  # finite: allowed


def test_a_second_trainer_on_a_folder_is_refused_naming_the_first(tmp_path):
    held = resume.lock(str(tmp_path))
    with pytest.raises(resume.RunLocked, match=rf"pid {os.getpid()} on .* another --model_dir"):
        resume.lock(str(tmp_path))
    held.close()  # the holder ends (as a killed process's lock is dropped by the kernel)
    resume.lock(str(tmp_path)).close()  # its leftover file is taken over


def test_a_read_only_folder_gives_one_clear_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(checkpoints.WriteError, match=r"--model_dir=.*run: Read-only file system"):
        resume.lock(str(tmp_path / "run"))


def _cfg(**values):
    base = dict(model="PreActResNet20", dataset="fashion_mnist", batch_size=16, epochs=2)
    return config.CifarConfig.from_values({**base, **values}, explicit=set(values) | set(base))


def _recorded_run(tmp_path, **values):
    """A run folder with a checkpoint and the config.json of `_cfg(**values)`."""
    os.makedirs(tmp_path / "checkpoints" / "epoch-0001")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(_cfg(**values).derive(steps_per_epoch=10).record(), f)
    return str(tmp_path)


def test_a_resume_with_another_net_is_refused_before_anything_is_written(tmp_path):
    model_dir = _recorded_run(tmp_path)
    before = (tmp_path / "config.json").read_bytes()
    for change in ({"model": "PreActResNet32"}, {"unit": "original"}):
        cfg = _cfg(**change, allow_changes=["all"]).derive(steps_per_epoch=10)
        name = next(iter(change))
        with pytest.raises(resume.ResumeRefused, match=rf"--{name}: .* new --model_dir"):
            resume.check(cfg, model_dir)
    assert (tmp_path / "config.json").read_bytes() == before


def test_a_resume_that_changes_the_run_needs_allow_changes_and_is_recorded(tmp_path):
    model_dir = _recorded_run(tmp_path)
    changed = _cfg(batch_size=32).derive(steps_per_epoch=5)
    with pytest.raises(resume.ResumeRefused, match=r"--batch_size: 16 -> 32.*--allow_changes="):
        resume.check(changed, model_dir)
    allowed = _cfg(batch_size=32, allow_changes=["batch_size"]).derive(steps_per_epoch=5)
    found = resume.check(allowed, model_dir)
    assert found["batch_size"] == (16, 32)
    assert resume.history(model_dir, found)[-1]["changed"]["batch_size"] == {"from": 16, "to": 32}
    # Harmless: more epochs (a step schedule), verbosity.
    assert set(resume.check(_cfg(epochs=5, verbose=2).derive(steps_per_epoch=10), model_dir)) >= {
        "epochs",
        "verbose",
    }
    # A cosine schedule stretched by more epochs: allowed, its new length recorded.
    model_dir = _recorded_run(tmp_path / "cosine", lr_schedule="cosine")
    found = resume.check(_cfg(lr_schedule="cosine", epochs=5).derive(steps_per_epoch=10), model_dir)
    assert found["total_steps"] == (20, 50)


def test_a_mid_epoch_checkpoint_resumes_the_same_batches(tmp_path):
    model = _compiled()
    x = np.zeros((40, 6, 6, 2), np.uint8)
    stream = numpy_pipeline.ArrayDataset(x, np.arange(40) % 2, 4, [0.5], [0.5], training=True)
    stream.epoch = 1
    uninterrupted = [stream[i][0] for i in range(len(stream))]
    checkpointer = checkpoints.Checkpointer(str(tmp_path), data=stream)
    checkpointer.save(model, epoch=1, logs={"loss": 1.0})
    checkpointer.save(model, epoch=1, logs={}, step=3)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch-0001", "epoch-0001-step-000003"]
    resumed = numpy_pipeline.ArrayDataset(x, np.arange(40) % 2, 4, [0.5], [0.5], training=True)
    restored = checkpoints.Checkpointer(str(tmp_path), data=resumed).restore(_compiled())
    assert (restored.epoch, restored.step) == (1, 3)
    assert len(resumed) == len(stream) - 3
    for i in range(len(resumed)):
        np.testing.assert_array_equal(resumed[i][0], uninterrupted[3 + i])


def _trainer(model_dir, data_dir, loop, *extra):
    return [
        sys.executable,
        "-m",
        "keras_preact.train.cifar",
        "--dataset=cifar10",
        "--source=files",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        f"--loop={loop}",
        "--model=PreActResNet20",
        "--batch_size=16",
        "--steps_per_epoch=30",
        "--epochs=2",  # Keras prints "Epoch 1/N" only for N > 1
        "--verbose=2",
        *extra,
    ]


def _signalled(cmd, signum):
    """Runs `cmd` and sends it `signum` once its first epoch has begun."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # see "Epoch 1/" as it is printed
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Epoch 1/"):
            time.sleep(1.0)
            proc.send_signal(signum)
    proc.wait(timeout=300)
    return proc.returncode, "".join(lines)


@pytest.mark.parametrize(
    "loop, backend, signum",
    [("fit", "tensorflow", signal.SIGTERM), ("jax", "jax", signal.SIGINT)],
)
def test_a_signal_saves_at_a_step_and_the_run_resumes(tmp_path, loop, backend, signum):
    if keras.backend.backend() != backend:
        pytest.skip(f"the {loop} loop's signal test runs under KERAS_BACKEND={backend}")
    data_dir, model_dir = fake_cifar(tmp_path / "data"), str(tmp_path / "run")
    cmd = _trainer(model_dir, data_dir, loop)
    code, out = _signalled(cmd, signum)
    assert code == 128 + signum, out[-3000:]
    assert "Traceback" not in out and "Resume with the same command" in out, out[-3000:]
    assert "cuInit" not in out  # no CUDA error on a machine without a GPU
    saved = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
    assert "-step-" in saved[-1], saved  # the newest is the step the signal stopped at
    # A changed option that changes the run is refused, and config.json is left as it was.
    before = open(os.path.join(model_dir, "config.json"), "rb").read()
    refused = subprocess.run(
        [*cmd, "--seed=1"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 5, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "--seed: 0 -> 1" in refused.stderr and "Traceback" not in refused.stderr
    assert open(os.path.join(model_dir, "config.json"), "rb").read() == before
    # The same command resumes at the saved step and finishes the epoch.
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    epoch, step = int(saved[-1].split("-")[1]), int(saved[-1].rsplit("-", 1)[1])
    assert done.stdout.count("Resuming from") == 1
    steps = epoch * 30 + step
    assert f"and {step} step(s) of the next done, optimizer step {steps}," in done.stdout
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    assert summary["steps"] == 60 and summary["epochs_run"] == 2
