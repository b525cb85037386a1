"""`BuildContext`: the layer factories every unit and shortcut builds its layers with.

One object carries the choices that must be the same in every layer of a network (data
format, BatchNorm constants, initializer, where convolutions get biases), so units and
shortcuts, including user-supplied ones, stay `x -> x` functions of a few arguments.
"""

import dataclasses

import keras

#: Where convolution biases can be switched on (`conv_bias=`). The paper's code has none.
BIAS_PLACES = ("stem", "projection", "residual_last", "residual_inner")


def conv_bias_places(value):
    """`conv_bias=` as a frozenset of `BIAS_PLACES`.

    True means every place, False or None none, a string one place, an iterable several.
    """
    if value is True:
        return frozenset(BIAS_PLACES)
    if value is False or value is None:
        return frozenset()
    places = frozenset((value,) if isinstance(value, str) else value)
    if not places <= set(BIAS_PLACES):
        raise ValueError(f"conv_bias={value!r}; allowed places: {BIAS_PLACES}.")
    return places


#: The paper's reference code for the options a pretrained-weights layout may override
#: (the defaults of every builder; `docs/models.md` explains each).
PAPER_LAYOUT = {
    "stride_in": "first_conv",
    "downsample_in": "first_unit",
    "stem_norm": True,
    "stem_pool_padding": "zeros",
    "conv_bias": (),
    "bn_epsilon": 1e-5,
    "preact_scope": "shared",
}

#: `preact_scope=` values: what a unit's pre-activation feeds.
PREACT_SCOPES = ("shared", "branch")


def he_normal_fan_out():
    """He et al. 2015 init as the paper's reference code does it: N(0, sqrt(2 / (k*k*c_out)))."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


def torch_linear_init():
    """PyTorch/Torch7 `Linear` default, kept by the paper's code: U(+-1/sqrt(fan_in))."""
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
    )


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """Shared settings and layer factories used while building one network.

    Attributes:
        data_format: `"channels_last"` or `"channels_first"`.
        bn_epsilon: BatchNorm epsilon (paper's code: 1e-5).
        bn_momentum: BatchNorm moving-average momentum in Keras' convention
            (`new = momentum * old + (1 - momentum) * batch`; Torch's 0.1 is Keras' 0.9).
        conv_bias: the subset of `BIAS_PLACES` whose convolutions carry a bias.
        kernel_initializer: initializer (or its name) for every convolution kernel.
        zero_init_residual: zero the last BN gamma (or, with no BN there, the last conv
            kernel) of each residual branch so every unit starts as its shortcut.
        stem_norm: whether the stem ends with BN-ReLU (then the first unit does not
            pre-activate again: the paper's appendix, "activation right after conv1").
        stride_in: which convolution of a downsampling unit is strided: `"first_conv"` (the
            first 1x1 of a bottleneck, as in [1] and the paper's CIFAR code) or `"3x3"` (the
            3x3, as in fb.resnet.torch, timm and keras.applications). Same for basic units.
        preact_scope: `"shared"` (the paper's appendix): a projection unit's pre-activation
            feeds both paths, its bare 1x1 projection included, and the first unit reuses
            the stem's BN-ReLU. `"branch"` (the published fb.resnet.torch ResNet-200): every
            unit, the first included, pre-activates only its residual branch; projections
            are 1x1 conv-BN on the un-activated unit input.
        seed: base seed for the random layers (dropout shortcut, drop path).
    """

    data_format: str = "channels_last"
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    conv_bias: frozenset = frozenset()
    kernel_initializer: object = "he_normal_fan_out"
    zero_init_residual: bool = False
    stem_norm: bool = True
    stride_in: str = "first_conv"
    preact_scope: str = "shared"
    seed: int | None = None

    @property
    def channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def channels(self, x):
        """Number of channels of a (symbolic) tensor."""
        return int(x.shape[self.channel_axis])

    def kernel_init(self):
        if self.kernel_initializer == "he_normal_fan_out":
            return he_normal_fan_out()
        return keras.initializers.get(self.kernel_initializer)

    def conv(self, x, filters, kernel_size, *, stride=1, name, bias_place=None, zero=False):
        """A conv with torch-style symmetric padding: explicit `_pad` layer when strided.

        `padding="same"` with stride 2 pads asymmetrically in Keras (more at the bottom and
        right), unlike Caffe/Torch; explicit symmetric padding keeps converted weights exact.
        """
        if kernel_size > 1 and stride > 1:
            stem = name[: -len("_conv")] if name.endswith("_conv") else name
            x = keras.layers.ZeroPadding2D(
                kernel_size // 2, data_format=self.data_format, name=f"{stem}_pad"
            )(x)
            padding = "valid"
        else:
            padding = "same"
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=stride,
            padding=padding,
            use_bias=bias_place in self.conv_bias,
            kernel_initializer="zeros" if zero else self.kernel_init(),
            data_format=self.data_format,
            name=name,
        )(x)

    def bn(self, x, *, name, zero=False):
        return keras.layers.BatchNormalization(
            axis=self.channel_axis,
            epsilon=self.bn_epsilon,
            momentum=self.bn_momentum,
            gamma_initializer="zeros" if zero else "ones",
            name=name,
        )(x)

    def relu(self, x, *, name):
        return keras.layers.ReLU(name=name)(x)

    def act(self, x, kind, *, name, zero=False):
        """Applies `kind` in (None, "relu", "bn", "bn_relu") with names `{name}_bn/_relu`."""
        if kind in ("bn", "bn_relu"):
            x = self.bn(x, name=f"{name}_bn", zero=zero)
        if kind in ("relu", "bn_relu"):
            x = self.relu(x, name=f"{name}_relu")
        return x
