"""The paper's optimization: learning-rate schedules, coupled L2 weight decay, SGD, the loss.

Everything here is built from a run's config and plain Keras objects, the same for every
loop (`model.fit`, the `strategy.run` loop and the jitted JAX loop).
"""

import math

import keras

_PACKAGE = "keras_preact_training"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Step or cosine decay after a linear or constant warm-up.

    Args:
        base_lr: the learning rate after warm-up.
        total_steps: length of the run; cosine decays to 0 at this step.
        decay: `"step"`, `"cosine"` or `"constant"`.
        boundaries: for `"step"`, the steps at which the rate is divided by 10.
        warmup_steps: length of the warm-up.
        warmup: `"linear"` (0 to `base_lr`) or `"constant"` (`warmup_lr`).
        warmup_lr: the rate during a constant warm-up.

    Example:

    >>> s = WarmupSchedule(0.1, 64000, decay="step", boundaries=[32000, 48000],
    ...                    warmup_steps=400, warmup="constant", warmup_lr=0.01)
    >>> [round(float(s(i)), 4) for i in (0, 400, 32000, 48000)]
    [0.01, 0.1, 0.01, 0.001]
    """

    def __init__(
        self,
        base_lr,
        total_steps,
        *,
        decay="step",
        boundaries=(),
        warmup_steps=0,
        warmup="linear",
        warmup_lr=0.0,
    ):
        if decay not in ("step", "cosine", "constant"):
            raise ValueError(f"decay must be step, cosine or constant; got {decay!r}.")
        if warmup not in ("linear", "constant"):
            raise ValueError(f"warmup must be linear or constant; got {warmup!r}.")
        self.base_lr, self.total_steps = float(base_lr), int(total_steps)
        self.decay, self.boundaries = decay, [int(b) for b in boundaries]
        self.warmup_steps, self.warmup, self.warmup_lr = int(warmup_steps), warmup, float(warmup_lr)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        if self.decay == "step":
            lr = keras.ops.convert_to_tensor(self.base_lr, "float32")
            for b in self.boundaries:
                lr = keras.ops.where(step >= b, lr * 0.1, lr)
        elif self.decay == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            frac = keras.ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            lr = 0.5 * self.base_lr * (1.0 + keras.ops.cos(math.pi * frac))
        else:
            lr = keras.ops.convert_to_tensor(self.base_lr, "float32")
        if self.warmup_steps > 0:
            if self.warmup == "linear":
                warm = self.base_lr * (step + 1.0) / self.warmup_steps
            else:
                warm = keras.ops.convert_to_tensor(self.warmup_lr, "float32")
            lr = keras.ops.where(step < self.warmup_steps, warm, lr)
        return lr

    def get_config(self):
        names = ("base_lr", "total_steps", "decay", "boundaries", "warmup_steps", "warmup",
                 "warmup_lr")  # fmt: skip
        return {name: getattr(self, name) for name in names}


def lr_schedule(cfg):
    """The `WarmupSchedule` of a derived config (`lr_boundaries` in epochs -> steps)."""
    return WarmupSchedule(
        cfg.base_lr,
        cfg.total_steps,
        decay=cfg.lr_schedule,
        boundaries=cfg.boundary_steps(),
        warmup_steps=cfg.warmup_steps,
        warmup=cfg.warmup,
        warmup_lr=cfg.warmup_lr,
    )


def _is_kernel(variable):
    """Conv and dense kernels, also stacked in a scanned stage (`.../unit_1_conv_kernel`)."""
    name = variable.path.rsplit("/", 1)[-1]
    return name == "kernel" or name.endswith("_kernel")


def decayed_variables(model, on="kernels"):
    """The trainable variables weight decay applies to, chosen by variable path.

    `on="kernels"` (the default): every conv and dense kernel, i.e. each variable whose
    path ends in `kernel` (a written-out layer's `.../kernel`, or a scanned stage's stacked
    `.../unit_1_conv_kernel`), so a scanned net and its written-out twin decay the same
    weights; BatchNorm gamma/beta and biases are not decayed. `on="all"`: every trainable
    variable, as the paper's Torch code does.

    Example:

    >>> import keras_preact
    >>> m = keras_preact.PreActResNet20(input_shape=(8, 8, 1), classes=2)
    >>> sum(int(keras.ops.size(v)) for v in decayed_variables(m))
    270096
    """
    if on not in ("kernels", "all"):
        raise ValueError(f"on must be 'kernels' or 'all'; got {on!r}.")
    return [v for v in model.trainable_variables if on == "all" or _is_kernel(v)]


def add_weight_decay(model, weight_decay, on="kernels"):
    """Adds an L2 penalty `wd / 2 * ||w||^2` to the loss (gradient `+= wd * w`).

    This is the coupled L2 decay of SGD in the paper's Torch code (its `weightDecay`
    passes through momentum), on `decayed_variables(model, on)`. The penalty is each
    variable's `regularizer`, which Keras adds to `model.losses` (and the JAX loop to its
    loss).

    Returns:
        The decayed variables (none when `weight_decay` is 0).
    """
    variables = decayed_variables(model, on)
    if weight_decay <= 0:
        return []
    for v in variables:
        v.regularizer = keras.regularizers.L2(weight_decay / 2.0)
    return variables


#: The classifier's layer name (keras.applications'): the head a fine-tuning run trains at
#: the full learning rate.
HEAD = "predictions"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ScaledSGD(keras.optimizers.SGD):
    """SGD whose learning rate is `backbone_lr_scale` times the schedule's for every variable
    outside the classifier (`HEAD`): fine-tuning's smaller steps for pretrained layers.

    Example:

    >>> opt = ScaledSGD(0.1, backbone_lr_scale=0.1)
    >>> opt.scale_of("conv2_block1_1_conv/kernel"), opt.scale_of("predictions/kernel")
    (0.1, 1.0)
    """

    def __init__(self, *args, backbone_lr_scale=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone_lr_scale = float(backbone_lr_scale)

    def scale_of(self, path):
        """The learning-rate factor of the variable at `path`."""
        return 1.0 if path.split("/")[0] == HEAD else self.backbone_lr_scale

    def build(self, variables):
        super().build(variables)
        # By index: under TensorFlow, `update_step` sees the backend's variables, not Keras'.
        self._scales = [self.scale_of(v.path) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        scale = self._scales[self._get_variable_index(variable)]
        if scale != 1.0:
            learning_rate = keras.ops.multiply(learning_rate, scale)
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "backbone_lr_scale": self.backbone_lr_scale}


def make_optimizer(cfg, schedule, *, loss_scale=False):
    """SGD with momentum on `schedule` (`ScaledSGD` when `--backbone_lr_scale` is not 1);
    wrapped for dynamic loss scaling if `loss_scale`."""
    kwargs = dict(learning_rate=schedule, momentum=cfg.momentum, nesterov=cfg.nesterov)
    scale = getattr(cfg, "backbone_lr_scale", 1.0)
    if scale != 1.0:
        optimizer = ScaledSGD(**kwargs, backbone_lr_scale=scale)
    else:
        optimizer = keras.optimizers.SGD(**kwargs)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of logits against integer labels, with optional label smoothing.

    The pipelines always yield integer labels; with `label_smoothing > 0` they are
    one-hot encoded here (`(1 - s) * onehot + s / classes`, as Keras'
    `CategoricalCrossentropy` does), so both loops and every pipeline share one loss.

    Example:

    >>> import numpy as np
    >>> loss = SparseCrossentropy(label_smoothing=0.1)
    >>> round(float(loss(np.array([0]), np.array([[2.0, 0.0]]))), 4)
    0.2269
    """

    def __init__(self, label_smoothing=0.0, name="sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        labels = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
        if not self.label_smoothing:
            return keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)
        one_hot = keras.ops.one_hot(labels, keras.ops.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, from_logits=True, label_smoothing=self.label_smoothing
        )

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
