"""`training/cifar.py` on the real Fashion-MNIST (Debian's dataset-fashion-mnist): the main job
of the README, shortened to 300 steps. Its own module, so that the test processes can run it
beside the other trainer tests."""

import json
import os
import subprocess
import sys

import keras
import pytest
from trainer_runs import REPO

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the README's main job runs under TensorFlow, Keras' default backend; the other "
    "backends' trainers are tested on small data (test_training_cifar, test_jax_loop)",
)
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
