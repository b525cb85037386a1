"""Fine-tuning options: the backbone's learning-rate fraction, frozen stages and BatchNorm,
and a new head for another data set's classes."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from model_test_utils import REPO

import keras_preact
from keras_preact.train import modeling, optimization


def _net():
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, name="conv2_block1_1_conv")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="predictions")(x))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_backbone_steps_by_its_fraction_of_the_learning_rate(momentum):
    deltas = {}
    for scale in (1.0, 0.1):
        model = _net()
        model.set_weights([np.ones(w.shape, "float32") for w in model.get_weights()])
        opt = optimization.ScaledSGD(0.5, momentum=momentum, backbone_lr_scale=scale)
        grads = [keras.ops.ones(v.shape) for v in model.trainable_variables]
        for _ in range(2):
            opt.apply(grads, model.trainable_variables)
        deltas[scale] = [1.0 - np.asarray(w) for w in model.get_weights()]
    body = slice(0, 2)  # kernel and bias of the backbone layer; the head's come after
    for plain, scaled in zip(deltas[1.0][body], deltas[0.1][body]):
        np.testing.assert_allclose(scaled, 0.1 * plain, rtol=1e-6)
    for plain, scaled in zip(deltas[1.0][2:], deltas[0.1][2:]):
        np.testing.assert_allclose(scaled, plain, rtol=1e-6)
    assert keras.optimizers.deserialize(keras.optimizers.serialize(opt)).backbone_lr_scale == 0.1


def test_freezing_stages_and_batchnorm_leaves_the_head_and_the_rest_trainable():
    model = keras_preact.PreActResNet20(input_shape=(8, 8, 1), classes=3)
    frozen = modeling.fine_tune(model, freeze_stages=1, freeze_batchnorm=True)
    trainable = {layer.name for layer in model.layers if layer.weights and layer.trainable}
    assert {"conv1_conv", "conv2_block3_2_conv", "conv3_block1_preact_bn", "post_bn"} <= set(frozen)
    assert "conv3_block1_1_conv" in trainable and "predictions" in trainable
    assert not any(name.endswith("_bn") for name in trainable)
    probe = keras_preact.PreActResNet20(input_shape=(8, 8, 1), classes=3)
    modeling.fine_tune(probe, freeze_stages=9)  # more stages than the net: a linear probe
    assert [v.path.split("/")[0] for v in probe.trainable_variables] == ["predictions"] * 2


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="backend-independent; run once, under jax"
)
def test_a_fine_tuning_run_keeps_what_it_froze(tmp_path):
    """cifar.py from the fashion_mnist record onto other 28x28 data: frozen layers end where
    the record has them, BatchNorm statistics included; the rest and the head move."""
    from keras_preact.data import idx

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for prefix, n in (("train", 64), ("t10k", 16)):
        idx.write_idx(data / f"{prefix}-images-idx3-ubyte.gz",
                      rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))  # fmt: skip
        idx.write_idx(
            data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8)
        )
    model_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "training/cifar.py", "--dataset=fashion_mnist", "--source=files",
         f"--data_dir={data}", "--model=PreActResNet20", "--weights=fashion_mnist",
         "--freeze_stages=1", "--freeze_batchnorm", "--backbone_lr_scale=0.5", "--epochs=1",
         "--steps_per_epoch=3", "--batch_size=16", "--eval_examples=16", "--verbose=0",
         "--base_lr=0.01", "--lr_schedule=constant",
         f"--model_dir={model_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "KERAS_BACKEND": "jax"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads((model_dir / "config.json").read_text())
    assert (cfg["freeze_stages"], cfg["freeze_batchnorm"], cfg["backbone_lr_scale"]) == (
        1,
        True,
        0.5,
    )
    record = keras_preact.get_model("PreActResNet20", weights="fashion_mnist")
    tuned = keras_preact.get_model("PreActResNet20", input_shape=(28, 28, 1), classes=10)
    tuned.load_weights(model_dir / "final.weights.h5")

    def same(name):
        return all(np.array_equal(a, b) for a, b in zip(
            tuned.get_layer(name).get_weights(), record.get_layer(name).get_weights()))  # fmt: skip

    assert same("conv1_conv") and same("conv2_block2_2_conv")  # frozen stages
    assert same("conv3_block2_preact_bn") and same("post_bn")  # frozen BatchNorm, statistics too
    assert not same("conv3_block2_1_conv") and not same("conv4_block1_1_conv")
    assert not same("predictions")
