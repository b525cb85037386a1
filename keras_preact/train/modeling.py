"""The model a run trains, from its configuration: architecture, start weights, optimizer.

`builder_kwargs` maps a run's options (a `Config`, or the dict of a run's `config.json`)
to the keyword arguments of the keras_preact builders, so the trainers and
`evaluate.py` build exactly the same architecture from the same record. With
`--normalize_on_device` the model is built with `include_preprocessing=True`: it takes
[0, 255] pixels (the pipelines ship uint8) and normalizes them as its first layer, which
has no variables, so the saved weights load into a model built either way.
"""

import dataclasses
import logging
from collections.abc import Mapping

import keras

from keras_preact.train import distribution, metrics, optimization

log = logging.getLogger(__name__)

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
    "scan_units": False,
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
    >>> kw["unit"], kw["shortcut"]
    ('relu_before_add', shortcuts.exclusive_gating(gate_bias=-4.0))
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
        "scan_units": bool(arch["scan_units"]),
    }
    if arch["seed"] is not None:
        kwargs["seed"] = int(arch["seed"])
    layout = arch["layout"]
    if isinstance(layout, Mapping):  # a layout that is no preset, as `Layout.to_config()`
        layout = keras_preact.Layout(**layout)
    if layout is not None:
        kwargs["layout"] = layout
    return kwargs


def start_record(options, model):
    """The `keras_preact.weights` record of the run's `--weights` (None without one, or for
    a Keras `.weights.h5` file): it fixes the layout and the input normalization."""
    import keras_preact

    values = options if isinstance(options, Mapping) else options.values
    weights = values.get("weights")
    if weights is None:
        return None
    resolved = keras_preact.weights.resolve(
        weights,
        model_name=model,
        depth=keras_preact.MODELS[model]["depth"],
        include_top=False,
        **{k: v for k, v in builder_kwargs(options).items() if k in ("unit", "shortcut")},
    )
    return resolved.record


def resolved_options(options, *, model, mean, std):
    """What a run derives from its start weights: the layout and the input normalization.

    The layout is `--layout`, else the start weights' (a record's or an upstream file's),
    else the paper's. The normalization is the start weights' own (weights carry their
    preprocessing), else `mean` / `std` (the data set's statistics, [0, 1] units).

    Returns:
        `{"layout": name or Layout config, "mean": [...], "std": [...]}`.
    """
    import keras_preact

    record = start_record(options, model)
    layout = architecture(options)["layout"]
    if layout is None:
        found = record.layout if record is not None and record.layout is not None else None
        found = found or keras_preact.Layout()
        layout = found.name or found.to_config()
    if record is not None and record.preprocessing is not None:
        mean, std = keras_preact.imagenet_utils.mean_std(record.preprocessing)
        log.info("Input normalization of %s: mean %s, std %s.", record.name, mean, std)
    return {
        "layout": layout,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def build_base(
    options, *, model, input_shape, classes, weights=None, mean=None, std=None, dataset=None
):  # fmt: skip
    """The keras_preact model of a run's options, with `weights` loaded.

    With `mean` and `std` the model normalizes [0, 255] pixels itself
    (`include_preprocessing=True`). `weights` (a record name or a file) whose record has
    another number of classes than `classes`, or was trained on another `dataset` than the
    run's, loads every layer but the classifier, which starts afresh (fine-tuning: the
    record's ten clothes are not a digit folder's ten digits).
    """
    import keras_preact

    kwargs = dict(input_shape=input_shape, classifier_activation=None, **builder_kwargs(options))
    if mean is not None:
        kwargs.update(include_preprocessing=True, preprocessing=(tuple(mean), tuple(std)))
    record = start_record({**architecture(options), "weights": weights}, model)
    same_data = dataset is None or getattr(record, "dataset", None) in (None, dataset)
    if weights is None or record is None or (record.classes in (None, classes) and same_data):
        return keras_preact.get_model(model, classes=classes, weights=weights, **kwargs)
    # Another task: everything but the classifier comes from `weights`.
    log.info(
        "%s has %s classes of %s, the run %d of %s: loading every layer but the classifier.",
        record.name, record.classes, record.dataset, classes, dataset,
    )  # fmt: skip
    source = keras_preact.get_model(model, include_top=False, weights=weights, **kwargs)
    target = keras_preact.get_model(model, classes=classes, weights=None, **kwargs)
    for layer in source.layers:
        if layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())
    return target


class WrittenOut:
    """`net -> the model to export`: `net` itself, or for `--scan_units` its written-out
    twin (`scan_units=False`, built once by `build_base(**build)`) holding `net`'s current
    weights, which any keras_preact net loads."""

    def __init__(self, options, **build):
        self.options, self.build, self.twin = architecture(options), build, None

    def __call__(self, net):
        if not self.options["scan_units"]:
            return net
        import keras_preact

        if self.twin is None:
            self.twin = build_base({**self.options, "scan_units": False}, **self.build)
        keras_preact.scan.copy_weights(net, self.twin)
        return self.twin


def fine_tune(model, *, freeze_stages=0, freeze_batchnorm=False):
    """Freezes what a fine-tuning run keeps: the stem and the first `freeze_stages` stages
    (`conv1_*`, `conv2_*`, ...; more stages than the net has freeze the whole backbone, the
    final BatchNorm too: a linear probe), and with `freeze_batchnorm` every BatchNorm layer,
    whose statistics then stay the start weights' (Keras runs a frozen BatchNorm in inference
    mode). Returns the names of the frozen layers.

    Example:

    >>> import keras_preact
    >>> m = keras_preact.PreActResNet20(input_shape=(8, 8, 1), classes=2)
    >>> frozen = fine_tune(m, freeze_stages=1)
    >>> frozen[0], any(n.startswith("conv3_") for n in frozen), m.get_layer("predictions").trainable
    ('conv1_conv', False, True)
    """
    stages = sorted({int(n[4]) for n in (layer.name for layer in model.layers)
                     if n.startswith("conv") and n[4:5].isdigit() and n[5:6] == "_"})  # fmt: skip
    frozen_prefixes = (
        tuple(f"conv{s}_" for s in stages if s <= 1 + freeze_stages) if freeze_stages else ()
    )
    everything = freeze_stages and freeze_stages >= len(stages) - 1
    frozen = []
    for layer in model.layers:
        if not layer.weights or layer.name == "predictions":
            continue
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        if layer.name.startswith(frozen_prefixes) or everything or (freeze_batchnorm and is_bn):
            layer.trainable = False
            frozen.append(layer.name)
    return frozen


def global_batchnorm(model):
    """Makes `model`'s BatchNorm layers use the statistics of the global batch under
    `tf.distribute` (each replica would use its own share), as JAX's partitioner and one
    device do: every backend trains the same model for the same `--strategy`."""
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


@dataclasses.dataclass
class Built:
    """What `build` returns."""

    model: keras.Model  # the keras_preact model that trains; its weights are the run's
    optimizer: keras.optimizers.Optimizer
    decayed: int  # the number of weight-decayed weights (scalars)
    export: object  # model -> the model-only copy to write (`WrittenOut`)


def build(cfg, run, schedule, *, input_shape, classes):
    """`--model` with weight decay and its SGD optimizer, under the run's strategy.

    Args:
        cfg: the run's `Config`, with `mean` and `std` derived (`resolved_options`).
        run: the `distribution.Run`.
        schedule: the learning-rate schedule.
        input_shape: input shape of the keras_preact model.
        classes: number of classes (logits out, no softmax).

    Returns:
        A `Built`. The model is compiled in every loop: for `fit` with the loss and
        metrics, for the custom and JAX loops with the optimizer alone, so that in all of
        them the checkpoint (`model.save_weights`) holds the optimizer's iterations and
        momentum.
    """
    on_device = cfg.normalize_on_device
    with distribution.scope(run.strategy):
        model = build_base(
            cfg,
            model=cfg.model,
            input_shape=input_shape,
            classes=classes,
            weights=cfg.weights,
            mean=cfg.mean if on_device else None,
            std=cfg.std if on_device else None,
            dataset=getattr(cfg, "dataset", None),
        )
        frozen = fine_tune(
            model,
            freeze_stages=getattr(cfg, "freeze_stages", 0),
            freeze_batchnorm=getattr(cfg, "freeze_batchnorm", False),
        )
        if frozen:
            log.info(
                "Frozen for fine-tuning: %d layers (%s ... %s).", len(frozen), frozen[0], frozen[-1]
            )
        if run.replicas > 1 and keras.backend.backend() == "tensorflow":
            global_batchnorm(model)
        if run.loop == "torch":
            from keras_preact.train import torch_loop

            torch_loop.global_batchnorm(model)
        decayed = optimization.add_weight_decay(model, cfg.weight_decay, cfg.weight_decay_on)
        decayed = sum(int(keras.ops.size(v)) for v in decayed)
        optimizer = optimization.make_optimizer(
            cfg, schedule, loss_scale=run.loop == "custom" and run.policy == "mixed_float16"
        )
        if run.loop == "fit":  # the custom and JAX loops compute loss and metrics themselves
            model.compile(
                optimizer=optimizer,
                loss=optimization.SparseCrossentropy(cfg.label_smoothing),
                metrics=metrics.top_k_metrics(classes),
                jit_compile=run.jit_compile,
            )
        else:  # the custom loop scales its loss itself; the JAX loop runs in bfloat16
            model.compile(optimizer=optimizer, auto_scale_loss=run.loop == "custom")
        optimizer = model.optimizer  # compile wraps it for loss scaling under mixed_float16
        optimizer.build(model.trainable_variables)
    export = WrittenOut(
        cfg,
        model=cfg.model,
        input_shape=input_shape,
        classes=classes,
        mean=cfg.mean if on_device else None,
        std=cfg.std if on_device else None,
    )
    return Built(model, optimizer, decayed, export)
