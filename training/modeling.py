"""The model a run trains, from its configuration: architecture, start weights, optimizer.

`builder_kwargs` maps a run's options (a `Config`, or the dict of a run's `config.json`)
to the keyword arguments of the keras_preact builders, so the trainers and
`evaluate.py` build exactly the same architecture from the same record.
"""

from collections.abc import Mapping
from typing import NamedTuple

import keras
from absl import logging

from training import distribution, metrics, optimization

#: The architecture options of `config.json`, with the builders' defaults for records
#: written before the option existed.
ARCHITECTURE_DEFAULTS = {
    "unit": "full_preact",
    "shortcut": "identity",
    "shortcut_scale": None,
    "residual_scale": None,
    "gate_bias": None,
    "shortcut_dropout_rate": None,
    "layout": None,
    "width_multiplier": 1.0,
    "zero_init_residual": False,
    "drop_path_rate": 0.0,
    "seed": None,
}
#: `--shortcut` parameter flag -> keyword of the `keras_preact.shortcuts` factory.
_SHORTCUT_KWARGS = {
    "shortcut_scale": "shortcut_scale",
    "residual_scale": "residual_scale",
    "gate_bias": "gate_bias",
    "shortcut_dropout_rate": "rate",
}


def architecture(options):
    """The architecture options of a run (a `Config` or a `config.json` dict), as a dict."""
    values = options if isinstance(options, Mapping) else options.values
    return {k: values.get(k, default) for k, default in ARCHITECTURE_DEFAULTS.items()}


def builder_kwargs(options):
    """Keyword arguments of `keras_preact.get_model` for a run's architecture options.

    Example:

    >>> kw = builder_kwargs({"unit": "relu_before_add", "shortcut": "exclusive_gating",
    ...                      "gate_bias": -4.0})
    >>> kw["unit"], kw["shortcut"].shortcut_name
    ('relu_before_add', 'exclusive_gating')
    """
    import keras_preact

    arch = architecture(options)
    params = {_SHORTCUT_KWARGS[k]: arch[k] for k in _SHORTCUT_KWARGS if arch.get(k) is not None}
    shortcut = arch["shortcut"]
    if params:
        shortcut = keras_preact.shortcuts.SHORTCUTS[shortcut](**params)
    kwargs = {
        "unit": arch["unit"],
        "shortcut": shortcut,
        "width_multiplier": arch["width_multiplier"],
        "zero_init_residual": bool(arch["zero_init_residual"]),
        "drop_path_rate": float(arch["drop_path_rate"]),
    }
    if arch["seed"] is not None:
        kwargs["seed"] = int(arch["seed"])
    if arch["layout"] is not None:
        kwargs.update(layout_kwargs(arch["layout"]))
    return kwargs


def layout_kwargs(name):
    """The builder keywords of a layout preset name."""
    import keras_preact

    if hasattr(keras_preact, "Layout"):
        return {"layout": name}
    # The model library before `keras_preact.Layout`: one keyword per option.
    w = keras_preact.weights
    table = {
        "paper": w.LAYOUT_PAPER,
        "timm": w.LAYOUT_TIMM,
        "keras": w.LAYOUT_KERAS,
        "fb": w.LAYOUT_FB,
        "fb_legacy": w.LAYOUT_FB_LEGACY,
    }
    return dict(table[name])


def build_base(options, *, model, input_shape, classes, weights=None):
    """The keras_preact model of a run's options, with `weights` loaded.

    `weights` (a record name or a file) with another number of classes than `classes`
    loads every layer but the classifier (fine-tuning).
    """
    import keras_preact

    kwargs = dict(input_shape=input_shape, classifier_activation=None, **builder_kwargs(options))
    if weights is None:
        return keras_preact.get_model(model, classes=classes, weights=None, **kwargs)
    try:
        return keras_preact.get_model(model, classes=classes, weights=weights, **kwargs)
    except ValueError as error:
        if "classes" not in str(error):
            raise
        # Another number of classes: everything but the classifier comes from `weights`.
        logging.info("%s; loading every layer but the classifier.", error)
    source = keras_preact.get_model(model, include_top=False, weights=weights, **kwargs)
    target = keras_preact.get_model(model, classes=classes, weights=None, **kwargs)
    for layer in source.layers:
        if layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())
    return target


def with_input_normalization(model, mean, std):
    """uint8 images -> `(x / 255 - mean) / std` -> `model`, all on the device.

    Args:
        model: a model of float images.
        mean: per-channel mean, [0, 1] units.
        std: per-channel standard deviation, [0, 1] units.
    """
    shape = tuple(model.input_shape[1:])
    inputs = keras.Input(shape, dtype="uint8", name="image_uint8")
    # Plain ops, not keras.layers.Normalization (a preprocessing layer that needs TF).
    offset = keras.ops.convert_to_tensor([255.0 * float(m) for m in mean], "float32")
    scale = keras.ops.convert_to_tensor([1.0 / (255.0 * float(s)) for s in std], "float32")
    x = (keras.ops.cast(inputs, "float32") - offset) * scale
    return keras.Model(inputs, model(x), name=model.name + "_uint8")


class Built(NamedTuple):
    """What `build` returns."""

    base: keras.Model  # the keras_preact model: the weights the run ships
    model: keras.Model  # the model that trains (`base`, or it behind the uint8 normalization)
    optimizer: keras.optimizers.Optimizer
    decayed: int  # the number of weight-decayed variables


def build(cfg, run, schedule, *, input_shape, classes, mean=None, std=None):
    """`--model` with weight decay and its SGD optimizer, under the run's strategy.

    Args:
        cfg: the run's `Config`.
        run: the `distribution.Run`.
        schedule: the learning-rate schedule.
        input_shape: input shape of the keras_preact model.
        classes: number of classes (logits out, no softmax).
        mean: per-channel mean of the inputs ([0, 1] units), for `--normalize_on_device`.
        std: per-channel standard deviation, for `--normalize_on_device`.

    Returns:
        A `Built`. The model is compiled in both loops: for `fit` with the loss and
        metrics, for the custom loop with the optimizer alone, so that in both the
        checkpoint (`model.save_weights`) holds the optimizer's iterations and momentum.
    """
    with distribution.scope(run.strategy):
        base = build_base(
            cfg, model=cfg.model, input_shape=input_shape, classes=classes, weights=cfg.weights
        )
        decayed = optimization.add_weight_decay(base, cfg.weight_decay, cfg.weight_decay_on)
        model = with_input_normalization(base, mean, std) if cfg.normalize_on_device else base
        optimizer = optimization.make_optimizer(
            cfg, schedule, loss_scale=run.loop == "custom" and run.policy == "mixed_float16"
        )
        if run.loop == "fit":
            model.compile(
                optimizer=optimizer,
                loss=optimization.SparseCrossentropy(cfg.label_smoothing),
                metrics=metrics.top_k_metrics(classes),
                jit_compile=cfg.jit_compile,
            )
        else:
            model.compile(optimizer=optimizer)
        optimizer = model.optimizer  # compile wraps it for loss scaling under mixed_float16
        optimizer.build(model.trainable_variables)
    return Built(base, model, optimizer, decayed)
