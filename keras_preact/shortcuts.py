"""Shortcut variants of the paper's Fig. 2 and Table 1.

A shortcut is a function that merges a unit's input `x` (the shortcut path, `h(x)` before
any transform) with its residual branch `F(x)` of the same shape:

    def shortcut(x, residual, *, ctx, name, prefix) -> tensor

`ctx` is the network's `keras_preact.BuildContext` (use `ctx.conv`, `ctx.bn`, ...). The layer
that merges the two paths must be named `name` (`"{prefix}_out"`, or `"{prefix}_add"` when
the unit applies an activation after the addition) and any other layer from the unit prefix
(e.g. `f"{prefix}_gate_conv"` with `prefix="conv2_block3"`). The returned tensor is the sum
`x_{l+1}` before any post-addition activation of the unit. Pass a function of this signature
as `shortcut=` to any builder:

>>> import keras, keras_preact
>>> def half_identity(x, residual, *, ctx, name, prefix):
...     x = keras.layers.Rescaling(0.5, name=f"{prefix}_half")(x)
...     return keras.layers.Add(name=name)([x, residual])
>>> model = keras_preact.PreActResNet20(shortcut=half_identity, input_shape=(32, 32, 3))

The named variants below are factories: `shortcut="exclusive_gating"` uses the paper's
defaults and `shortcut=shortcuts.exclusive_gating(gate_bias=0.0)` any other setting.
Variants replace only the identity shortcuts; units that change shape keep their
projection (Sec. 3.1: "we use 1x1 conv shortcuts only when dimensions increase").
"""

import keras

from keras_preact import layers


def identity():
    """Fig. 2(a): `x_{l+1} = x + F(x)`."""

    def merge(x, residual, *, ctx, name, prefix):
        return keras.layers.Add(name=name)([x, residual])

    merge.shortcut_name = "identity"
    return merge


def constant_scaling(shortcut_scale=0.5, residual_scale=0.5):
    """Fig. 2(b): `x_{l+1} = lambda * x + s * F(x)`.

    Defaults to Table 1's only converging case: lambda = 0.5 with F scaled by 1 - lambda.

    Args:
        shortcut_scale: lambda, the factor on the shortcut.
        residual_scale: the factor on F (1.0 for "F unscaled", which the paper reports fails).
    """

    def merge(x, residual, *, ctx, name, prefix):
        return layers.ScaledAdd(shortcut_scale, residual_scale, name=name)([x, residual])

    merge.shortcut_name = "constant_scaling"
    return merge


def _gate(x, ctx, prefix, gate_bias):
    # g(x) = sigmoid(W_g x + b_g), a 1x1 conv with as many gates as channels (Eqn. 4 region).
    return keras.layers.Conv2D(
        ctx.channels(x),
        1,
        activation="sigmoid",
        use_bias=True,
        bias_initializer=keras.initializers.Constant(gate_bias),
        kernel_initializer=ctx.kernel_init(),
        data_format=ctx.data_format,
        name=f"{prefix}_gate_conv",
    )(x)


def exclusive_gating(gate_bias=-6.0):
    """Fig. 2(c): `x_{l+1} = (1 - g(x)) * x + g(x) * F(x)`, g a 1x1-conv sigmoid gate.

    Args:
        gate_bias: initial bias b_g of the gate; Table 1 finds -6 best (0 to -5 fail).
    """

    def merge(x, residual, *, ctx, name, prefix):
        g = _gate(x, ctx, prefix, gate_bias)
        return layers.GatedAdd("exclusive", name=name)([x, residual, g])

    merge.shortcut_name = "exclusive_gating"
    return merge


def shortcut_only_gating(gate_bias=-6.0):
    """Fig. 2(d): `x_{l+1} = (1 - g(x)) * x + F(x)`.

    Args:
        gate_bias: initial gate bias; Table 1: -6 gives 6.91%, 0 gives 12.86%.
    """

    def merge(x, residual, *, ctx, name, prefix):
        g = _gate(x, ctx, prefix, gate_bias)
        return layers.GatedAdd("shortcut_only", name=name)([x, residual, g])

    merge.shortcut_name = "shortcut_only_gating"
    return merge


def conv1x1():
    """Fig. 2(e): `x_{l+1} = W x + F(x)`, W a 1x1 convolution (no BN, as drawn)."""

    def merge(x, residual, *, ctx, name, prefix):
        h = ctx.conv(x, ctx.channels(x), 1, name=f"{prefix}_0_conv", bias_place="projection")
        return keras.layers.Add(name=name)([h, residual])

    merge.shortcut_name = "conv1x1"
    return merge


def dropout(rate=0.5, seed=None):
    """Fig. 2(f): dropout on the shortcut, expected scale `1 - rate` (see `ShortcutDropout`).

    Args:
        rate: the drop probability (the paper's 0.5).
        seed: optional seed for the masks.
    """

    def merge(x, residual, *, ctx, name, prefix):
        s = seed if seed is not None else ctx.seed
        h = layers.ShortcutDropout(rate, seed=s, name=f"{prefix}_shortcut_dropout")(x)
        return keras.layers.Add(name=name)([h, residual])

    merge.shortcut_name = "dropout"
    return merge


SHORTCUTS = {
    "identity": identity,
    "constant_scaling": constant_scaling,
    "exclusive_gating": exclusive_gating,
    "shortcut_only_gating": shortcut_only_gating,
    "conv1x1": conv1x1,
    "dropout": dropout,
}


def get(shortcut):
    """Returns the merge function for a shortcut name or a user callable."""
    if callable(shortcut):
        return shortcut
    if shortcut not in SHORTCUTS:
        raise ValueError(
            f"Unknown shortcut={shortcut!r}. Allowed: {sorted(SHORTCUTS)} "
            "or a callable `(x, residual, *, ctx, name, prefix) -> tensor`."
        )
    return SHORTCUTS[shortcut]()
