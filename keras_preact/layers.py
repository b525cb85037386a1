"""The few layers keras_preact needs beyond Keras' own, all registered for `.keras` reloading.

Every layer here is a thin, stateless-or-nearly op with a `get_config`, so a model that uses
them reloads with `keras.models.load_model` in a fresh process after `import keras_preact`.
"""

import keras
import numpy as np
from keras import ops

_PACKAGE = "keras_preact"


def _check_rate(rate, what):
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"`{what}` must be in [0, 1); received {what}={rate!r}.")
    return float(rate)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConstantPadding2D(keras.layers.Layer):
    """Symmetric spatial padding with a constant value (e.g. `-inf` before a max-pool).

    `keras.layers.ZeroPadding2D` can only pad with zeros; PyTorch's `MaxPool2d(padding=1)`
    pads with -inf, which matters when the pool reads un-activated values (the timm stem).

    Args:
        padding: int, pixels added on each side of both spatial axes.
        value: float, the constant written into the border.
        data_format: `"channels_last"` or `"channels_first"`; defaults to the Keras config.
    """

    def __init__(self, padding=1, value=0.0, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.padding = int(padding)
        self.value = float(value)
        self.data_format = data_format or keras.config.image_data_format()

    def call(self, x):
        p = self.padding
        if self.data_format == "channels_last":
            pad = [[0, 0], [p, p], [p, p], [0, 0]]
        else:
            pad = [[0, 0], [0, 0], [p, p], [p, p]]
        return ops.pad(x, pad, constant_values=self.value)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        axes = (1, 2) if self.data_format == "channels_last" else (2, 3)
        for a in axes:
            if shape[a] is not None:
                shape[a] += 2 * self.padding
        return tuple(shape)

    def get_config(self):
        return {
            **super().get_config(),
            "padding": self.padding,
            "value": self.value,
            "data_format": self.data_format,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ScaledAdd(keras.layers.Layer):
    """`shortcut_scale * h + residual_scale * F`: the constant-scaling shortcut (Fig. 2b).

    Inputs are `[shortcut, residual]`.
    """

    def __init__(self, shortcut_scale=0.5, residual_scale=0.5, **kwargs):
        super().__init__(**kwargs)
        self.shortcut_scale = float(shortcut_scale)
        self.residual_scale = float(residual_scale)

    def call(self, inputs):
        shortcut, residual = inputs
        return self.shortcut_scale * shortcut + self.residual_scale * residual

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {
            **super().get_config(),
            "shortcut_scale": self.shortcut_scale,
            "residual_scale": self.residual_scale,
        }


GATING_MODES = ("exclusive", "shortcut_only")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GatedAdd(keras.layers.Layer):
    """Merges `[shortcut, residual, gate]` with a sigmoid gate `g` (the paper's Fig. 2c, 2d).

    `mode="exclusive"`: `(1 - g) * h + g * F` (Highway-style exclusive gating).
    `mode="shortcut_only"`: `(1 - g) * h + F` (only the shortcut is gated).
    """

    def __init__(self, mode="exclusive", **kwargs):
        super().__init__(**kwargs)
        if mode not in GATING_MODES:
            raise ValueError(f"Unknown gating mode={mode!r}; allowed: {GATING_MODES}.")
        self.mode = mode

    def call(self, inputs):
        shortcut, residual, gate = inputs
        if self.mode == "exclusive":
            residual = gate * residual
        return (1.0 - gate) * shortcut + residual

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ShortcutDropout(keras.layers.Layer):
    """Element-wise dropout on the shortcut *without* the usual 1/(1-rate) rescaling.

    The paper (Sec. 3.1, Fig. 2f) treats dropout on the shortcut as imposing an expected scale
    of `1 - rate` on it (0.5 for rate 0.5), like constant scaling in expectation. Keras'
    `Dropout` is inverted dropout (expected scale 1), so it would not be the paper's variant.
    In training a kept element passes unchanged and a dropped one is zero; at inference the
    shortcut is multiplied by its expectation, `1 - rate`.
    """

    def __init__(self, rate=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = _check_rate(rate, "rate")
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        keep = 1.0 - self.rate
        if not training or self.rate == 0.0:
            return x * keep
        mask = keras.random.uniform(ops.shape(x), seed=self.seed_generator) < keep
        return x * ops.cast(mask, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DropPath(keras.layers.Layer):
    """Stochastic depth (Huang et al. 2016): drops the whole residual branch per sample.

    Kept branches are scaled by `1 / (1 - rate)` in training so inference is the identity
    (the convention of timm's `DropPath`, not of the original paper, which scales at test time).
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = _check_rate(rate, "rate")
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = keras.random.uniform(shape, seed=self.seed_generator) < keep
        return x * ops.cast(mask, x.dtype) / keep

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Normalize(keras.layers.Layer):
    """Per-channel `(x / 255 - mean) / std` of pixels in [0, 255], on the device.

    The first layer of a model built with `include_preprocessing=True`. Inputs of any dtype
    (uint8 included) are normalized in float32, then cast to the layer's compute dtype.
    Unlike `keras.layers.Normalization`, which calls TensorFlow at run time, it uses only
    `keras.ops`, so it runs under JAX and PyTorch without TensorFlow installed.

    Args:
        mean: per-channel means, in [0, 1] units.
        std: per-channel standard deviations, in [0, 1] units.
        axis: the channel axis (-1 for channels_last, 1 for channels_first).

    Example:

    >>> import numpy as np
    >>> layer = Normalize(mean=[0.5], std=[0.25])
    >>> keras.ops.convert_to_numpy(layer(np.array([[0, 255]], np.uint8)[..., None])).ravel()
    array([-2.,  2.], dtype=float32)
    """

    def __init__(self, mean, std, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or not self.mean or min(self.std) <= 0:
            raise ValueError(
                f"Normalize needs as many means as stds, stds > 0; received mean={mean!r}, "
                f"std={std!r}."
            )
        self.axis = int(axis)

    def call(self, x):
        shape = [1] * len(x.shape)
        shape[self.axis] = len(self.mean)
        scale = np.asarray(self.std, np.float32) * 255.0
        mean = ops.reshape(ops.convert_to_tensor(np.asarray(self.mean, np.float32) * 255.0), shape)
        std = ops.reshape(ops.convert_to_tensor(scale), shape)
        return ops.cast((ops.cast(x, "float32") - mean) / std, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, x):
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std, "axis": self.axis}
