"""`--loop=jax` (keras_preact/train/jax_loop.py) against `model.fit`, and the trainer options
that every loop shares: `--time_budget`, `--scan_units`, resume from the same checkpoint files.

The JAX loop needs KERAS_BACKEND=jax; the runs here are `training/cifar.py` processes on a
tiny CIFAR-format data set (tests/trainer_runs.py), so they run in the suite's JAX pass.
"""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from trainer_runs import REPO, cifar_cmd, fake_cifar, run

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="--loop=jax runs on the JAX backend"
)

#: 64 training images at batch 16: 4 steps per epoch; the 16 test images score every epoch.
SHORT = ["--lr_schedule=cosine", "--warmup_steps=2", "--base_lr=0.05", "--pipeline=numpy"]


def _log(model_dir):
    with open(os.path.join(model_dir, "log.csv"), newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _summary(model_dir):
    with open(os.path.join(model_dir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.mark.slow
def test_jax_loop_matches_fit_and_each_resumes_the_others_checkpoint(data, tmp_path):
    """Same seed, same data order and schedule: the two loops' first epoch agrees, and a
    checkpoint written by one loop resumes under the other to the same step count."""
    dirs = {loop: str(tmp_path / loop) for loop in ("fit", "jax")}
    for loop, d in dirs.items():
        run(cifar_cmd(data, d, *SHORT, "--epochs=1", f"--loop={loop}"))
    fit, jax = _log(dirs["fit"])[0], _log(dirs["jax"])[0]
    for key in ("loss", "val_loss", "lr"):
        np.testing.assert_allclose(jax[key], fit[key], rtol=2e-3, err_msg=key)
    for key in ("top1", "val_top1"):
        assert abs(jax[key] - fit[key]) <= 1 / 16 + 1e-9, key  # at most one image apart
    # Each loop resumes the other's checkpoint: epoch 2 under the other loop.
    other = {"fit": "jax", "jax": "fit"}
    for loop, d in dirs.items():
        out = run(cifar_cmd(data, d, *SHORT, "--epochs=2", f"--loop={other[loop]}"))
        assert "1 epoch(s) done, optimizer step 4" in out.stdout + out.stderr
        assert _summary(d)["steps"] == 8 and _summary(d)["loop"] == other[loop]
        assert [r["epoch"] for r in _log(d)] == [0, 1]
    a, b = _log(dirs["fit"])[1], _log(dirs["jax"])[1]
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=5e-3)


@pytest.mark.slow
def test_time_budget_stops_at_a_step_and_the_same_command_resumes(data, tmp_path):
    """A spent `--time_budget` stops after the first step (a process always trains one) with
    a checkpoint at that step and a resume hint; the command without the budget (here
    through `python -m`) resumes at that step and ends at the step count of two epochs."""
    d = str(tmp_path / "run")
    cmd = cifar_cmd(data, d, *SHORT, "--epochs=2", "--loop=jax")
    out = run([*cmd, "--time_budget=1"])
    text = out.stdout + out.stderr
    assert "Stopped by --time_budget=1 s at step 1 of epoch 1 (" in text
    assert "Resume with the same command:" in text and "--time_budget=1" in text
    assert sorted(os.listdir(os.path.join(d, "checkpoints", "epoch-0000-step-000001"))) == [
        "model.weights.h5",
        "state.json",
    ]
    assert not os.path.exists(os.path.join(d, "summary.json"))  # not finished
    cmd[1:2] = ["-m", "keras_preact.train.cifar"]  # `python -m`: the same trainer
    out = run(cmd)
    assert "0 epoch(s) and 1 step(s) of the next done, optimizer step 1" in out.stdout
    summary = _summary(d)
    assert (summary["steps"], summary["epochs_run"], summary["resumed_from_epoch"]) == (8, 2, 0)
    assert [r["epoch"] for r in _log(d)] == [0, 1]
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["loop"] == "jax"


@pytest.mark.slow
def test_scanned_net_trains_resumes_and_exports_a_written_out_net(data, tmp_path):
    import keras_preact
    from keras_preact.train import optimization

    d = str(tmp_path / "scan")
    base = [*SHORT, "--scan_units", "--loop=jax"]
    run(cifar_cmd(data, d, *base, "--epochs=1"))
    out = run(cifar_cmd(data, d, *base, "--epochs=2"))
    assert "1 epoch(s) done, optimizer step 4" in out.stdout + out.stderr
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    assert config["scan_units"] is True
    # The same weights are decayed as in the written-out net.
    plain = keras_preact.PreActResNet20(input_shape=(32, 32, 3), classes=10)
    decayed = optimization.decayed_variables(plain)
    assert config["decayed_weights"] == sum(int(keras.ops.size(v)) for v in decayed)
    # final.weights.h5 loads into a written-out PreActResNet20 (scan_units=False).
    net = keras_preact.PreActResNet20(
        input_shape=(32, 32, 3),
        classes=10,
        classifier_activation=None,
        include_preprocessing=True,
        preprocessing=(tuple(config["mean"]), tuple(config["std"])),
    )
    net.load_weights(os.path.join(d, "final.weights.h5"))
    # evaluate.py rebuilds the run from config.json and scores its final weights exactly
    # as the trainer's last evaluation did.
    result = tmp_path / "eval.json"
    run(
        [
            sys.executable,
            "training/evaluate.py",
            f"--weights={d}/final.weights.h5",
            "--dataset=cifar10",
            "--source=files",
            f"--data_dir={data}",
            f"--output={result}",
        ]
    )
    scored = json.loads(result.read_text())
    summary = _summary(d)
    assert scored["examples"] == 16
    assert scored["top1"] == pytest.approx(summary["test_top1"], abs=1e-6)


def test_jax_loop_is_refused_on_another_backend_at_parsing(data, tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    cmd = cifar_cmd(data, str(tmp_path / "x"), "--loop=jax", "--epochs=1")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "--loop=jax (the jitted JAX step loop) needs KERAS_BACKEND=jax" in out.stderr
    assert "Traceback" not in out.stderr


def test_eval_batches_divide_over_the_replicas():
    """The evaluation batch was a fixed 500, which 8 replicas cannot share evenly
    (`tfdata.per_replica_batch` raised under `--loop=custom` on 8 replicas)."""
    from keras_preact.train import distribution

    assert [distribution.eval_batch_size(None, r) for r in (1, 2, 3, 8)] == [500, 500, 498, 496]
    assert distribution.eval_batch_size(64, 8) == 64
