"""The paper's propagation argument (Eqns. 5 and 8), measured with `keras_preact.diagnostics`.

`benchmarks/propagation.py` prints the full table for ResNet-110; these tests pin the
qualitative result on nets small enough to be fast.
"""

import numpy as np
import pytest

import keras_preact
from keras_preact import diagnostics, shortcuts

# Initializations feed the thresholds of these tests.
pytestmark = pytest.mark.usefixtures("seeded")


def gradient_norms(batch=4, size=8, unit="full_preact", training=True, **kwargs):
    model = keras_preact.PreActResNet(
        input_shape=(size, size, 3),
        unit=diagnostics.probed_unit(unit, batch),
        classifier_activation=None,
        seed=0,
        **kwargs,
    )
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype("float32")
    y = np.arange(batch) % 10
    return dict(diagnostics.unit_gradient_norms(model, x, y, training=training))


@pytest.mark.parametrize("lam", [1.0, 0.5, 2.0])
def test_eqns_5_and_8_exactly_with_zero_residual_branches(lam):
    """With every branch's last conv zero, dF/dx = 0, so dL/dx_l = lam * dL/dx_{l+1} exactly:
    identity passes the gradient unchanged (Eqn. 5), scaling multiplies it by lam per unit
    (Eqn. 8). Inside a stage only: projection units have no such shortcut."""
    shortcut = "identity" if lam == 1.0 else shortcuts.constant_scaling(lam, 1.0)
    g = gradient_norms(depth=26, block="basic", shortcut=shortcut, zero_init_residual=True)
    for stage in (2, 3, 4):
        norms = [g[f"conv{stage}_block{b}"] for b in range(1, 5)]
        assert norms[-1] > 0
        np.testing.assert_allclose(
            np.array(norms[:-1]) / np.array(norms[1:]), lam, rtol=1e-4, err_msg=f"stage {stage}"
        )


@pytest.mark.parametrize("unit", ["original", "full_preact"])
def test_identity_keeps_the_gradient_while_constant_scaling_explodes(unit):
    """At initialization, train-mode BN, 54 one-layer units: ||dL/dx_1|| / ||dL/dx_L|| is
    about 10 with identity shortcuts but hundreds with lambda = 0.5 (F scaled by 0.5). With BN
    the scaled shortcut fails by explosion: each unit's input shrinks, so the normalized
    branch's Jacobian grows; the measured table is in docs/benchmarks.md."""
    kwargs = dict(depth=56, block="one_layer", unit=unit)
    identity = gradient_norms(shortcut="identity", **kwargs)
    scaled = gradient_norms(shortcut=shortcuts.constant_scaling(0.5, 0.5), **kwargs)
    gated = gradient_norms(shortcut="exclusive_gating", **kwargs)

    def ratio(g):
        return g["conv2_block1"] / g["conv4_block18"]

    # Measured over seeds (jax): identity 10-13; scaled 130-640; gated 1.0-1.6.
    assert 1 < ratio(identity) < 30
    assert ratio(scaled) > 5 * ratio(identity)
    # Exclusive gating with b_g = -6: g ~ 0.0025, an almost pure shortcut, ratio ~ 1.
    assert 0.5 < ratio(gated) < 3


def test_inference_mode_measurement_runs():
    g = gradient_norms(depth=8, block="basic", training=False)
    assert list(g) == ["conv2_block1", "conv3_block1", "conv4_block1"]
    assert all(np.isfinite(v) and v > 0 for v in g.values())


def test_probed_unit_keeps_the_head():
    model = keras_preact.PreActResNet(
        depth=8,
        block="basic",
        input_shape=(8, 8, 3),
        unit=diagnostics.probed_unit("relu_preact", 2),
    )
    names = [layer.name for layer in model.layers]
    assert "post_relu" in names and "post_bn" not in names
    with pytest.raises(ValueError, match="no Probe layers"):
        diagnostics.unit_gradient_norms(
            keras_preact.PreActResNet(depth=8, block="basic", input_shape=(8, 8, 3)),
            np.zeros((2, 8, 8, 3), "float32"),
            np.zeros(2, "int32"),
        )
