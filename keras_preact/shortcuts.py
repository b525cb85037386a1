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

The named variants below are factories of `Shortcut` values: `shortcut="exclusive_gating"`
uses the paper's defaults and `shortcut=shortcuts.exclusive_gating(gate_bias=0.0)` any
other setting. A `Shortcut` compares by name and parameters, so
`shortcuts.exclusive_gating(-6.0) == shortcuts.get("exclusive_gating")`.
Variants replace only the identity shortcuts; units that change shape keep their
projection (Sec. 3.1: "we use 1x1 conv shortcuts only when dimensions increase").
"""

import dataclasses

import keras

from keras_preact import layers
from keras_preact.context import derive_seed


@dataclasses.dataclass(frozen=True)
class Shortcut:
    """A named shortcut variant of Fig. 2 with its parameters; calling it merges two paths.

    Attributes:
        kind: the variant's name, a key of `SHORTCUTS`.
        params: its parameters, `((name, value), ...)` in the factory's order.
    """

    kind: str
    params: tuple = ()

    def __call__(self, x, residual, *, ctx, name, prefix):
        return _MERGES[self.kind](x, residual, ctx=ctx, name=name, prefix=prefix,
                                  **dict(self.params))  # fmt: skip

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"shortcuts.{self.kind}({args})"


def _identity(x, residual, *, ctx, name, prefix):
    return keras.layers.Add(name=name)([x, residual])


def _constant_scaling(x, residual, *, ctx, name, prefix, shortcut_scale, residual_scale):
    return layers.ScaledAdd(shortcut_scale, residual_scale, name=name)([x, residual])


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


def _exclusive_gating(x, residual, *, ctx, name, prefix, gate_bias):
    g = _gate(x, ctx, prefix, gate_bias)
    return layers.GatedAdd("exclusive", name=name)([x, residual, g])


def _shortcut_only_gating(x, residual, *, ctx, name, prefix, gate_bias):
    g = _gate(x, ctx, prefix, gate_bias)
    return layers.GatedAdd("shortcut_only", name=name)([x, residual, g])


def _conv1x1(x, residual, *, ctx, name, prefix):
    h = ctx.conv(x, ctx.channels(x), 1, name=f"{prefix}_0_conv", bias_place="projection")
    return keras.layers.Add(name=name)([h, residual])


def _dropout(x, residual, *, ctx, name, prefix, rate, seed):
    layer_name = f"{prefix}_shortcut_dropout"
    s = ctx.layer_seed(layer_name) if seed is None else derive_seed(seed, layer_name)
    h = layers.ShortcutDropout(rate, seed=s, name=layer_name)(x)
    return keras.layers.Add(name=name)([h, residual])


_MERGES = {
    "identity": _identity,
    "constant_scaling": _constant_scaling,
    "exclusive_gating": _exclusive_gating,
    "shortcut_only_gating": _shortcut_only_gating,
    "conv1x1": _conv1x1,
    "dropout": _dropout,
}


def _number(value, arg, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {arg}={value!r}: expected a number.")
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"Invalid {arg}={value!r}: expected a number in [{low}, {high}).")
    return float(value)


def identity():
    """Fig. 2(a): `x_{l+1} = x + F(x)`."""
    return Shortcut("identity")


def constant_scaling(shortcut_scale=0.5, residual_scale=0.5):
    """Fig. 2(b): `x_{l+1} = lambda * x + s * F(x)`.

    Defaults to Table 1's only converging case: lambda = 0.5 with F scaled by 1 - lambda.

    Args:
        shortcut_scale: lambda, the factor on the shortcut.
        residual_scale: the factor on F (1.0 for "F unscaled", which the paper reports fails).
    """
    return Shortcut(
        "constant_scaling",
        (("shortcut_scale", _number(shortcut_scale, "shortcut_scale")),
         ("residual_scale", _number(residual_scale, "residual_scale"))),
    )  # fmt: skip


def exclusive_gating(gate_bias=-6.0):
    """Fig. 2(c): `x_{l+1} = (1 - g(x)) * x + g(x) * F(x)`, g a 1x1-conv sigmoid gate.

    Args:
        gate_bias: initial bias b_g of the gate; Table 1 finds -6 best (0 to -5 fail).
    """
    return Shortcut("exclusive_gating", (("gate_bias", _number(gate_bias, "gate_bias")),))


def shortcut_only_gating(gate_bias=-6.0):
    """Fig. 2(d): `x_{l+1} = (1 - g(x)) * x + F(x)`.

    Args:
        gate_bias: initial gate bias; Table 1: -6 gives 6.91%, 0 gives 12.86%.
    """
    return Shortcut("shortcut_only_gating", (("gate_bias", _number(gate_bias, "gate_bias")),))


def conv1x1():
    """Fig. 2(e): `x_{l+1} = W x + F(x)`, W a 1x1 convolution (no BN, as drawn)."""
    return Shortcut("conv1x1")


def dropout(rate=0.5, seed=None):
    """Fig. 2(f): dropout on the shortcut, expected scale `1 - rate` (see `ShortcutDropout`).

    Args:
        rate: the drop probability (the paper's 0.5).
        seed: optional base seed of the masks; each unit derives its own from it (default:
            from the network's `seed=`).
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"Invalid seed={seed!r}: expected an int or None.")
    return Shortcut("dropout", (("rate", _number(rate, "rate", 0.0, 1.0)), ("seed", seed)))


#: The factories, by name.
SHORTCUTS = {
    "identity": identity,
    "constant_scaling": constant_scaling,
    "exclusive_gating": exclusive_gating,
    "shortcut_only_gating": shortcut_only_gating,
    "conv1x1": conv1x1,
    "dropout": dropout,
}


def get(shortcut):
    """The merge function for a shortcut name, a `Shortcut`, or a user callable.

    Raises:
        ValueError: for an unknown name, or a factory passed without calling it.
    """
    for kind, factory in SHORTCUTS.items():
        if shortcut is factory:
            raise ValueError(
                f"shortcut=shortcuts.{kind} is the factory, not a shortcut: call it, e.g. "
                f"shortcut=shortcuts.{kind}(), or pass shortcut={kind!r}."
            )
    if isinstance(shortcut, str) and shortcut in SHORTCUTS:
        return SHORTCUTS[shortcut]()
    if callable(shortcut):
        return shortcut
    raise ValueError(
        f"Unknown shortcut={shortcut!r}. Allowed: {sorted(SHORTCUTS)}, a "
        "keras_preact.shortcuts factory's result, or a callable "
        "`(x, residual, *, ctx, name, prefix) -> tensor`."
    )
