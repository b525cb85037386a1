"""Residual units of the paper's Fig. 4, for basic, bottleneck and one-layer branches.

Every unit, built-in or user-supplied, is a function

    def unit(x, *, block, filters, stride, first, shortcut, ctx, name, drop_path_rate) -> tensor

- `block`: `"basic"` (3x3, 3x3), `"bottleneck"` (1x1, 3x3, 1x1 with `filters // 4` inside)
  or `"one_layer"` (a single 3x3, the paper's "ResNet-110(1layer)" of Table 3);
- `filters`: output channels; `stride`: 1 or 2;
- `first`: True for the network's first unit (the one right after the stem);
- `shortcut`: the merge function (see `keras_preact.shortcuts`) for identity-shaped units;
- `ctx`: the `keras_preact.BuildContext` with the layer factories; `name`: the unit prefix
  (`"conv3_block2"`); `drop_path_rate`: stochastic-depth rate for this unit.

A unit may carry an attribute `head` (None, "relu" or "bn_relu"): what the network applies
after its last unit, before pooling. Example of a custom unit, a basic unit without the
second BN:

>>> import keras, keras_preact
>>> def lean_unit(x, *, block, filters, stride, first, shortcut, ctx, name, drop_path_rate):
...     y = x if first else ctx.act(x, "bn_relu", name=f"{name}_preact")
...     y = ctx.conv(y, filters, 3, stride=stride, name=f"{name}_1_conv")
...     y = ctx.relu(y, name=f"{name}_1_relu")
...     y = ctx.conv(y, filters, 3, name=f"{name}_2_conv")
...     if stride != 1 or ctx.channels(x) != filters:
...         x = ctx.conv(x, filters, 1, stride=stride, name=f"{name}_0_conv")
...         return keras.layers.Add(name=f"{name}_out")([x, y])
...     return shortcut(x, y, ctx=ctx, name=f"{name}_out", prefix=name)
>>> lean_unit.head = "bn_relu"
>>> model = keras_preact.PreActResNet20(unit=lean_unit, input_shape=(32, 32, 3))
"""

import dataclasses

import keras

from keras_preact import layers

#: Residual-branch kinds and how many convolutions each has.
BLOCKS = {"basic": 2, "bottleneck": 3, "one_layer": 1}

#: Output channels / bottleneck channels of a bottleneck unit ([1], Sec. 4.1).
BOTTLENECK_EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """Where BN and ReLU sit around one residual unit (one column of the paper's Fig. 4).

    Attributes:
        fig: the panel of Fig. 4.
        pre: applied to the unit input before the branch (pre-activation), or None.
        last: applied after the branch's last convolution, or None.
        post: applied after the addition, or None.
        head: applied after the last unit of the network, before pooling, or None.
        projection_norm: whether a projection shortcut is conv-BN (as in [1], for the
            post-activation units) rather than a bare conv on the pre-activated input
            (`preact_scope="branch"` makes it conv-BN for every unit).
    """

    fig: str
    pre: str | None
    last: str | None
    post: str | None
    head: str | None
    projection_norm: bool


UNITS = {
    "original": UnitSpec("4(a)", None, "bn", "relu", None, True),
    "bn_after_add": UnitSpec("4(b)", None, None, "bn_relu", None, True),
    "relu_before_add": UnitSpec("4(c)", None, "bn_relu", None, None, True),
    "relu_preact": UnitSpec("4(d)", "relu", "bn", None, "relu", False),
    "full_preact": UnitSpec("4(e)", "bn_relu", None, None, "bn_relu", False),
}


def branch_convs(block, filters, stride, stride_in="first_conv"):
    """The `(filters, kernel_size, stride)` of each convolution of a residual branch."""
    if block == "basic":
        return [(filters, 3, stride), (filters, 3, 1)]
    if block == "one_layer":
        return [(filters, 3, stride)]
    if block == "bottleneck":
        inner = filters // BOTTLENECK_EXPANSION
        s1, s3 = (stride, 1) if stride_in == "first_conv" else (1, stride)
        return [(inner, 1, s1), (inner, 3, s3), (filters, 1, 1)]
    raise ValueError(f"Unknown block={block!r}. Allowed: {sorted(BLOCKS)}.")


def _residual_unit(
    spec, x, *, block, filters, stride, first, shortcut, ctx, name, drop_path_rate=0.0
):
    project = ctx.channels(x) != filters
    shared = ctx.layout.preact_scope == "shared"
    # Appendix ("shared"): the first unit reuses the activation right after conv1 (the
    # stem's BN-ReLU) for both paths; every projection unit shares its pre-activation with
    # the 1x1 conv. "branch": the pre-activation feeds the residual branch only, in every
    # unit, and the projection (conv-BN) reads the raw unit input.
    if spec.pre and not (shared and first and ctx.layout.stem_norm):
        preact = ctx.act(x, spec.pre, name=f"{name}_preact")
    else:
        preact = x

    if project:
        sc = ctx.conv(
            preact if shared else x,
            filters,
            1,
            stride=stride,
            name=f"{name}_0_conv",
            bias_place="projection",
        )
        if spec.projection_norm or not shared:
            sc = ctx.bn(sc, name=f"{name}_0_bn")
    elif stride > 1:
        # Same channels but a smaller map (the keras.applications layout): subsample x.
        sc = keras.layers.MaxPooling2D(
            1, strides=stride, data_format=ctx.data_format, name=f"{name}_0_pool"
        )(x)
    else:
        sc = None

    convs = branch_convs(block, filters, stride, ctx.layout.stride_in)
    y = preact
    zero_last_conv = ctx.zero_init_residual and spec.last is None
    for i, (f, k, s) in enumerate(convs, start=1):
        if i > 1:
            y = ctx.act(y, "bn_relu", name=f"{name}_{i - 1}")
        last = i == len(convs)
        y = ctx.conv(
            y,
            f,
            k,
            stride=s,
            name=f"{name}_{i}_conv",
            bias_place="residual_last" if last else "residual_inner",
            zero=last and zero_last_conv,
        )
    if spec.last:
        y = ctx.act(y, spec.last, name=f"{name}_{len(convs)}", zero=ctx.zero_init_residual)
    if drop_path_rate > 0.0:
        drop_name = f"{name}_drop_path"
        y = layers.DropPath(drop_path_rate, seed=ctx.layer_seed(drop_name), name=drop_name)(y)

    merge_name = f"{name}_add" if spec.post else f"{name}_out"
    if sc is not None:
        out = keras.layers.Add(name=merge_name)([sc, y])
    else:
        out = shortcut(x, y, ctx=ctx, name=merge_name, prefix=name)
    if spec.post in ("bn", "bn_relu"):
        out = ctx.bn(out, name=f"{name}_post_bn")
    if spec.post in ("relu", "bn_relu"):
        out = ctx.relu(out, name=f"{name}_out")
    return out


def make_unit(kind):
    """The unit function for a Fig. 4 name, or the callable itself."""
    if callable(kind):
        return kind
    if not isinstance(kind, str) or kind not in UNITS:
        raise ValueError(
            f"Unknown unit={kind!r}. Allowed: {sorted(UNITS)} or a callable "
            "`(x, *, block, filters, stride, first, shortcut, ctx, name, drop_path_rate)`."
        )
    spec = UNITS[kind]

    def unit(x, **kwargs):
        return _residual_unit(spec, x, **kwargs)

    unit.head = spec.head
    return unit
