"""`BuildContext`: the layer factories every unit and shortcut builds its layers with.

One object carries the choices that must be the same in every layer of a network (its
`Layout`, data format, BatchNorm momentum, initializer, seeds), so units and shortcuts,
including user-supplied ones, stay `x -> x` functions of a few arguments.
"""

import dataclasses
import zlib

import keras

from keras_preact.layout import Layout


def derive_seed(seed, name):
    """A random layer's own seed: a function of the network's `seed` and the layer name.

    Every drop-path and shortcut-dropout layer draws its own masks; one seed shared by all
    of them would draw the same uniforms in every unit, so the masks of units with rising
    drop rates would be nested. None when `seed` is None (Keras then seeds each layer
    from its global generator).

    >>> derive_seed(0, "conv2_block1_drop_path") != derive_seed(0, "conv2_block2_drop_path")
    True
    """
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


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
        layout: the network's `keras_preact.Layout` (stride position, stem, biases, BN
            epsilon, what a pre-activation feeds).
        data_format: `"channels_last"` or `"channels_first"`.
        bn_momentum: BatchNorm moving-average momentum in Keras' convention
            (`new = momentum * old + (1 - momentum) * batch`; Torch's 0.1 is Keras' 0.9).
        kernel_initializer: initializer (or its name) for every convolution kernel.
        zero_init_residual: zero the last BN gamma (or, with no BN there, the last conv
            kernel) of each residual branch so every unit starts as its shortcut.
        seed: base seed of the random layers (dropout shortcut, drop path); each layer
            draws its own with `layer_seed(name)`.
    """

    layout: Layout = Layout()
    data_format: str = "channels_last"
    bn_momentum: float = 0.9
    kernel_initializer: object = "he_normal_fan_out"
    zero_init_residual: bool = False
    seed: int | None = None

    def layer_seed(self, name):
        """The seed of the random layer `name`, derived from `seed` (see `derive_seed`)."""
        return derive_seed(self.seed, name)

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
            use_bias=bias_place in self.layout.conv_bias,
            kernel_initializer="zeros" if zero else self.kernel_init(),
            data_format=self.data_format,
            name=name,
        )(x)

    def bn(self, x, *, name, zero=False):
        return keras.layers.BatchNormalization(
            axis=self.channel_axis,
            epsilon=self.layout.bn_epsilon,
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
