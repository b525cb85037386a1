"""Pre-activation ResNets: He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks",
ECCV 2016 (arXiv 1603.05027), "the paper"; [1] is the original ResNet (arXiv 1512.03385).

Reading order: the tables of families and depths, the generic `PreActResNet` builder, then
one three-line entry point per named depth. Layer names follow keras.applications'
`resnet_v2` (`conv1_conv`, `conv2_block1_preact_bn`, ..., `conv5_block3_out`, `post_bn`,
`predictions`); `docs/models.md` lists the whole scheme and every deviation from the paper.
"""

import keras

from keras_preact import layers as kp_layers
from keras_preact import shortcuts as kp_shortcuts
from keras_preact import units as kp_units
from keras_preact import weights as kp_weights
from keras_preact.context import (
    PAPER_LAYOUT,
    PREACT_SCOPES,
    BuildContext,
    conv_bias_places,
    torch_linear_init,
)

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

#: The paper's defaults for the options a pretrained-weights layout may override.
LAYOUT_DEFAULTS = PAPER_LAYOUT
_CHOICES = {
    "family": tuple(FAMILIES),
    "stride_in": ("first_conv", "3x3"),
    "downsample_in": ("first_unit", "last_unit"),
    "stem_pool_padding": ("zeros", "neg_inf"),
    "preact_scope": PREACT_SCOPES,
    "pooling": (None, "avg", "max"),
    "data_format": (None, "channels_last", "channels_first"),
}


def _check_choice(arg, value):
    if value not in _CHOICES[arg]:
        raise ValueError(f"Invalid {arg}={value!r}. Allowed: {_CHOICES[arg]}.")


def _stage_blocks(family, depth, block, stage_blocks):
    """Resolves (block, stage_blocks) from a depth, or checks them against it."""
    if block is not None and block not in kp_units.BLOCKS:
        raise ValueError(f"Unknown block={block!r}. Allowed: {sorted(kp_units.BLOCKS)}.")
    if stage_blocks is not None:
        stage_blocks = tuple(int(n) for n in stage_blocks)
        n_stages = len(FAMILIES[family]["strides"])
        if len(stage_blocks) != n_stages or min(stage_blocks) < 1:
            raise ValueError(
                f"stage_blocks={stage_blocks} must give {n_stages} positive unit counts "
                f"for family={family!r}."
            )
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


def _input_shape(family, input_shape, data_format, input_tensor):
    default = FAMILIES[family]["input_shape"]
    if input_shape is None and input_tensor is not None:
        input_shape = tuple(input_tensor.shape[1:])
    if input_shape is None:
        input_shape = default if data_format == "channels_last" else default[-1:] + default[:2]
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape={input_shape} must have 3 entries (height, width, channels) "
            f"for {data_format}."
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
    return input_shape


def _stem(x, ctx, family, stem_width, stem_pool_padding):
    if family == "cifar":
        # CIFAR: one 3x3 conv with 16 filters ([1], Sec. 4.2).
        x = ctx.conv(x, stem_width, 3, name="conv1_conv", bias_place="stem")
        if ctx.stem_norm:
            x = ctx.act(x, "bn_relu", name="conv1")
        return x
    x = ctx.conv(x, stem_width, 7, stride=2, name="conv1_conv", bias_place="stem")
    if ctx.stem_norm:
        x = ctx.act(x, "bn_relu", name="conv1")
    # After a ReLU, zero padding equals the -inf padding of Torch's max-pool.
    if stem_pool_padding == "neg_inf" and not ctx.stem_norm:
        x = kp_layers.ConstantPadding2D(
            1, float("-inf"), data_format=ctx.data_format, name="pool1_pad"
        )(x)
    else:
        x = keras.layers.ZeroPadding2D(1, data_format=ctx.data_format, name="pool1_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, data_format=ctx.data_format, name="pool1_pool")(
        x
    )


def _output_dtype():
    policy = keras.config.dtype_policy()
    if policy.compute_dtype in ("float16", "bfloat16") and policy.variable_dtype == "float32":
        return "float32"  # Mixed precision: the model's outputs stay float32.
    return None


def PreActResNet(
    *,
    depth=None,
    family="cifar",
    block=None,
    stage_blocks=None,
    width_multiplier=1,
    unit="full_preact",
    shortcut="identity",
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=None,
    classifier_activation="softmax",
    name=None,
    data_format=None,
    stride_in=None,
    downsample_in=None,
    stem_norm=None,
    stem_pool_padding=None,
    conv_bias=None,
    bn_epsilon=None,
    preact_scope=None,
    bn_momentum=0.9,
    kernel_initializer="he_normal_fan_out",
    drop_path_rate=0.0,
    zero_init_residual=False,
    seed=None,
):
    """Builds a pre-activation ResNet of any depth as a Functional `keras.Model`.

    Architecture (the paper's appendix): a stem (CIFAR: 3x3 conv with 16 filters; ImageNet:
    7x7/2 conv with 64 filters and a 3x3/2 max-pool) followed by BN-ReLU, three (CIFAR) or
    four (ImageNet) stages of residual units, a final BN-ReLU for pre-activation units, global
    average pooling and a fully connected classifier. The first unit uses the activation right
    after conv1 for both of its paths; projection shortcuts are used only when the number of
    channels changes, and then share the unit's pre-activation.

    Choices the paper leaves open, all settable (defaults are the paper's reference code):
    the stride sits on the first conv of a unit (`stride_in`), in the first unit of a stage
    (`downsample_in`); no convolution has a bias (`conv_bias`); BN epsilon 1e-5 and momentum
    0.9 in Keras' convention (Torch's 0.1); conv kernels N(0, sqrt(2 / (k*k*c_out)))
    ("as in [23]", fan-out He init); the classifier is Torch's default U(+-1/sqrt(fan_in))
    with zero bias. `docs/models.md` explains each choice.

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
            `"exclusive_gating"`, `"shortcut_only_gating"`, `"conv1x1"`, `"dropout"`) or a
            callable; see `keras_preact.shortcuts` for the parameterized factories.
        include_top: whether to add pooling and the classifier.
        weights: `None`, a path to a `.weights.h5` file, or a weights record
            (`"imagenet"`, `"fashion_mnist"`, `"<dataset>:<tag>"`); see `docs/weights.md`.
        input_tensor: optional Keras tensor to build the model on.
        input_shape: `(height, width, channels)` (or channels first); spatial sides may be
            None. Defaults: (32, 32, 3) CIFAR, (224, 224, 3) ImageNet.
        pooling: with `include_top=False`: None (4D output), `"avg"` or `"max"`.
        classes: number of classes (default 10 for CIFAR, 1000 for ImageNet, or the weights').
        classifier_activation: activation of the classifier; None returns logits.
        name: model name.
        data_format: `"channels_last"` or `"channels_first"`; default: Keras' config.
        stride_in: `"first_conv"` (paper) or `"3x3"` (fb.resnet.torch, timm, keras).
        downsample_in: `"first_unit"` (paper) or `"last_unit"` (keras.applications ResNetV2,
            whose strided unit subsamples its shortcut with a 1x1 max-pool).
        stem_norm: BN-ReLU after conv1 (paper: True; timm and keras.applications: False,
            the first unit then pre-activates both paths itself).
        stem_pool_padding: `"zeros"` or `"neg_inf"` border for the stem max-pool when the stem
            has no BN-ReLU (timm pools un-activated values with Torch's -inf padding).
        conv_bias: True, False, or a subset of `("stem", "projection", "residual_last",
            "residual_inner")` whose convolutions get a bias. Paper: none.
        bn_epsilon: BatchNorm epsilon (paper's code: 1e-5).
        preact_scope: what a unit's pre-activation feeds. `"shared"` (paper): both paths
            of a projection unit (its bare 1x1 conv reads the pre-activated input), and the
            first unit reuses the stem's BN-ReLU. `"branch"` (fb.resnet.torch's published
            ResNet-200): only the residual branch, in every unit including the first;
            projections are 1x1 conv-BN on the un-activated unit input. Units without
            pre-activation (Fig. 4 a-c) are the same under both.
        bn_momentum: BatchNorm momentum, Keras convention (paper's code: Torch 0.1 = 0.9).
        kernel_initializer: conv kernel initializer; default fan-out He normal.
        drop_path_rate: stochastic depth, rising linearly from 0 to this rate over the
            units (beyond the paper).
        zero_init_residual: start every residual branch at zero (beyond the paper).
        seed: seed for the random layers (dropout shortcut, drop path).

    Returns:
        A `keras.Model`.

    Example:

    >>> import keras_preact
    >>> model = keras_preact.PreActResNet(depth=110, block="one_layer", family="cifar",
    ...                                   input_shape=(32, 32, 3), classes=10)
    >>> model.name
    'preact_resnet110'
    """
    # 1. Validate every argument before building anything.
    _check_choice("family", family)
    _check_choice("pooling", pooling)
    _check_choice("data_format", data_format)
    data_format = data_format or keras.config.image_data_format()
    block, stage_blocks = _stage_blocks(family, depth, block, stage_blocks)
    depth = sum(stage_blocks) * kp_units.BLOCKS[block] + 2
    unit_fn = kp_units.make_unit(unit)
    merge_fn = kp_shortcuts.get(shortcut)
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate={drop_path_rate!r} must be in [0, 1).")
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier={width_multiplier!r} must be positive.")

    user_layout = {
        "stride_in": stride_in,
        "downsample_in": downsample_in,
        "stem_norm": stem_norm,
        "stem_pool_padding": stem_pool_padding,
        "conv_bias": conv_bias,
        "bn_epsilon": bn_epsilon,
        "preact_scope": preact_scope,
    }
    default_name = f"preact_resnet{depth}"
    record = kp_weights.resolve(
        weights,
        model_name=name or default_name,
        depth=depth,
        family=family,
        block=block,
        include_top=include_top,
        classes=classes,
        unit=unit,
        shortcut=shortcut,
        layout=user_layout,
    )
    layout = dict(LAYOUT_DEFAULTS)
    layout.update(record.layout if record is not None else {})
    layout.update({k: v for k, v in user_layout.items() if v is not None})
    if record is not None and classes is None:
        classes = record.classes
    if classes is None:
        classes = 10 if family == "cifar" else 1000
    if include_top and (not isinstance(classes, int) or classes < 1):
        raise ValueError(f"classes={classes!r} must be a positive integer.")
    for arg in ("stride_in", "downsample_in", "stem_pool_padding", "preact_scope"):
        _check_choice(arg, layout[arg])
    bias = conv_bias_places(layout["conv_bias"])
    head = getattr(unit_fn, "head", None)
    if not layout["stem_norm"] and isinstance(unit, str) and head is None:
        raise ValueError(
            f"stem_norm=False needs a pre-activation unit; unit={unit!r} post-activates, so "
            "its stem must end with BN-ReLU. Allowed with stem_norm=False: "
            "['full_preact', 'relu_preact']."
        )
    if record is not None and input_shape is None and input_tensor is None:
        input_shape = record.default_input_shape(data_format)
    input_shape = _input_shape(family, input_shape, data_format, input_tensor)

    ctx = BuildContext(
        data_format=data_format,
        bn_epsilon=float(layout["bn_epsilon"]),
        bn_momentum=float(bn_momentum),
        conv_bias=bias,
        kernel_initializer=kernel_initializer,
        zero_init_residual=bool(zero_init_residual),
        stem_norm=bool(layout["stem_norm"]),
        stride_in=layout["stride_in"],
        preact_scope=layout["preact_scope"],
        seed=seed,
    )
    spec = FAMILIES[family]
    widths = [int(round(w * width_multiplier)) for w in spec["widths"][block]]
    strides = list(spec["strides"])

    # 2. Input and stem.
    if input_tensor is None:
        img_input = keras.layers.Input(shape=input_shape)
    elif not keras.backend.is_keras_tensor(input_tensor):
        img_input = keras.layers.Input(tensor=input_tensor, shape=input_shape)
    else:
        img_input = input_tensor
    x = _stem(img_input, ctx, family, spec["stem_width"], layout["stem_pool_padding"])

    # 3. Stages. `downsample_in="last_unit"` moves each stage's stride to the previous
    # stage's last unit (keras.applications ResNetV2); the resolutions of the outputs match.
    n_units = sum(stage_blocks)
    index = 0
    for s, (n, width) in enumerate(zip(stage_blocks, widths)):
        for b in range(n):
            if layout["downsample_in"] == "first_unit":
                stride = strides[s] if b == 0 else 1
            else:
                nxt = strides[s + 1] if s + 1 < len(strides) else 1
                stride = nxt if b == n - 1 else 1
            rate = drop_path_rate * index / max(n_units - 1, 1)
            x = unit_fn(
                x,
                block=block,
                filters=width,
                stride=stride,
                first=index == 0,
                shortcut=merge_fn,
                ctx=ctx,
                name=f"conv{s + 2}_block{b + 1}",
                drop_path_rate=rate,
            )
            index += 1

    # 4. Head: the extra activation after the last unit (appendix), pooling, classifier.
    out_dtype = _output_dtype()
    if head:
        x = ctx.act(x, head, name="post")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(data_format=data_format, name="avg_pool")(x)
        x = keras.layers.Dense(
            classes,
            activation=classifier_activation,
            kernel_initializer=torch_linear_init(),
            bias_initializer="zeros",
            dtype=out_dtype,
            name="predictions",
        )(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(
            data_format=data_format, dtype=out_dtype, name="avg_pool"
        )(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(
            data_format=data_format, dtype=out_dtype, name="max_pool"
        )(x)
    elif out_dtype is not None:
        x = keras.layers.Activation("linear", dtype=out_dtype, name="output_float32")(x)

    inputs = keras.utils.get_source_inputs(input_tensor) if input_tensor is not None else img_input
    model = keras.Model(inputs, x, name=name or default_name)

    # 5. Weights.
    if weights is not None:
        kp_weights.load(model, weights, record)
    return model


def _named(model_name):
    """Creates a named builder: looks up its row of `MODELS` and calls `PreActResNet`."""
    row = MODELS[model_name]

    def builder(
        *,
        include_top=True,
        weights=None,
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=None,
        classifier_activation="softmax",
        name=None,
        unit="full_preact",
        shortcut="identity",
        **kwargs,
    ):
        for key in ("depth", "family", "block", "stage_blocks"):
            if key in kwargs:
                raise TypeError(
                    f"{model_name} fixes `{key}`; use keras_preact.PreActResNet for another."
                )
        return PreActResNet(
            **row,
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            name=name or f"preact_resnet{row['depth']}",
            unit=unit,
            shortcut=shortcut,
            **kwargs,
        )

    builder.__name__ = builder.__qualname__ = model_name
    family = row["family"]
    builder.__doc__ = (
        f"Pre-activation ResNet-{row['depth']} ({family} family, {row['block']} units, "
        f"{row['stage_blocks']} units per stage).\n\n"
        "Takes the keras.applications arguments (`include_top`, `weights`, `input_tensor`,\n"
        "`input_shape`, `pooling`, `classes`, `classifier_activation`, `name`), `unit=` and\n"
        "`shortcut=`, and every keyword option of `keras_preact.PreActResNet`.\n\n"
        "Example:\n\n"
        f">>> import keras_preact\n>>> model = keras_preact.{model_name}("
        + ("input_shape=(32, 32, 3), classes=10)\n" if family == "cifar" else "weights=None)\n")
    )
    return builder


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

PreActResNet18 = _named("PreActResNet18")
PreActResNet34 = _named("PreActResNet34")
PreActResNet50 = _named("PreActResNet50")
PreActResNet101 = _named("PreActResNet101")
PreActResNet152 = _named("PreActResNet152")
PreActResNet200 = _named("PreActResNet200")
PreActResNet20 = _named("PreActResNet20")
PreActResNet32 = _named("PreActResNet32")
PreActResNet44 = _named("PreActResNet44")
PreActResNet56 = _named("PreActResNet56")
PreActResNet110 = _named("PreActResNet110")
PreActResNet164 = _named("PreActResNet164")
PreActResNet1001 = _named("PreActResNet1001")


def list_models():
    """Names of every named builder, ImageNet family first, by depth."""
    return list(MODELS)


def get_model(name, **kwargs):
    """Builds a named model: `get_model("PreActResNet164", classes=10)`."""
    if name not in MODELS:
        raise ValueError(f"Unknown model name={name!r}. Allowed: {list_models()}.")
    return globals()[name](**kwargs)


def _downsamples(model, prefix):
    """Whether any layer of the unit named `prefix` has a stride > 1."""
    return any(
        layer.name.startswith(f"{prefix}_") and max(getattr(layer, "strides", None) or (1,)) > 1
        for layer in model.layers
    )


def feature_extractor(model):
    """A backbone view of a built model: a `keras.Model` returning a dict of stage outputs.

    Keys are the stage names (`"conv2"` ... `"conv5"` for ImageNet, `"conv2"` ... `"conv4"`
    for CIFAR); values the stage's last unit output (with `downsample_in="last_unit"`, the
    output before the stage's strided last unit, so strides stay 4/8/16/32), except that the deepest stage uses the
    final `post_relu` where the network has one, since pre-activation sums are not normalized
    (timm's `features_only` makes the same choice). Built on the same layers, so it shares
    weights with `model`.

    Example:

    >>> import keras_preact
    >>> backbone = keras_preact.feature_extractor(keras_preact.PreActResNet50(include_top=False))
    >>> sorted(backbone.output)
    ['conv2', 'conv3', 'conv4', 'conv5']
    """
    names = [layer.name for layer in model.layers]
    unit_outs = {}
    for n in names:
        if n.endswith("_out") and "_block" in n:
            unit_outs.setdefault(n.split("_block")[0], []).append(n)
    if not unit_outs:
        raise ValueError(f"Model {model.name!r} has no `conv*_block*_out` layers.")
    stages = {}
    for stage, outs in unit_outs.items():
        stages[stage] = outs[-1]
        # downsample_in="last_unit": a later unit that strides already has the next stage's
        # resolution; the stage's feature is the output just before it.
        for prev, n in zip(outs, outs[1:]):
            if _downsamples(model, n[: -len("_out")]):
                stages[stage] = prev
                break
    outputs = {k: model.get_layer(v).output for k, v in stages.items()}
    if "post_relu" in names:
        outputs[list(stages)[-1]] = model.get_layer("post_relu").output
    inputs = model.input if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, outputs, name=f"{model.name}_features")
