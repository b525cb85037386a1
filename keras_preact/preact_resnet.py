"""Pre-activation ResNets: He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks",
ECCV 2016 (arXiv 1603.05027), "the paper"; [1] is the original ResNet (arXiv 1512.03385).

Reading order: the tables of families and depths; the generic `PreActResNet` builder, in
three steps (`_resolve` validates every argument and resolves the weights record, `_graph`
builds the functional graph top to bottom, then the weights are loaded); the named entry
points, one short `def` per depth; `feature_extractor`. Layer names follow
keras.applications' `resnet_v2` (`conv1_conv`, `conv2_block1_preact_bn`, ...,
`conv5_block3_out`, `post_bn`, `predictions`); `docs/models.md` lists the whole scheme and
every deviation from the paper.
"""

import dataclasses
import difflib
import inspect
import numbers
import operator
import os
import re
import textwrap

import keras

from keras_preact import imagenet_utils
from keras_preact import layers as kp_layers
from keras_preact import scan as kp_scan
from keras_preact import shortcuts as kp_shortcuts
from keras_preact import units as kp_units
from keras_preact import weights as kp_weights
from keras_preact._optional import MissingDependency, require
from keras_preact.context import BuildContext, torch_linear_init
from keras_preact.layout import LAYOUTS, Layout

#: Per family: stem, stage strides, stage output widths per block kind, default input,
#: smallest input side (the total stride, so the last stage is at least 1x1).
FAMILIES = {
    "cifar": {
        "stem_width": 16,
        "strides": (1, 2, 2),
        "widths": {"basic": (16, 32, 64), "one_layer": (16, 32, 64), "bottleneck": (64, 128, 256)},
        "input_shape": (32, 32, 3),
        "min_size": 4,
    },
    "imagenet": {
        "stem_width": 64,
        "strides": (1, 2, 2, 2),
        "widths": {
            "basic": (64, 128, 256, 512),
            "one_layer": (64, 128, 256, 512),
            "bottleneck": (256, 512, 1024, 2048),
        },
        "input_shape": (224, 224, 3),
        "min_size": 32,
    },
}

#: Units per stage of the named ImageNet depths ([1], Table 1; 200 from the paper, Table 5).
IMAGENET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

#: Depth per unit count: convolutions per unit times units, plus conv1 and the classifier.
CIFAR_DEPTH_RULE = {"basic": (6, "6n+2"), "bottleneck": (9, "9n+2"), "one_layer": (3, "3n+2")}
CIFAR_NAMED = {20: "basic", 32: "basic", 44: "basic", 56: "basic", 110: "basic",
               164: "bottleneck", 1001: "bottleneck"}  # fmt: skip

#: The named builders: the row of `PreActResNet` arguments each one fixes.
MODELS = {
    **{
        f"PreActResNet{d}": {"depth": d, "family": "imagenet", "block": b, "stage_blocks": s}
        for d, (b, s) in IMAGENET_STAGES.items()
    },
    **{
        f"PreActResNet{d}": {
            "depth": d,
            "family": "cifar",
            "block": b,
            "stage_blocks": (((d - 2) // CIFAR_DEPTH_RULE[b][0]),) * 3,
        }
        for d, b in CIFAR_NAMED.items()
    },
}

_POOLINGS = (None, "avg", "max")
_DATA_FORMATS = (None, "channels_last", "channels_first")
#: Builder keywords of earlier versions that are now options of `layout=`.
_LAYOUT_KEYWORDS = tuple(f.name for f in dataclasses.fields(Layout))


# -- Step 1: resolve ---------------------------------------------------------------------


def _int(value, arg, *, low=None, allow_none=False):
    """`value` as an int (numpy integers too, not bools), or ValueError naming `arg`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"Invalid {arg}={value!r}: expected an int, got {type(value).__name__}.")
    value = operator.index(value)
    if low is not None and value < low:
        raise ValueError(f"Invalid {arg}={value!r}: expected an int >= {low}.")
    return value


def _number(value, arg, low, high, *, high_open=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {arg}={value!r}: expected a number, got {type(value).__name__}.")
    value = float(value)
    if value < low or value > high or (high_open and value == high):
        interval = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"Invalid {arg}={value!r}: expected a number in {interval}.")
    return value


def _bool(value, arg):
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {arg}={value!r}: expected True or False.")
    return value


def _choice(value, arg, allowed):
    if not (value is None or isinstance(value, str)) or value not in allowed:
        raise ValueError(f"Invalid {arg}={value!r}. Allowed: {allowed}.")
    return value


def _keras_lookup(value, arg, module, examples, objects):
    """`module.get(value)` (`keras.activations`, `keras.initializers`), or a ValueError that
    names `arg`, the value and some allowed names (Keras' own error names neither)."""
    try:
        return module.get(value)
    except (ValueError, TypeError):
        pass
    where = "keras." + module.__name__.rsplit(".", 1)[-1]
    names = sorted({*examples, *(n for n in dir(module) if n[:1].islower())}
                   - {"get", "serialize", "deserialize"})  # fmt: skip
    close = difflib.get_close_matches(value, names, n=1) if isinstance(value, str) else []
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Invalid {arg}={value!r}: not a name or object {where}.get accepts.{hint} Allowed: "
        f"a name such as {list(examples)} (or another of {where}), or {objects}."
    )


def _stage_blocks(family, depth, block, stage_blocks):
    """Resolves (block, stage_blocks) from a depth, or checks them against it."""
    if block is not None and (not isinstance(block, str) or block not in kp_units.BLOCKS):
        raise ValueError(f"Invalid block={block!r}. Allowed: {sorted(kp_units.BLOCKS)}.")
    n_stages = len(FAMILIES[family]["strides"])
    if stage_blocks is not None:
        ok = isinstance(stage_blocks, (list, tuple)) and len(stage_blocks) == n_stages
        ok = ok and all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1
            for n in stage_blocks
        )
        if not ok:
            raise ValueError(
                f"Invalid stage_blocks={stage_blocks!r}: expected a tuple of {n_stages} "
                f"positive unit counts for family={family!r}."
            )
        stage_blocks = tuple(int(n) for n in stage_blocks)
        block = block or "bottleneck"
        if depth is not None:
            implied = sum(stage_blocks) * kp_units.BLOCKS[block] + 2
            if implied != depth:
                raise ValueError(
                    f"depth={depth} contradicts stage_blocks={stage_blocks} with "
                    f"block={block!r}, which give depth {implied}."
                )
        return block, stage_blocks
    if depth is None:
        raise ValueError("Pass `depth=` or `stage_blocks=`.")
    if family == "imagenet":
        if depth not in IMAGENET_STAGES:
            raise ValueError(
                f"depth={depth} is not a named ImageNet depth; allowed: "
                f"{sorted(IMAGENET_STAGES)}, or pass stage_blocks= for any other."
            )
        named_block, blocks = IMAGENET_STAGES[depth]
        if block is not None and block != named_block:
            raise ValueError(
                f"depth={depth} (ImageNet) uses block={named_block!r}, not {block!r}; "
                "pass stage_blocks= for another layout."
            )
        return named_block, blocks
    block = block or CIFAR_NAMED.get(depth)
    if block is None:
        raise ValueError(
            f"depth={depth} is not a named CIFAR depth ({sorted(CIFAR_NAMED)}); pass block= "
            "('basic': 6n+2, 'bottleneck': 9n+2, 'one_layer': 3n+2)."
        )
    per_unit, rule = CIFAR_DEPTH_RULE[block]
    n, rest = divmod(depth - 2, per_unit)
    if rest or n < 1:
        examples = [per_unit * k + 2 for k in (1, 3, 9, 18)]
        raise ValueError(
            f"depth={depth} does not fit block={block!r} of the cifar family: depth must be "
            f"{rule} with n >= 1 (e.g. {examples})."
        )
    return block, (n, n, n)


def _widths(family, block, width_multiplier):
    multiplier = width_multiplier
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real) or multiplier <= 0:
        raise ValueError(f"Invalid width_multiplier={multiplier!r}: expected a positive number.")
    widths = tuple(int(round(w * multiplier)) for w in FAMILIES[family]["widths"][block])
    smallest = kp_units.BOTTLENECK_EXPANSION if block == "bottleneck" else 1
    if min(widths) < smallest:
        raise ValueError(
            f"Invalid width_multiplier={multiplier!r}: it gives stage widths {widths}; every "
            f"width must be >= {smallest} for {block} units."
        )
    return widths


def _input_shape(family, input_shape, data_format, input_tensor, record, include_top):
    given, tensor_shape = input_shape, None
    if input_tensor is not None:
        tensor_shape = tuple(None if s is None else int(s) for s in input_tensor.shape[1:])
        input_shape = tensor_shape if input_shape is None else input_shape
    if input_shape is None:
        default = record.default_input_shape("channels_last") if record is not None else None
        default = default or FAMILIES[family]["input_shape"]
        if not include_top:
            # As keras.applications: a backbone takes any height and width by default.
            default = (None, None, default[-1])
        input_shape = default if data_format == "channels_last" else default[-1:] + default[:2]
    ok = isinstance(input_shape, (list, tuple)) and len(input_shape) == 3
    ok = ok and all(
        s is None or (isinstance(s, numbers.Integral) and not isinstance(s, bool))
        for s in input_shape
    )
    if not ok:
        raise ValueError(
            f"Invalid input_shape={input_shape!r}: expected 3 entries (height, width, "
            f"channels for {data_format}), each an int or None."
        )
    input_shape = tuple(None if s is None else int(s) for s in input_shape)
    if given is not None and tensor_shape is not None:
        # The model is built on the tensor, so input_shape can only restate its shape (as
        # keras.layers.Input(tensor=..., shape=...) requires); None leaves a side to it.
        if len(tensor_shape) != 3 or any(
            s is not None and s != t for s, t in zip(input_shape, tensor_shape)
        ):
            raise ValueError(
                f"input_shape={given!r} contradicts input_tensor, whose shape is "
                f"{tensor_shape!r} without the batch axis. Pass input_tensor= alone (the "
                "model takes its shape), or an input_shape that matches it (None entries "
                "match any size)."
            )
    spatial = input_shape[:2] if data_format == "channels_last" else input_shape[1:]
    channels = input_shape[-1] if data_format == "channels_last" else input_shape[0]
    minimum = FAMILIES[family]["min_size"]
    if any(s is not None and s < minimum for s in spatial):
        raise ValueError(
            f"input_shape={input_shape} is too small for the {family} family: each spatial "
            f"side must be >= {minimum} px (its total stride)."
        )
    if channels is not None and channels < 1:
        raise ValueError(f"input_shape={input_shape} has no channels.")
    return input_shape, channels


def _layout(layout, record):
    """The network's `Layout`: `layout=` or the record's, and they must agree."""
    wanted = None if layout is None else Layout.get(layout)
    needed = record.layout if record is not None else None
    if wanted is not None and needed is not None and wanted != needed:
        diffs = ", ".join(
            f"{k}={a!r} (file: {b!r})" for k, (a, b) in wanted.differences(needed).items()
        )
        raise ValueError(
            f"layout={layout!r} contradicts the layout of weights={record.name!r}, which needs "
            f"layout={needed!r}: {diffs}. Leave layout= unset to take it from the weights."
        )
    return wanted or needed or Layout()


def _preprocessing(include_preprocessing, preprocessing, record, channels):
    """`(mean, std)` of the input normalization, [0, 1] units, or None."""
    _bool(include_preprocessing, "include_preprocessing")
    if not include_preprocessing:
        if preprocessing is not None:
            raise ValueError(
                f"preprocessing={preprocessing!r} has no effect without include_preprocessing=True."
            )
        return None
    from_record = record.preprocessing if record is not None else None
    if preprocessing is None and from_record is None:
        raise ValueError(
            "include_preprocessing=True needs weights with a record (their normalization) or "
            f"preprocessing=: a mode in {sorted(imagenet_utils.MODES)} or a (mean, std) pair "
            "of per-channel values in [0, 1] units."
        )
    if preprocessing is not None and from_record is not None:
        if imagenet_utils.mean_std(preprocessing) != imagenet_utils.mean_std(from_record):
            raise ValueError(
                f"preprocessing={preprocessing!r} contradicts weights={record.name!r}, which "
                f"need {from_record!r}. Leave preprocessing= unset to take it from the weights."
            )
    mean, std = imagenet_utils.mean_std(preprocessing or from_record)
    if channels is not None and len(mean) != channels:
        raise ValueError(
            f"The preprocessing {preprocessing or from_record!r} normalizes {len(mean)} "
            f"channels; the input has {channels}."
        )
    return mean, std


@dataclasses.dataclass(frozen=True)
class _Architecture:
    """Everything `_graph` needs, validated and resolved."""

    family: str
    block: str
    stage_blocks: tuple
    widths: tuple
    unit: object  # the unit function
    shortcut: object  # the merge function
    ctx: BuildContext
    input_shape: tuple
    input_tensor: object
    include_top: bool
    pooling: str | None
    classes: int
    classifier_activation: object
    drop_path_rate: float
    scan_units: bool
    preprocessing: tuple | None  # (mean, std) in [0, 1] units
    name: str
    weights: kp_weights.ResolvedWeights | None


def _resolve(
    *,
    depth,
    family,
    block,
    stage_blocks,
    width_multiplier,
    unit,
    shortcut,
    layout,
    include_top,
    weights,
    input_tensor,
    input_shape,
    pooling,
    classes,
    classifier_activation,
    include_preprocessing,
    preprocessing,
    name,
    data_format,
    bn_momentum,
    kernel_initializer,
    drop_path_rate,
    zero_init_residual,
    seed,
    scan_units,
):
    """Validates every argument (ValueError naming it) and resolves the weights record."""
    _choice(family, "family", tuple(FAMILIES))
    depth = _int(depth, "depth", low=1, allow_none=True)
    block, stage_blocks = _stage_blocks(family, depth, block, stage_blocks)
    depth = sum(stage_blocks) * kp_units.BLOCKS[block] + 2
    widths = _widths(family, block, width_multiplier)
    unit_fn = kp_units.make_unit(unit)
    merge_fn = kp_shortcuts.get(shortcut)
    include_top = _bool(include_top, "include_top")
    _choice(pooling, "pooling", _POOLINGS)
    data_format = _choice(data_format, "data_format", _DATA_FORMATS)
    data_format = data_format or keras.config.image_data_format()
    classes = _int(classes, "classes", low=1, allow_none=True)
    if not (classifier_activation is None or isinstance(classifier_activation, str)
            or callable(classifier_activation)):  # fmt: skip
        raise ValueError(
            f"Invalid classifier_activation={classifier_activation!r}: expected None, an "
            "activation name or a callable."
        )
    if isinstance(classifier_activation, str):
        _keras_lookup(classifier_activation, "classifier_activation", keras.activations,
                      ("softmax", "sigmoid", "linear", "log_softmax"), "a callable")  # fmt: skip
    if not (name is None or isinstance(name, str)):
        raise ValueError(f"Invalid name={name!r}: expected a string or None.")
    bn_momentum = _number(bn_momentum, "bn_momentum", 0.0, 1.0)
    drop_path_rate = _number(drop_path_rate, "drop_path_rate", 0.0, 1.0)
    scan_units = _bool(scan_units, "scan_units")
    if scan_units and drop_path_rate > 0.0:
        raise ValueError(
            f"scan_units=True applies one unit to every slice of stacked weights, so its units "
            f"cannot have their own drop-path rates and masks; drop_path_rate={drop_path_rate!r} "
            "needs scan_units=False."
        )
    zero_init_residual = _bool(zero_init_residual, "zero_init_residual")
    seed = _int(seed, "seed", allow_none=True)
    if not (isinstance(kernel_initializer, str) and kernel_initializer == "he_normal_fan_out"):
        _keras_lookup(kernel_initializer, "kernel_initializer", keras.initializers,
                      ("he_normal_fan_out", "he_normal", "he_uniform", "glorot_uniform",
                       "truncated_normal", "zeros"),
                      "a keras.initializers.Initializer")  # fmt: skip
    if input_tensor is not None and not (
        keras.backend.is_keras_tensor(input_tensor) or keras.ops.is_tensor(input_tensor)
    ):
        raise ValueError(
            f"Invalid input_tensor={input_tensor!r}: expected a Keras tensor (keras.Input) or "
            "a backend tensor."
        )

    name = name or f"preact_resnet{depth}"
    resolved = kp_weights.resolve(
        weights,
        model_name=name,
        depth=depth,
        include_top=include_top,
        classes=classes,
        unit=unit,
        shortcut=merge_fn,
    )
    record = resolved.record if resolved is not None else None
    if record is not None and record.model in MODELS:
        row = MODELS[record.model]
        if (row["family"], row["stage_blocks"]) != (family, stage_blocks):
            raise ValueError(
                f"weights={record.name!r} are for {record.model} (family={row['family']!r}, "
                f"stage_blocks={row['stage_blocks']}), not family={family!r} with "
                f"stage_blocks={stage_blocks}."
            )
    layout = _layout(layout, record)
    if not layout.stem_norm and getattr(unit_fn, "head", None) is None and isinstance(unit, str):
        raise ValueError(
            f"stem_norm=False needs a pre-activation unit; unit={unit!r} post-activates, so "
            "its stem must end with BN-ReLU. Allowed with stem_norm=False: "
            "['full_preact', 'relu_preact']."
        )
    if classes is None:
        classes = record.classes if record is not None and record.classes else None
    if classes is None:
        classes = 10 if family == "cifar" else 1000
    input_shape, channels = _input_shape(
        family, input_shape, data_format, input_tensor, record, include_top
    )
    return _Architecture(
        family=family,
        block=block,
        stage_blocks=stage_blocks,
        widths=widths,
        unit=unit_fn,
        shortcut=merge_fn,
        ctx=BuildContext(
            layout=layout,
            data_format=data_format,
            bn_momentum=bn_momentum,
            kernel_initializer=kernel_initializer,
            zero_init_residual=zero_init_residual,
            seed=seed,
        ),
        input_shape=input_shape,
        input_tensor=input_tensor,
        include_top=include_top,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        drop_path_rate=drop_path_rate,
        scan_units=scan_units,
        preprocessing=_preprocessing(include_preprocessing, preprocessing, record, channels),
        name=name,
        weights=resolved,
    )


# -- Step 2: the functional graph ----------------------------------------------------------


def _stem(x, arch):
    ctx, layout = arch.ctx, arch.ctx.layout
    width = FAMILIES[arch.family]["stem_width"]
    if arch.family == "cifar":
        # CIFAR: one 3x3 conv with 16 filters ([1], Sec. 4.2).
        x = ctx.conv(x, width, 3, name="conv1_conv", bias_place="stem")
        return ctx.act(x, "bn_relu", name="conv1") if layout.stem_norm else x
    x = ctx.conv(x, width, 7, stride=2, name="conv1_conv", bias_place="stem")
    if layout.stem_norm:
        x = ctx.act(x, "bn_relu", name="conv1")
    # After a ReLU, zero padding equals the -inf padding of Torch's max-pool.
    if layout.stem_pool_padding == "neg_inf" and not layout.stem_norm:
        pad = kp_layers.ConstantPadding2D(
            1, float("-inf"), data_format=ctx.data_format, name="pool1_pad"
        )
    else:
        pad = keras.layers.ZeroPadding2D(1, data_format=ctx.data_format, name="pool1_pad")
    pool = keras.layers.MaxPooling2D(3, strides=2, data_format=ctx.data_format, name="pool1_pool")
    return pool(pad(x))


def _unit_strides(arch):
    """The stride of every unit, stage by stage. `downsample_in="last_unit"` moves each
    stage's stride to the previous stage's last unit (keras.applications ResNetV2); the
    resolutions of the stage outputs stay the same."""
    strides = FAMILIES[arch.family]["strides"]
    first = arch.ctx.layout.downsample_in == "first_unit"
    for s, n in enumerate(arch.stage_blocks):
        nxt = strides[s + 1] if s + 1 < len(strides) else 1
        yield [(strides[s] if b == 0 else 1) if first else (nxt if b == n - 1 else 1)
               for b in range(n)]  # fmt: skip


def _run_of_stride_1(strides, b):
    """How many units from `b` on have stride 1 (at least 1: unit `b` itself)."""
    run = 1
    while b + run < len(strides) and strides[b] == strides[b + run] == 1:
        run += 1
    return run


def _output_dtype():
    policy = keras.config.dtype_policy()
    if policy.compute_dtype in ("float16", "bfloat16") and policy.variable_dtype == "float32":
        return "float32"  # Mixed precision: the model's outputs stay float32.
    return None


def _graph(arch):
    """The functional graph of `arch`, from the input to the classifier."""
    ctx = arch.ctx
    # Input, and the record's normalization of [0, 255] pixels when asked for.
    if arch.input_tensor is None:
        inputs = keras.layers.Input(shape=arch.input_shape)
    elif not keras.backend.is_keras_tensor(arch.input_tensor):
        inputs = keras.layers.Input(tensor=arch.input_tensor, shape=arch.input_shape)
    else:
        inputs = arch.input_tensor
    x = inputs
    if arch.preprocessing is not None:
        mean, std = arch.preprocessing
        x = kp_layers.Normalize(mean, std, axis=ctx.channel_axis, name="preprocessing")(x)

    x = _stem(x, arch)

    # Stages of residual units; stochastic depth rises linearly over the units.
    n_units = sum(arch.stage_blocks)
    index = 0
    for s, (width, strides) in enumerate(zip(arch.widths, _unit_strides(arch))):
        b = 0
        while b < len(strides):
            kwargs = dict(
                block=arch.block,
                filters=width,
                stride=strides[b],
                first=index == 0,
                shortcut=arch.shortcut,
                ctx=ctx,
                drop_path_rate=arch.drop_path_rate * index / max(n_units - 1, 1),
            )
            # scan_units: after a stage's first unit, the units of stride 1 keep the shape
            # and differ only in their weights; one `Scan` layer applies them in a loop.
            run = _run_of_stride_1(strides, b) if arch.scan_units and b > 0 else 1
            names = [f"conv{s + 2}_block{c + 1}" for c in range(b, b + run)]
            if run > 1:
                x = kp_scan.scan_units(x, arch.unit, names=names, **kwargs)
            else:
                x = arch.unit(x, name=names[0], **kwargs)
            b += run
            index += run

    # Head: the extra activation after the last unit (appendix), pooling, classifier.
    out_dtype = _output_dtype()
    head = getattr(arch.unit, "head", None)
    if head:
        x = ctx.act(x, head, name="post")
    if arch.include_top:
        x = keras.layers.GlobalAveragePooling2D(data_format=ctx.data_format, name="avg_pool")(x)
        x = keras.layers.Dense(
            arch.classes,
            activation=arch.classifier_activation,
            kernel_initializer=torch_linear_init(),
            bias_initializer="zeros",
            dtype=out_dtype,
            name="predictions",
        )(x)
    elif arch.pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(
            data_format=ctx.data_format, dtype=out_dtype, name="avg_pool"
        )(x)
    elif arch.pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(
            data_format=ctx.data_format, dtype=out_dtype, name="max_pool"
        )(x)
    elif out_dtype is not None:
        x = keras.layers.Activation("linear", dtype=out_dtype, name="output_float32")(x)

    if arch.input_tensor is not None:
        inputs = keras.utils.get_source_inputs(arch.input_tensor)
    record = arch.weights.record if arch.weights is not None else None
    known = record is not None and record.dataset != "local"  # a file without a record
    model = PreActResNetModel(
        inputs, x, name=arch.name, weights_record=record.name if known else None
    )
    # What `load_weights` needs to build this net with the other `scan_units` (not part of
    # the config: a model rebuilt from one has none, and says so).
    model._twin_spec = dataclasses.replace(arch, input_tensor=None, weights=None)
    return model


def _weights_file_structure(filepath):
    """`(has Scan layers, has optimizer variables)` of a Keras `.weights.h5`, else None.

    Keras names a Functional model's groups by layer class and order (`layers/conv2d_7`,
    `layers/scan_1`), not by layer name, so a `Scan` layer shows as `layers/scan*`.
    """
    h5py = require("h5py")

    if not isinstance(filepath, (str, os.PathLike)):
        return None
    path = os.fspath(filepath)
    if not path.endswith(".weights.h5") or not os.path.isfile(path):
        return None
    try:
        with h5py.File(path, "r") as f:
            layers, optimizer = f.get("layers"), f.get("optimizer/vars")
            if not isinstance(layers, h5py.Group):
                return None
            scanned = any(re.fullmatch(r"scan(_\d+)?", k) for k in layers)
            return scanned, isinstance(optimizer, h5py.Group) and len(optimizer) > 0
    except OSError:  # not HDF5: Keras' own error says so
        return None


def _load_other_structure(model, filepath, scanned, optimizer_state, **kwargs):
    """Loads a `.weights.h5` of the other `scan_units` structure through a twin of `model`
    with the file's structure, then `keras_preact.scan.copy_weights(twin, model)`."""
    path, want = os.fspath(filepath), f"scan_units={scanned}"
    what = (
        f"{path} holds the weights of a {want} net; model {model.name!r} is a "
        f"scan_units={not scanned} net"
    )
    route = (
        f"Build the same net with {want} (the file's structure), load the file into it, then "
        "keras_preact.scan.copy_weights(that_net, model)."
    )
    spec = getattr(model, "_twin_spec", None)
    if spec is None:
        raise ValueError(
            f"{what}, rebuilt from a config or a .keras file without its builder arguments, "
            f"so it cannot convert the file itself. {route}"
        )
    if optimizer_state and getattr(model, "optimizer", None) is not None:
        raise ValueError(
            f"{what}, and compiled: the file's optimizer variables (a training checkpoint) "
            f"do not convert between the two structures. Resume with {want}, or load the "
            f"weights alone into an uncompiled model. {route}"
        )
    try:
        twin = _graph(dataclasses.replace(spec, scan_units=scanned))
        if kwargs.get("skip_mismatch") or set(kwargs) - {"skip_mismatch"}:
            twin.load_weights(path, **kwargs)
        else:  # with its checks of the file against the twin's variables
            kp_weights.load_weights_file(twin, path)
    except MissingDependency:
        raise
    except Exception as e:
        first_line = str(e).strip().split("\n")[0]  # Keras appends whole variable values
        raise ValueError(
            f"{what}; it did not load into the {want} twin of the model either: "
            f"{type(e).__name__}: {first_line} Is it for another architecture? {route}"
        ) from e
    kp_scan.copy_weights(twin, model)


@keras.saving.register_keras_serializable(package="keras_preact")
class PreActResNetModel(keras.Model):
    """The Functional model every builder returns; it remembers its weights record.

    `model.weights_record` is the name of the record whose weights the builder loaded
    (`"imagenet:fb_torch"`), or None (no weights, or a file without a record). It is part
    of the model's config, so it survives `get_config`/`from_config` and `.keras` files
    (`keras.models.load_model` after `import keras_preact`), and
    `keras_preact.preprocess_input(x, model=model)` reads it.
    """

    def __init__(self, inputs, outputs, name=None, **kwargs):
        weights_record = kwargs.pop("weights_record", None)
        super().__init__(inputs, outputs, name=name, **kwargs)
        self.weights_record = weights_record

    def get_config(self):
        return {**super().get_config(), "weights_record": self.weights_record}

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """`keras.Model.load_weights`, and a `.weights.h5` of the other `scan_units`
        structure loads too: through a twin of the model with the file's structure and
        `keras_preact.scan.copy_weights` (Keras alone fails with "... objects could not be
        loaded"). A model rebuilt from a config or a `.keras` file cannot build its twin
        and raises a ValueError that names that route. See `docs/models.md`.
        """
        found = _weights_file_structure(filepath)
        scanned = any(isinstance(layer, kp_scan.Scan) for layer in self.layers)
        if found is None or found[0] == scanned:
            return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
        _load_other_structure(self, filepath, *found, skip_mismatch=skip_mismatch, **kwargs)


# -- The generic builder -------------------------------------------------------------------


def PreActResNet(
    *,
    depth=None,
    family="cifar",
    block=None,
    stage_blocks=None,
    width_multiplier=1,
    unit="full_preact",
    shortcut="identity",
    layout=None,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=None,
    classifier_activation="softmax",
    include_preprocessing=False,
    preprocessing=None,
    name=None,
    data_format=None,
    bn_momentum=0.9,
    kernel_initializer="he_normal_fan_out",
    drop_path_rate=0.0,
    zero_init_residual=False,
    seed=None,
    scan_units=False,
    **removed,
):
    """Builds a pre-activation ResNet of any depth as a Functional `keras.Model`.

    Architecture (the paper's appendix): a stem (CIFAR: 3x3 conv with 16 filters; ImageNet:
    7x7/2 conv with 64 filters and a 3x3/2 max-pool) followed by BN-ReLU, three (CIFAR) or
    four (ImageNet) stages of residual units, a final BN-ReLU for pre-activation units, global
    average pooling and a fully connected classifier. The first unit uses the activation right
    after conv1 for both of its paths; projection shortcuts are used only when the number of
    channels changes, and then share the unit's pre-activation.

    Choices the paper leaves open (defaults are the paper's reference code): where a
    downsampling unit strides, the stem, conv biases, BN epsilon and what a pre-activation
    feeds are the `layout=` (`keras_preact.Layout`; presets "paper", "timm", "keras", "fb",
    "fb_legacy"); BN momentum 0.9 in Keras' convention (Torch's 0.1); conv kernels
    N(0, sqrt(2 / (k*k*c_out))) ("as in [23]", fan-out He init); the classifier is Torch's
    default U(+-1/sqrt(fan_in)) with zero bias. `docs/models.md` explains each choice.

    Args:
        depth: network depth; picks `block` and `stage_blocks` for the named depths
            (ImageNet 18/34/50/101/152/200; CIFAR 6n+2 basic, 9n+2 bottleneck, 3n+2 one-layer).
        family: `"cifar"` or `"imagenet"`: stem, number of stages and widths.
        block: `"basic"`, `"bottleneck"` or `"one_layer"`.
        stage_blocks: units per stage, overriding the depth table.
        width_multiplier: multiplies every stage width (a wide pre-activation ResNet).
        unit: a Fig. 4 unit name (`"original"`, `"bn_after_add"`, `"relu_before_add"`,
            `"relu_preact"`, `"full_preact"`) or a callable; see `keras_preact.units`.
        shortcut: a Fig. 2 shortcut name (`"identity"`, `"constant_scaling"`,
            `"exclusive_gating"`, `"shortcut_only_gating"`, `"conv1x1"`, `"dropout"`), a
            `keras_preact.shortcuts` factory's result, or a callable.
        layout: a `keras_preact.Layout` or a preset name; default: the weights record's
            layout, else `"paper"`. A layout that contradicts the record raises.
        include_top: whether to add pooling and the classifier.
        weights: `None`, a path to a weights file (a Keras 3 `.weights.h5`, this package's
            `.h5`, or an upstream file: keras.applications `.h5`, timm `.safetensors`,
            fb.resnet.torch `.t7`), or a weights record (`"imagenet"`, `"fashion_mnist"`,
            `"<dataset>:<tag>"`); see `docs/weights.md`.
        input_tensor: optional Keras tensor to build the model on.
        input_shape: `(height, width, channels)` (or channels first); spatial sides may be
            None. Defaults: `input_tensor`'s shape, else the weights record's, else
            (32, 32, 3) CIFAR, (224, 224, 3) ImageNet; with `include_top=False` the height
            and width default to None (any size, as keras.applications). With
            `input_tensor` it must match the tensor's shape (a None entry matches any
            size), or it raises.
        pooling: with `include_top=False`: None (4D output), `"avg"` or `"max"`.
        classes: number of classes (default: the weights', else 10 CIFAR, 1000 ImageNet).
        classifier_activation: activation of the classifier (a `keras.activations` name or
            a callable); None returns logits.
        include_preprocessing: if True the model takes RGB (or grey) pixels in [0, 255], of
            any dtype (uint8 included), and its first layer (`preprocessing`) applies the
            weights record's normalization, or `preprocessing=`'s.
        preprocessing: with `include_preprocessing=True` and weights without a record: a
            mode (`"imagenet_torch"`, `"inception"`, `"fashion_mnist"`) or a `(mean, std)`
            pair of per-channel values in [0, 1] units (e.g. a dataset's statistics): every
            mean in [0, 1], every std in (0, 1]; [0, 255] statistics raise (divide by 255).
        name: model name (default `preact_resnet{depth}`).
        data_format: `"channels_last"` or `"channels_first"`; default: Keras' config.
        bn_momentum: BatchNorm momentum, Keras convention (paper's code: Torch 0.1 = 0.9).
        kernel_initializer: conv kernel initializer (a `keras.initializers` name or
            object); default `"he_normal_fan_out"`, fan-out He normal.
        drop_path_rate: stochastic depth, rising linearly from 0 to this rate over the
            units (beyond the paper).
        zero_init_residual: start every residual branch at zero (beyond the paper).
        seed: base seed of the random layers (dropout shortcut, drop path); each layer
            derives its own.
        scan_units: if True, the units of a stage after its first that keep its shape
            (stride 1) become one `keras_preact.scan.Scan` layer that loops over their
            stacked weights, so a traced training step holds one unit per stage whatever
            the depth: JAX/XLA compile PreActResNet1001 as fast as PreActResNet164. Same
            outputs, gradients, BatchNorm updates and parameter count; but the units' own
            layers (`conv2_block5_1_conv`, ...) are replaced by one layer per stage
            (`conv2_block2_to_18_out`), `get_weights()` has another layout (convert with
            `keras_preact.scan.copy_weights`), and drop path and the dropout shortcut are
            refused. `weights=` and `model.load_weights` load files of either structure
            (`docs/models.md`). On CPUs an XLA-compiled training step runs
            several times slower (the loop's backward convolutions miss XLA:CPU's fast
            kernels). See `docs/models.md`.

    Returns:
        A `keras.Model` (`PreActResNetModel`, whose `weights_record` names the record loaded).

    Example:

    >>> import keras_preact
    >>> model = keras_preact.PreActResNet(depth=110, block="one_layer", family="cifar",
    ...                                   input_shape=(32, 32, 3), classes=10)
    >>> model.name
    'preact_resnet110'
    """
    if removed:
        moved = sorted(k for k in removed if k in _LAYOUT_KEYWORDS)
        if moved:
            example = ", ".join(f"{k}={removed[k]!r}" for k in moved)
            raise TypeError(
                f"{moved} are options of layout=, not builder arguments: pass "
                f"layout=keras_preact.Layout.get('paper').replace({example}), or a preset "
                f"name in {list(LAYOUTS)}."
            )
        raise TypeError(f"PreActResNet got unexpected keyword arguments {sorted(removed)}.")
    arch = _resolve(
        depth=depth,
        family=family,
        block=block,
        stage_blocks=stage_blocks,
        width_multiplier=width_multiplier,
        unit=unit,
        shortcut=shortcut,
        layout=layout,
        include_top=include_top,
        weights=weights,
        input_tensor=input_tensor,
        input_shape=input_shape,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        include_preprocessing=include_preprocessing,
        preprocessing=preprocessing,
        name=name,
        data_format=data_format,
        bn_momentum=bn_momentum,
        kernel_initializer=kernel_initializer,
        drop_path_rate=drop_path_rate,
        zero_init_residual=zero_init_residual,
        seed=seed,
        scan_units=scan_units,
    )
    model = _graph(arch)
    if arch.weights is not None:
        _load(model, arch)
    return model


def _load(model, arch):
    """Loads the resolved weights; a scanned model gets them through a written-out twin,
    since weights files name the units' own layers."""
    if not arch.scan_units:
        found = None if arch.weights.record else _weights_file_structure(arch.weights.path)
        if found is not None and found[0]:
            # A scanned net's `.weights.h5`: `load_weights` converts it, through a scanned
            # twin (weights.load_weights_file would refuse the stacked datasets here, each
            # larger than any variable of this net).
            model.load_weights(arch.weights.path)
            return
        kp_weights.load(model, arch.weights)
        return
    if arch.weights.record is None:
        try:  # A Keras `.weights.h5` saved from a scanned model has the scanned structure.
            kp_weights.load(model, arch.weights)
            return
        except ValueError as e:
            scanned_error = e
    plain = _graph(dataclasses.replace(arch, scan_units=False))
    try:
        kp_weights.load(plain, arch.weights)
    except ValueError as e:
        if arch.weights.record is None:
            raise ValueError(
                f"{e} (It did not load into the scan_units=True structure either: {scanned_error})"
            ) from e
        raise
    kp_scan.copy_weights(plain, model)


# -- Named entry points ----------------------------------------------------------------------


def _named(model_name, kwargs):
    """Builds the row of `MODELS` named `model_name` with the caller's keyword arguments."""
    fixed = sorted(set(kwargs) & set(MODELS[model_name]))
    if fixed:
        raise TypeError(
            f"{model_name} fixes {', '.join(f'`{k}`' for k in fixed)}; use "
            "keras_preact.PreActResNet for another value."
        )
    return PreActResNet(**MODELS[model_name], **kwargs)


def _doc_sections(doc):
    """`PreActResNet`'s docstring as `{heading: lines}` (the text before "Args:" is "")."""
    sections, heading = {"": []}, ""
    for line in doc.splitlines():
        if line.startswith("    ") and not line.startswith("     ") and line.strip().endswith(":"):
            heading = line.strip()[:-1]
            sections[heading] = []
        else:
            sections[heading].append(line)
    return sections


#: keras.applications' arguments, which the named builders list first, in its order.
_KERAS_ARGS = ("include_top", "weights", "input_tensor", "input_shape", "pooling", "classes",
               "classifier_activation")  # fmt: skip


def _named_parameters(row):
    """The generic builder's keyword parameters that the row leaves open, keras' first."""
    params = inspect.signature(PreActResNet).parameters.values()
    params = [p for p in params if p.kind is p.KEYWORD_ONLY and p.name not in row]
    order = {name: i for i, name in enumerate(_KERAS_ARGS)}
    return sorted(params, key=lambda p: order.get(p.name, len(order)))


def _args_entries(lines):
    """The `Args:` section as `{name: lines}` (an 8-space name line and its deeper
    continuation lines)."""
    entries, name = {}, None
    for line in lines:
        if line.startswith(" " * 8) and not line.startswith(" " * 9):
            name = line.strip().split(":")[0]
            entries[name] = []
        if name is not None and line.strip():
            entries[name].append(line)
    return entries


def _named_doc(model_name, row, params):
    depth, family, block, blocks = (row[k] for k in ("depth", "family", "block", "stage_blocks"))
    records = [r.name for r in kp_weights.list_records(model=model_name)]
    if records:
        weights = f"Weights records: {', '.join(repr(r) for r in records)} (`docs/weights.md`)."
    else:
        weights = "No published weights; `weights=` also takes a weights file."
    fixed = ", ".join(f"{k}={row[k]!r}" for k in ("depth", "family", "block", "stage_blocks"))
    size = "224x224x3 and 1000 classes" if family == "imagenet" else "32x32x3 and 10 classes"
    intro = textwrap.fill(
        f"`keras_preact.PreActResNet({fixed})`, taking every other argument of the generic "
        f"builder. Default input {size}; with `include_top=False`, any height and width. "
        f"{weights} Architecture, layer names and every deviation from the paper: "
        "`docs/models.md`.",
        width=88,
        initial_indent="    ",
        subsequent_indent="    ",
        break_on_hyphens=False,
    )
    sections = _doc_sections(PreActResNet.__doc__)
    entries = _args_entries(sections["Args"])
    args = "\n".join(line for p in params for line in entries[p.name])
    returns = "\n".join(sections["Returns"]).rstrip()
    return f"""Pre-activation ResNet-{depth} (He et al., ECCV 2016): {family} family, {block} units,
    {blocks} per stage.

{intro}

    Args:
{args}

    Returns:
{returns}

    Raises:
        ValueError: for an invalid argument value, naming it and the allowed values.
        TypeError: for an unknown keyword, or one of the four fixed above.

    Example:

        model = keras_preact.{model_name}(weights=None, include_top=False, pooling="avg")
    """


def _named_builder(model_name):
    """The entry point `model_name`: a `PreActResNet` row whose signature and docstring are
    derived from the generic builder's, so `help()` and IDEs show every argument."""
    row = MODELS[model_name]

    def builder(**kwargs):
        return _named(model_name, kwargs)

    params = _named_parameters(row)
    builder.__signature__ = inspect.Signature(params)
    builder.__name__ = builder.__qualname__ = model_name
    builder.__doc__ = _named_doc(model_name, row, params)
    return builder


PreActResNet18 = _named_builder("PreActResNet18")
PreActResNet34 = _named_builder("PreActResNet34")
PreActResNet50 = _named_builder("PreActResNet50")
PreActResNet101 = _named_builder("PreActResNet101")
PreActResNet152 = _named_builder("PreActResNet152")
PreActResNet200 = _named_builder("PreActResNet200")
PreActResNet20 = _named_builder("PreActResNet20")
PreActResNet32 = _named_builder("PreActResNet32")
PreActResNet44 = _named_builder("PreActResNet44")
PreActResNet56 = _named_builder("PreActResNet56")
PreActResNet110 = _named_builder("PreActResNet110")
PreActResNet164 = _named_builder("PreActResNet164")
PreActResNet1001 = _named_builder("PreActResNet1001")

_BUILDERS = {name: globals()[name] for name in MODELS}


def list_models():
    """Names of every named builder, ImageNet family first, by depth.

    >>> import keras_preact
    >>> keras_preact.list_models()[:3]
    ['PreActResNet18', 'PreActResNet34', 'PreActResNet50']
    """
    return list(MODELS)


def get_model(name, **kwargs):
    """Builds a named model: `get_model("PreActResNet164", classes=10)`.

    Raises:
        ValueError: for an unknown name, listing the names.
    """
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"Unknown model name={name!r}. Allowed: {list_models()}.")
    return _BUILDERS[name](**kwargs)


# -- Backbone view -----------------------------------------------------------------------------


def _downsamples(model, prefix):
    """Whether any layer of the unit named `prefix` has a stride > 1."""
    return any(
        layer.name.startswith(f"{prefix}_") and max(getattr(layer, "strides", None) or (1,)) > 1
        for layer in model.layers
    )


def _feature_levels(model):
    """`{level: layer name}` of a built model: `"stem"` (conv1, after its BN-ReLU where the
    layout has one), then each stage's output (see `feature_extractor`)."""
    names = [layer.name for layer in model.layers]
    unit_outs = {}
    for n in names:
        if n.endswith("_out") and "_block" in n:
            unit_outs.setdefault(n.split("_block")[0], []).append(n)
    if not unit_outs:
        raise ValueError(f"Model {model.name!r} has no `conv*_block*_out` layers.")
    levels = {}
    for stem in ("conv1_relu", "conv1_conv"):
        if stem in names:
            levels["stem"] = stem
            break
    for stage, outs in unit_outs.items():
        levels[stage] = outs[-1]
        # downsample_in="last_unit": a later unit that strides already has the next stage's
        # resolution; the stage's feature is the output just before it.
        for prev, n in zip(outs, outs[1:]):
            if _downsamples(model, n[: -len("_out")]):
                levels[stage] = prev
                break
    if "post_relu" in names:
        # Pre-activation sums are not normalized; the deepest feature is the final BN-ReLU.
        levels[list(unit_outs)[-1]] = "post_relu"
    return levels


def feature_extractor(model, out_indices=None):
    """A backbone view of a built model: a `keras.Model` returning a dict of feature maps.

    The feature levels, in order (timm's `features_only` / `out_indices` convention):

    | index | key | ImageNet family: stride, channels (x width_multiplier) | CIFAR family |
    | --- | --- | --- | --- |
    | 0 | `"stem"` | 2, 64 (`conv1`, before the max-pool) | 1, 16 |
    | 1 | `"conv2"` | 4, 64 basic / 256 bottleneck | 1, 16 / 64 |
    | 2 | `"conv3"` | 8, 128 / 512 | 2, 32 / 128 |
    | 3 | `"conv4"` | 16, 256 / 1024 | 4, 64 / 256 |
    | 4 | `"conv5"` | 32, 512 / 2048 | (none) |

    The stem level is conv1's output, after its BN-ReLU where the layout has one; a stage's
    level is its last unit's output (with `downsample_in="last_unit"`, the output before the
    stage's strided last unit, so the strides stay as listed), except that the deepest
    stage uses the final `post_relu` where the network has one, since pre-activation sums
    are not normalized (timm's `features_only` makes the same choice). Built on the same
    layers, so it shares weights with `model`.

    Args:
        model: a model built by this package (any `include_top`).
        out_indices: the levels to return, as indices into the table (negative ones count
            from the deepest); default: every stage, `(1, 2, 3, 4)` ImageNet and
            `(1, 2, 3)` CIFAR.

    Returns:
        A `keras.Model` whose output is a dict `{key: feature map}`, in index order.

    Raises:
        ValueError: for a model without this package's layer names, or an out_indices
            entry that is not an int in range or repeats one (the message lists the levels).

    Example:

    >>> import keras_preact
    >>> model = keras_preact.PreActResNet18(include_top=False, input_shape=(64, 64, 3))
    >>> backbone = keras_preact.feature_extractor(model)
    >>> {k: tuple(v.shape[1:3]) for k, v in backbone.output.items()}
    {'conv2': (16, 16), 'conv3': (8, 8), 'conv4': (4, 4), 'conv5': (2, 2)}
    >>> backbone = keras_preact.feature_extractor(model, out_indices=(0, -1))
    >>> {k: tuple(v.shape[1:3]) for k, v in backbone.output.items()}
    {'stem': (32, 32), 'conv5': (2, 2)}
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"feature_extractor expects a built keras.Model, got {model!r}; build one first, "
            "e.g. feature_extractor(keras_preact.get_model('PreActResNet20'))."
        )
    levels = _feature_levels(model)
    keys = list(levels)
    if out_indices is None:
        out_indices = range(1, len(keys))
    allowed = ", ".join(f"{i}: {k!r}" for i, k in enumerate(keys))
    if not isinstance(out_indices, (list, tuple, range)):
        raise ValueError(
            f"Invalid out_indices={out_indices!r}: expected a list or tuple of level indices "
            f"of {model.name!r} ({allowed}; negative ones count from the end)."
        )
    picked = []
    for i in out_indices:
        ok = isinstance(i, numbers.Integral) and not isinstance(i, bool)
        if not ok or not -len(keys) <= i < len(keys):
            raise ValueError(
                f"Invalid out_indices={tuple(out_indices)!r}: {i!r} is not a level of "
                f"{model.name!r}. Allowed: ints in [{-len(keys)}, {len(keys) - 1}] ({allowed})."
            )
        key = keys[int(i)]
        if key in picked:
            raise ValueError(
                f"Invalid out_indices={tuple(out_indices)!r}: level {key!r} is named twice."
            )
        picked.append(key)
    picked.sort(key=keys.index)
    outputs = {k: model.get_layer(levels[k]).output for k in picked}
    inputs = model.input if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, outputs, name=f"{model.name}_features")
