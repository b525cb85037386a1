"""Training runs that stop loudly and lose nothing: a resume with changed options (the
net, the meaning, the precision, a derived value, the optimizer's shape), SIGTERM and
Ctrl-C (docs/reliability.md). Divergence and the controller's stops: test_controller.py;
two trainers on one folder: test_fs.py.

The signal tests run a real trainer and signal it: the `fit` loop under TensorFlow, the JAX
loop under JAX (the code they test does not depend on the backend otherwise).
"""

import json
import os
import signal
import subprocess
import sys
import time
import types

import keras
import pytest
from trainer_runs import REPO, fake_cifar, run

from keras_preact.train import config, resume

RUN = types.SimpleNamespace(policy="float32")  # what resume.check reads of a `Run`


def _cfg(**values):
    base = dict(model="PreActResNet20", dataset="fashion_mnist", batch_size=16, epochs=2)
    return config.CifarConfig.from_values({**base, **values}, explicit=set(values) | set(base))


def _recorded_run(tmp_path, **values):
    """A run folder with a checkpoint and the config.json of `_cfg(**values)`."""
    os.makedirs(tmp_path / "checkpoints" / "epoch-0001")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(
            {**_cfg(**values).derive(steps_per_epoch=10).record(), "precision_policy": RUN.policy},
            f,
        )
    return str(tmp_path)


def test_a_resume_with_another_net_is_refused_before_anything_is_written(tmp_path):
    model_dir = _recorded_run(tmp_path)
    before = (tmp_path / "config.json").read_bytes()
    for change in ({"model": "PreActResNet32"}, {"unit": "original"}):
        cfg = _cfg(**change, allow_changes=["all"]).derive(steps_per_epoch=10)
        name = next(iter(change))
        with pytest.raises(resume.ResumeRefused, match=rf"--{name}: .* new --model_dir"):
            resume.check(cfg, RUN, model_dir)
    assert (tmp_path / "config.json").read_bytes() == before


def test_a_resume_that_changes_the_run_needs_allow_changes_and_is_recorded(tmp_path):
    model_dir = _recorded_run(tmp_path)
    changed = _cfg(batch_size=32).derive(steps_per_epoch=5)
    with pytest.raises(resume.ResumeRefused, match=r"--batch_size: 16 -> 32.*--allow_changes="):
        resume.check(changed, RUN, model_dir)
    allowed = _cfg(batch_size=32, allow_changes=["batch_size"]).derive(steps_per_epoch=5)
    found = resume.check(allowed, RUN, model_dir)
    assert found["batch_size"] == (16, 32)
    at = types.SimpleNamespace(epoch=1, step=0, iterations=10, state={"epoch": 1})
    assert resume.history(model_dir, found, at)[-1]["changed"]["batch_size"] == {
        "from": 16,
        "to": 32,
    }
    # Harmless: more epochs (a step schedule), verbosity.
    cfg = _cfg(epochs=5, verbose=2).derive(steps_per_epoch=10)
    assert set(resume.check(cfg, RUN, model_dir)) >= {
        "epochs",
        "verbose",
    }
    # A cosine schedule stretched by more epochs: allowed, its new length recorded.
    model_dir = _recorded_run(tmp_path / "cosine", lr_schedule="cosine")
    cfg = _cfg(lr_schedule="cosine", epochs=5).derive(steps_per_epoch=10)
    found = resume.check(cfg, RUN, model_dir)
    assert found["total_steps"] == (20, 50)


def test_a_changed_precision_or_a_derived_value_is_refused(tmp_path):
    """The precision policy (the same --mixed_precision on another kind of machine) and a
    value derived from a harmless option (new --data_dir with other data: other steps per
    epoch) change the run: refused unless named in --allow_changes."""
    model_dir = _recorded_run(tmp_path)
    cfg = _cfg().derive(steps_per_epoch=10)
    bfloat16 = types.SimpleNamespace(policy="mixed_bfloat16")
    with pytest.raises(resume.ResumeRefused, match=r"--precision_policy: 'float32' -> 'mixed_b"):
        resume.check(cfg, bfloat16, model_dir)
    allowed = _cfg(allow_changes=["precision_policy"]).derive(steps_per_epoch=10)
    assert resume.check(allowed, bfloat16, model_dir)["precision_policy"][1] == "mixed_bfloat16"
    moved = _cfg(data_dir="/elsewhere").derive(steps_per_epoch=9)
    with pytest.raises(resume.ResumeRefused, match=r"--steps_per_epoch: 10 -> 9.*total_steps"):
        resume.check(moved, RUN, model_dir)


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="backend-independent; run once, under torch"
)
def test_a_resume_whose_optimizer_does_not_fit_is_refused_until_restarted(tmp_path):
    """Momentum 0 -> 0.9 adds the optimizer's momentum buffers: the resume is refused naming
    why and --restart_optimizer, and config.json keeps no trace of it; with the flag the run
    resumes at its step with the weights kept."""
    data = fake_cifar(tmp_path / "data")
    d = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "keras_preact.train.cifar", "--dataset=cifar10",
           "--source=files", f"--data_dir={data}", f"--model_dir={d}", "--batch_size=16",
           "--steps_per_epoch=2", "--pipeline=numpy", "--verbose=0"]  # fmt: skip
    run([*cmd, "--epochs=1", "--momentum=0"])
    before = open(os.path.join(d, "config.json"), "rb").read()
    more = [*cmd, "--epochs=2", "--momentum=0.9", "--allow_changes=momentum"]
    refused = subprocess.run(more, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 5, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "optimizer state has" in refused.stderr and "--restart_optimizer" in refused.stderr
    assert open(os.path.join(d, "config.json"), "rb").read() == before
    out = run([*more, "--restart_optimizer"])
    assert "1 epoch(s) done, optimizer step 2," in out.stdout
    summary = json.load(open(os.path.join(d, "summary.json")))
    assert summary["steps"] == 4 and summary["epochs_run"] == 2
    resumes = json.load(open(os.path.join(d, "config.json")))["resumes"]
    assert len(resumes) == 1 and set(resumes[0]["changed"]) >= {"momentum", "restart_optimizer"}


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
