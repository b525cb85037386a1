"""A run folder given as a URL (`gs://...` on a cloud machine): every file of a run goes
through `keras_preact.train.fs`, here tested with `file://` URLs, which take TensorFlow's
file-system path across processes: train, SIGKILL, resume (the lease of the killed trainer
expires), evaluate. (`ram://` in one process: test_controller.py; the layer: test_fs.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest
from trainer_runs import REPO, cifar_cmd, fake_cifar, run

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="backend-independent; run once, under jax"
)


@pytest.mark.slow
def test_a_file_url_run_folder_trains_resumes_after_a_kill_and_evaluates(tmp_path):
    data, local = fake_cifar(tmp_path / "data"), tmp_path / "run"
    url = f"file://{local}"
    cmd = cifar_cmd(data, url, "--epochs=3", "--steps_per_epoch=2", "--pipeline=numpy")
    env = dict(os.environ, KERAS_PREACT_LEASE_SECONDS="10")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    committed, deadline = local / "checkpoints" / "epoch-0001" / "state.json", time.time() + 300
    while not committed.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lease = json.loads((local / ".lock").read_text())  # a lease: a URL folder has no flock
    assert lease["pid"] == proc.pid and lease["expires"] > 0
    assert not (local / "jax_cache").exists()  # JAX's cache takes local folders or gs://
    # Until its lease expires, the killed trainer still holds the folder.
    take = f"from keras_preact.train import fs; fs.lock({url!r})"
    refused = subprocess.run([sys.executable, "-c", take], env=env, capture_output=True, text=True)
    if time.time() < lease["expires"]:
        assert f"RunLocked: {url} is in use by another trainer: pid {proc.pid} on" in (
            refused.stderr
        ), refused.stderr[-2000:]
    time.sleep(max(0.0, lease["expires"] - time.time()) + 0.5)
    out = run(cmd)
    assert "Taking over the lock of" in out.stdout and "whose lease expired" in out.stdout
    assert "epoch(s) done, optimizer step" in out.stdout
    summary = json.loads((local / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["epochs_run"] == 3 and summary["model_dir"] == url
    assert (local / "log.csv").read_text().count("\n") == 4  # the header and 3 epochs
    assert not (local / ".lock").exists()  # released at the normal exit
    evaluated = run([sys.executable, "training/evaluate.py", f"--weights={url}/final.weights.h5",
                     "--dataset=cifar10", "--source=files", f"--data_dir={data}"])  # fmt: skip
    result = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    assert result["run_config"] and result["examples"] == 16
    assert abs(result["top1"] - summary["test_top1"]) < 1e-6
