"""Units (Fig. 4) and shortcuts (Fig. 2): every combination trains, and the numbers are right.

Numeric checks build one unit in isolation and compare its merge against the formula, with
weights from a seeded numpy generator and a numpy reference of the unit.
"""

import keras
import numpy as np
import pytest
from model_test_utils import (
    assert_trains_one_step,
    random_inputs,
    set_seeded_weights,
    tiny,
    to_numpy,
)

import keras_preact
from keras_preact import layers as kp_layers
from keras_preact import shortcuts, units

# Initializations feed the thresholds of these tests.
pytestmark = pytest.mark.usefixtures("seeded")

UNITS = sorted(units.UNITS)
SHORTCUTS = sorted(shortcuts.SHORTCUTS)


def unit_model(unit="full_preact", shortcut="identity", *, filters=8, size=8, block="basic",
               ctx=None, first=False, extra=()):  # fmt: skip
    """A keras.Model of one unit: returns [unit input, F (the branch), merge output, *extra]."""
    inp = keras.Input((size, size, filters))
    out = units.make_unit(unit)(
        inp,
        block=block,
        filters=filters,
        stride=1,
        first=first,
        shortcut=shortcuts.get(shortcut),
        ctx=ctx or keras_preact.BuildContext(),
        name="u",
        drop_path_rate=0.0,
    )
    model = keras.Model(inp, out)
    n_convs = units.BLOCKS[block]
    branch = model.get_layer(f"u_{n_convs}_conv").output
    merge = model.get_layer("u_out").output
    extras = [model.get_layer(n).output for n in extra]
    return keras.Model(inp, [inp, branch, merge, *extras])


def positive_inputs(shape, seed=0):
    return np.abs(np.random.default_rng(seed).standard_normal(shape)).astype("float32") + 0.1


# --------------------------------------------------------------------------- every combination


@pytest.mark.parametrize("shortcut", SHORTCUTS)
@pytest.mark.parametrize("unit", UNITS)
def test_every_unit_and_shortcut_trains_a_step(unit, shortcut):
    model = tiny(depth=14, unit=unit, shortcut=shortcut, input_shape=(8, 8, 3), seed=0)
    merge = {
        "constant_scaling": kp_layers.ScaledAdd,
        "exclusive_gating": kp_layers.GatedAdd,
        "shortcut_only_gating": kp_layers.GatedAdd,
    }.get(shortcut)
    if merge is not None:  # the variant replaces the identity shortcut of identity-shaped units
        merge_name = "conv2_block2_add" if units.UNITS[unit].post else "conv2_block2_out"
        assert isinstance(model.get_layer(merge_name), merge)
    x = random_inputs(model, batch=4)
    assert_trains_one_step(model, x, np.array([0, 1, 2, 3]), run_eagerly=True)


# --------------------------------------------------------------------------- units (Fig. 4)


def _np_conv3x3(x, kernel):
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))
    return np.einsum("bhwcij,ijco->bhwo", windows, kernel)


def _np_bn(x, layer, eps=1e-5):
    gamma, beta, mean, var = (to_numpy(w) for w in layer.weights)
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def _np_unit(unit, model, x):
    """The paper's Fig. 4 panels in numpy (basic block, identity shortcut, inference)."""
    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    conv = lambda t, i: _np_conv3x3(t, to_numpy(model.get_layer(f"u_{i}_conv").kernel))  # noqa: E731
    bn = lambda t, n: _np_bn(t, model.get_layer(f"u_{n}_bn"))  # noqa: E731
    if unit == "original":  # (a)
        return relu(x + bn(conv(relu(bn(conv(x, 1), 1)), 2), 2))
    if unit == "bn_after_add":  # (b)
        return relu(bn(x + conv(relu(bn(conv(x, 1), 1)), 2), "post"))
    if unit == "relu_before_add":  # (c)
        return x + relu(bn(conv(relu(bn(conv(x, 1), 1)), 2), 2))
    if unit == "relu_preact":  # (d)
        return x + bn(conv(relu(bn(conv(relu(x), 1), 1)), 2), 2)
    if unit == "full_preact":  # (e)
        return x + conv(relu(bn(conv(relu(bn(x, "preact")), 1), 1)), 2)
    raise AssertionError(unit)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_matches_the_papers_figure_4(unit):
    inp = keras.Input((6, 6, 4))
    out = units.make_unit(unit)(
        inp, block="basic", filters=4, stride=1, first=False, shortcut=shortcuts.identity(),
        ctx=keras_preact.BuildContext(), name="u", drop_path_rate=0.0,
    )  # fmt: skip
    model = keras.Model(inp, out)
    set_seeded_weights(model, seed=7, scale=0.3)
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 4)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(model(x, training=False)), _np_unit(unit, model, x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("block, convs", [("basic", 2), ("bottleneck", 3), ("one_layer", 1)])
def test_branch_kinds(block, convs):
    model = unit_model(block=block, filters=8)
    names = [la.name for la in model.layers if isinstance(la, keras.layers.Conv2D)]
    assert names == [f"u_{i}_conv" for i in range(1, convs + 1)]
    if block == "bottleneck":
        assert [model.get_layer(n).filters for n in names] == [2, 2, 8]
        assert [model.get_layer(n).kernel_size[0] for n in names] == [1, 3, 1]


# --------------------------------------------------------------------------- shortcuts (Fig. 2)


def _run(model, x, training=False):
    return [to_numpy(t) for t in model(x, training=training)]


def test_identity_shortcut():
    model = unit_model("full_preact", "identity")
    x, f, out = _run(model, positive_inputs((2, 8, 8, 8)))
    np.testing.assert_allclose(out, x + f, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scales", [(0.5, 0.5), (0.5, 1.0), (0.9, 0.1)])
def test_constant_scaling(scales):
    lam, s = scales
    model = unit_model("full_preact", shortcuts.constant_scaling(lam, s))
    layer = model.get_layer("u_out")
    assert (layer.shortcut_scale, layer.residual_scale) == (lam, s)
    x, f, out = _run(model, positive_inputs((2, 8, 8, 8)))
    np.testing.assert_allclose(out, lam * x + s * f, rtol=1e-5, atol=1e-6)


def test_constant_scaling_defaults_to_table_1s_converging_case():
    model = unit_model("original", "constant_scaling")
    layer = model.get_layer("u_add")
    assert (layer.shortcut_scale, layer.residual_scale) == (0.5, 0.5)


@pytest.mark.parametrize("kind, gate_bias", [("exclusive", -6.0), ("exclusive", -2.0),
                                             ("shortcut_only", -6.0), ("shortcut_only", 0.0)])  # fmt: skip
def test_gating_with_zeroed_kernel_is_sigmoid_of_bias(kind, gate_bias):
    factory = shortcuts.exclusive_gating if kind == "exclusive" else shortcuts.shortcut_only_gating
    model = unit_model("full_preact", factory(gate_bias=gate_bias), extra=["u_gate_conv"])
    gate = model.get_layer("u_gate_conv")
    np.testing.assert_array_equal(to_numpy(gate.bias), np.full(8, gate_bias, "float32"))
    gate.kernel.assign(np.zeros(gate.kernel.shape, "float32"))
    x, f, out, g = _run(model, positive_inputs((2, 8, 8, 8)))
    expected_g = 1.0 / (1.0 + np.exp(-gate_bias))
    np.testing.assert_allclose(g, np.full_like(g, expected_g), rtol=1e-6)
    residual = g * f if kind == "exclusive" else f
    np.testing.assert_allclose(out, (1 - g) * x + residual, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shortcut", ["exclusive_gating", "shortcut_only_gating"])
def test_gating_merge_with_a_learned_gate(shortcut):
    model = unit_model("full_preact", shortcut, extra=["u_gate_conv"])
    assert float(to_numpy(model.get_layer("u_gate_conv").bias)[0]) == -6.0  # Table 1's best
    gate = model.get_layer("u_gate_conv")
    gate.kernel.assign(np.random.default_rng(0).normal(0, 0.5, gate.kernel.shape))
    gate.bias.assign(np.zeros(gate.bias.shape))
    x, f, out, g = _run(model, positive_inputs((2, 8, 8, 8)))
    # g(x) = sigmoid(1x1 conv of the unit input x).
    w = to_numpy(gate.kernel)[0, 0]
    np.testing.assert_allclose(g, 1 / (1 + np.exp(-(x @ w))), rtol=1e-4, atol=1e-5)
    residual = g * f if shortcut == "exclusive_gating" else f
    np.testing.assert_allclose(out, (1 - g) * x + residual, rtol=1e-5, atol=1e-5)


def test_conv1x1_shortcut():
    model = unit_model("full_preact", "conv1x1")
    conv = model.get_layer("u_0_conv")
    assert conv.kernel_size == (1, 1) and not conv.use_bias
    x, f, out = _run(model, positive_inputs((2, 8, 8, 8)))
    w = to_numpy(conv.kernel)[0, 0]
    np.testing.assert_allclose(out, x @ w + f, rtol=1e-4, atol=1e-5)


def test_dropout_shortcut_statistics():
    model = unit_model("full_preact", shortcuts.dropout(0.5, seed=3), size=16)
    x = positive_inputs((8, 16, 16, 8))
    # Inference: exactly the expectation, 0.5 * x (no inverted-dropout rescaling).
    x_, f, out = _run(model, x, training=False)
    np.testing.assert_allclose(out - f, 0.5 * x, rtol=1e-5, atol=1e-5)
    # Training: each shortcut element is x or 0, kept with probability 0.5, mean 0.5 * x.
    x_, f, out = _run(model, x, training=True)
    h = out - f
    kept = np.isclose(h, x, rtol=1e-4, atol=1e-5)
    dropped = np.abs(h) < 1e-5
    assert np.all(kept | dropped)
    assert abs(kept.mean() - 0.5) < 0.02  # 16384 elements: std 0.004
    assert abs(h.mean() / x.mean() - 0.5) < 0.02
    _, _, out2 = _run(model, x, training=True)
    assert not np.array_equal(out, out2)  # a fresh mask every call


def test_shortcut_dropout_layer_rates():
    layer = kp_layers.ShortcutDropout(0.25, seed=0)
    x = np.ones((64, 8, 8, 4), "float32")
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), 0.75 * x)
    kept = to_numpy(layer(x, training=True))
    assert set(np.unique(kept)) <= {0.0, 1.0}
    assert abs(kept.mean() - 0.75) < 0.02
    with pytest.raises(ValueError, match=r"rate=1.5"):
        kp_layers.ShortcutDropout(1.5)


def test_projection_units_keep_their_projection_under_every_shortcut():
    for shortcut in SHORTCUTS:
        model = tiny(shortcut=shortcut)
        assert isinstance(model.get_layer("conv3_block1_out"), keras.layers.Add), shortcut


# --------------------------------------------------------------------------- drop path, zero init


def test_drop_path_is_per_sample_and_rescaled():
    layer = kp_layers.DropPath(0.3, seed=1)
    x = positive_inputs((400, 4, 4, 2))
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), x)
    y = to_numpy(layer(x, training=True))
    ratio = (y / x).reshape(400, -1)
    # Per sample: all kept (scaled by 1 / (1 - rate)) or all dropped.
    assert np.allclose(ratio, ratio[:, :1], rtol=1e-5)
    values = ratio[:, 0].astype("float64")
    kept = np.isclose(values, 1 / 0.7, rtol=1e-5)
    assert np.all(kept | (values == 0))
    assert abs(kept.mean() - 0.7) < 0.08
    assert abs(y.mean() / x.mean() - 1.0) < 0.12  # unbiased in expectation


def test_drop_path_in_a_model_drops_the_branch_only():
    model = tiny(depth=14, drop_path_rate=0.5, seed=0)
    sub = keras.Model(
        model.input,
        [model.get_layer(n).output for n in
         ("conv4_block1_out", "conv4_block2_2_conv", "conv4_block2_drop_path", "conv4_block2_out")],
    )  # fmt: skip
    x = random_inputs(model, batch=32)
    a, f, dropped, out = (to_numpy(t) for t in sub(x, training=True))
    np.testing.assert_allclose(out, a + dropped, rtol=1e-5, atol=1e-5)
    per_sample = np.abs(dropped).reshape(32, -1).max(axis=1)
    zero = per_sample == 0
    assert 0 < zero.sum() < 32
    np.testing.assert_allclose(dropped[~zero], 2.0 * f[~zero], rtol=1e-5, atol=1e-5)
    a, f, dropped, out = (to_numpy(t) for t in sub(x, training=False))
    np.testing.assert_allclose(dropped, f, rtol=0, atol=0)


@pytest.mark.parametrize("unit", UNITS)
def test_zero_init_residual_makes_identity_units_identities(unit):
    model = tiny(depth=20, unit=unit, zero_init_residual=True, input_shape=(8, 8, 3))
    pairs = [(f"conv{s}_block{b}_out", f"conv{s}_block{b + 1}_out") for s in (2, 3, 4)
             for b in (1, 2)]  # fmt: skip
    sub = keras.Model(model.input, {n: model.get_layer(n).output for p in pairs for n in p})
    x = random_inputs(model, batch=4)
    # Train mode is exact except where a BN follows the addition (Fig. 4b), which
    # normalizes the sum; at init its inference BN is x / sqrt(1 + eps).
    modes = [False] if unit == "bn_after_add" else [False, True]
    for training in modes:
        out = {k: to_numpy(v) for k, v in sub(x, training=training).items()}
        for before, after in pairs:
            np.testing.assert_allclose(out[after], out[before], rtol=1e-4, atol=1e-6)
    plain = tiny(depth=20, unit=unit, input_shape=(8, 8, 3))
    sub = keras.Model(plain.input, [plain.get_layer(n).output for n in pairs[0]])
    before, after = (to_numpy(t) for t in sub(x, training=False))
    assert not np.allclose(before, after)


def test_zero_init_residual_zeroes_the_last_bn_or_conv():
    full = tiny(zero_init_residual=True)
    assert not np.any(to_numpy(full.get_layer("conv2_block1_2_conv").kernel))
    assert np.any(to_numpy(full.get_layer("conv2_block1_1_conv").kernel))
    original = tiny(unit="original", zero_init_residual=True)
    assert not np.any(to_numpy(original.get_layer("conv2_block1_2_bn").gamma))
    assert np.all(to_numpy(original.get_layer("conv2_block1_1_bn").gamma) == 1)
    assert np.any(to_numpy(original.get_layer("conv2_block1_2_conv").kernel))
