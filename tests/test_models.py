"""Named builders, layer names, layout choices, input handling and argument errors.

Big ImageNet models are built once per module (`named_model`) and checked symbolically;
forward passes run on small inputs (ImageNet family >= 32 px, CIFAR family 16 px).
"""

import functools

import keras
import numpy as np
import pytest
from model_test_utils import (
    assert_trains_one_step,
    builder_params,
    paper,
    random_inputs,
    run_model_checks,
    run_python,
    set_seeded_weights,
    tiny,
    to_numpy,
    trainable_count,
)

import keras_preact

# Initializations feed the thresholds of these tests.
pytestmark = pytest.mark.usefixtures("seeded")

IMAGENET = [n for n in keras_preact.list_models() if keras_preact.MODELS[n]["family"] == "imagenet"]
CIFAR = [n for n in keras_preact.list_models() if keras_preact.MODELS[n]["family"] == "cifar"]

#: Trainable parameters with the default head (1000 ImageNet / 10 CIFAR classes). Exact, so
#: any change of architecture shows up here (docs/models.md compares them with the paper).
TRAINABLE_PARAMS = {
    "PreActResNet18": 11_687_720,
    "PreActResNet34": 21_795_880,
    "PreActResNet50": 25_549_352,
    "PreActResNet101": 44_541_480,
    "PreActResNet152": 60_185_128,
    "PreActResNet200": 64_666_152,
    "PreActResNet20": 272_282,
    "PreActResNet32": 466_714,
    "PreActResNet44": 661_146,
    "PreActResNet56": 855_578,
    "PreActResNet110": 1_730_522,
    "PreActResNet164": 1_703_258,
    "PreActResNet1001": 10_327_706,
}


@functools.cache
def named_model(name):
    """Each named builder's default model, built once per test process."""
    return keras_preact.get_model(name)


@pytest.fixture(scope="module", autouse=True)
def _free_named_models():
    yield
    named_model.cache_clear()  # about 1 GB of ImageNet weights


def parents(model, layer_name):
    """Names of the layers whose outputs feed `layer_name`."""
    inputs = model.get_layer(layer_name).input
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return [t._keras_history.operation.name for t in inputs]


# --------------------------------------------------------------------------- named builders


@pytest.mark.parametrize("name", builder_params(keras_preact.list_models()))
def test_named_builder_default_shapes_and_params(name):
    model = named_model(name)
    cifar = name in CIFAR
    assert model.name == f"preact_resnet{keras_preact.MODELS[name]['depth']}"
    assert model.input_shape == ((None, 32, 32, 3) if cifar else (None, 224, 224, 3))
    assert model.output_shape == ((None, 10) if cifar else (None, 1000))
    assert trainable_count(model) == TRAINABLE_PARAMS[name]


@pytest.mark.parametrize("name", builder_params(keras_preact.list_models()))
def test_named_builder_headless_forward(name):
    """include_top=False with each pooling mode, a forward pass on a small input."""
    cifar = name in CIFAR
    pooling = (None, "avg", "max")[keras_preact.list_models().index(name) % 3]
    size = 16 if cifar else 32
    model = keras_preact.get_model(
        name, include_top=False, pooling=pooling, input_shape=(size, size, 3)
    )
    width = named_model(name).get_layer("predictions").input.shape[-1]
    side = size // (4 if cifar else 32)
    expected = (None, side, side, width) if pooling is None else (None, width)
    assert model.output_shape == expected
    assert "predictions" not in [layer.name for layer in model.layers]
    # Train mode: at init BN's moving statistics are the identity, so in inference mode the
    # unnormalized pre-activation sums of a 1001-layer net double per unit and overflow.
    out = to_numpy(model(random_inputs(model, batch=2), training=True))
    assert out.shape == (2, *expected[1:]) and np.all(np.isfinite(out))


@pytest.mark.parametrize("name", ["PreActResNet18", "PreActResNet20"])
def test_classes_and_logits_with_shared_checks(name, tmp_path):
    size = 32 if name == "PreActResNet18" else 16
    model = keras_preact.get_model(
        name, classes=7, classifier_activation=None, input_shape=(size, size, 3)
    )
    x = random_inputs(model)
    out = run_model_checks(model, x, expected_output_shape=(None, 7), tmp_path=tmp_path)
    assert not np.allclose(out.sum(axis=-1), 1.0)  # logits, not probabilities
    softmax = keras_preact.get_model(name, classes=7, input_shape=(size, size, 3))
    probs = to_numpy(softmax(x, training=False))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)


def test_named_builders_fix_their_layout():
    with pytest.raises(TypeError, match="PreActResNet164 fixes `depth`"):
        keras_preact.PreActResNet164(depth=110)
    with pytest.raises(ValueError, match=r"name='PreActResNet7'.*PreActResNet164"):
        keras_preact.get_model("PreActResNet7")


def test_named_depths_match_the_papers_tables():
    rows = keras_preact.MODELS
    assert rows["PreActResNet164"]["stage_blocks"] == (18, 18, 18)
    assert rows["PreActResNet1001"]["stage_blocks"] == (111, 111, 111)
    assert rows["PreActResNet110"]["stage_blocks"] == (18, 18, 18)
    assert rows["PreActResNet200"]["stage_blocks"] == (3, 24, 36, 3)
    assert rows["PreActResNet50"]["stage_blocks"] == (3, 4, 6, 3)


# --------------------------------------------------------------------------- layer names

#: The documented scheme on a depth-14 CIFAR net (2 basic units per stage), input excluded.
TINY_NAMES = [
    "conv1_conv", "conv1_bn", "conv1_relu",
    "conv2_block1_1_conv", "conv2_block1_1_bn", "conv2_block1_1_relu", "conv2_block1_2_conv",
    "conv2_block1_out",
    "conv2_block2_preact_bn", "conv2_block2_preact_relu", "conv2_block2_1_conv",
    "conv2_block2_1_bn", "conv2_block2_1_relu", "conv2_block2_2_conv", "conv2_block2_out",
    "conv3_block1_preact_bn", "conv3_block1_preact_relu", "conv3_block1_1_pad",
    "conv3_block1_1_conv", "conv3_block1_1_bn", "conv3_block1_1_relu", "conv3_block1_0_conv",
    "conv3_block1_2_conv", "conv3_block1_out",
    "conv3_block2_preact_bn", "conv3_block2_preact_relu", "conv3_block2_1_conv",
    "conv3_block2_1_bn", "conv3_block2_1_relu", "conv3_block2_2_conv", "conv3_block2_out",
    "conv4_block1_preact_bn", "conv4_block1_preact_relu", "conv4_block1_1_pad",
    "conv4_block1_1_conv", "conv4_block1_1_bn", "conv4_block1_1_relu", "conv4_block1_0_conv",
    "conv4_block1_2_conv", "conv4_block1_out",
    "conv4_block2_preact_bn", "conv4_block2_preact_relu", "conv4_block2_1_conv",
    "conv4_block2_1_bn", "conv4_block2_1_relu", "conv4_block2_2_conv", "conv4_block2_out",
    "post_bn", "post_relu", "avg_pool", "predictions",
]  # fmt: skip


def test_layer_name_scheme():
    model = tiny(depth=14)
    names = [layer.name for layer in model.layers[1:]]
    assert sorted(names) == sorted(TINY_NAMES)
    assert names == TINY_NAMES  # and the topological order


def test_imagenet_names_match_keras_applications_scheme():
    model = named_model("PreActResNet50")
    names = {layer.name for layer in model.layers}
    for n in ["conv1_conv", "pool1_pad", "pool1_pool", "conv2_block3_out", "conv3_block4_out",
              "conv4_block6_out", "conv5_block3_out", "conv5_block3_3_conv", "conv5_block1_0_conv",
              "post_bn", "post_relu", "avg_pool", "predictions"]:  # fmt: skip
        assert n in names, n
    assert "conv2_block1_preact_bn" not in names  # stem_norm: the first unit reuses conv1_relu


def test_first_unit_reuses_the_stem_activation():
    # Bottleneck: the first unit projects 16 -> 64 channels.
    model = tiny(depth=11, block="bottleneck")
    assert "conv2_block1_preact_bn" not in [layer.name for layer in model.layers]
    assert parents(model, "conv2_block1_1_conv") == ["conv1_relu"]
    assert parents(model, "conv2_block1_0_conv") == ["conv1_relu"]
    # Basic: identity first unit; its shortcut is conv1_relu too.
    model = tiny()
    assert parents(model, "conv2_block1_out") == ["conv1_relu", "conv2_block1_2_conv"]


def test_first_unit_preactivates_without_stem_norm():
    model = tiny(depth=11, block="bottleneck", layout=paper(stem_norm=False))
    names = [layer.name for layer in model.layers]
    assert "conv1_bn" not in names and "conv1_relu" not in names
    assert parents(model, "conv2_block1_preact_bn") == ["conv1_conv"]
    assert parents(model, "conv2_block1_1_conv") == ["conv2_block1_preact_relu"]
    assert parents(model, "conv2_block1_0_conv") == ["conv2_block1_preact_relu"]
    # Identity first unit: the branch pre-activates, the shortcut stays the raw conv1 output.
    model = tiny(layout=paper(stem_norm=False))
    assert parents(model, "conv2_block1_out") == ["conv1_conv", "conv2_block1_2_conv"]


def test_projection_units_share_their_preactivation():
    model = tiny(depth=14)
    for stage in (3, 4):
        assert parents(model, f"conv{stage}_block1_0_conv") == [f"conv{stage}_block1_preact_relu"]
        assert parents(model, f"conv{stage}_block1_1_pad") == [f"conv{stage}_block1_preact_relu"]
        # Projection shortcut of a pre-activation unit is a bare conv (no BN after it).
        assert parents(model, f"conv{stage}_block1_out") == [
            f"conv{stage}_block1_0_conv",
            f"conv{stage}_block1_2_conv",
        ]


def test_preact_scope_branch_preactivates_only_the_branch():
    # The published fb.resnet.torch ResNet-200: pre-activation inside every branch, the
    # first unit's included (after the stem's BN-ReLU), projections conv-BN on the raw input.
    model = tiny(depth=11, block="bottleneck", layout=paper(preact_scope="branch"))
    assert parents(model, "conv2_block1_preact_bn") == ["conv1_relu"]
    assert parents(model, "conv2_block1_1_conv") == ["conv2_block1_preact_relu"]
    assert parents(model, "conv2_block1_0_conv") == ["conv1_relu"]
    assert parents(model, "conv2_block1_out") == ["conv2_block1_0_bn", "conv2_block1_3_conv"]
    model = tiny(depth=14, layout=paper(preact_scope="branch"))
    for stage in (3, 4):
        assert parents(model, f"conv{stage}_block1_0_conv") == [f"conv{stage - 1}_block2_out"]
        assert parents(model, f"conv{stage}_block1_0_bn") == [f"conv{stage}_block1_0_conv"]
        assert parents(model, f"conv{stage}_block1_1_pad") == [f"conv{stage}_block1_preact_relu"]
    # Identity units are the same under both scopes.
    assert parents(model, "conv3_block2_out") == ["conv3_block1_out", "conv3_block2_2_conv"]


def test_preact_scope_is_moot_for_post_activation_units():
    shared, branch = (
        tiny(unit="original"),
        tiny(unit="original", layout=paper(preact_scope="branch")),
    )
    assert [layer.name for layer in shared.layers[1:]] == [
        layer.name for layer in branch.layers[1:]
    ]
    assert shared.count_params() == branch.count_params()


@pytest.mark.parametrize(
    "unit, head",
    [("full_preact", ["post_bn", "post_relu"]), ("relu_preact", ["post_relu"]),
     ("original", []), ("bn_after_add", []), ("relu_before_add", [])],
)  # fmt: skip
def test_last_unit_head(unit, head):
    model = tiny(unit=unit)
    names = [layer.name for layer in model.layers]
    assert names[names.index("conv4_block1_out") + 1 : names.index("avg_pool")] == head
    assert parents(model, "avg_pool") == [head[-1] if head else "conv4_block1_out"]


def test_post_activation_units_project_with_conv_bn():
    model = tiny(unit="original")
    assert parents(model, "conv3_block1_add") == ["conv3_block1_0_bn", "conv3_block1_2_bn"]
    assert parents(model, "conv3_block1_out") == ["conv3_block1_add"]
    assert parents(model, "conv3_block1_0_conv") == ["conv2_block1_out"]


# --------------------------------------------------------------------------- layout choices


def test_stride_position_bottleneck():
    first = tiny(depth=11, block="bottleneck")  # stride_in="first_conv"
    assert first.get_layer("conv3_block1_1_conv").strides == (2, 2)
    assert first.get_layer("conv3_block1_2_conv").strides == (1, 1)
    assert first.get_layer("conv3_block1_0_conv").strides == (2, 2)
    keras_like = tiny(depth=11, block="bottleneck", layout=paper(stride_in="3x3"))
    assert keras_like.get_layer("conv3_block1_1_conv").strides == (1, 1)
    assert keras_like.get_layer("conv3_block1_2_conv").strides == (2, 2)
    assert keras_like.get_layer("conv3_block1_2_pad").padding == ((1, 1), (1, 1))
    for m in (first, keras_like):
        assert m.get_layer("conv3_block1_out").output.shape[1:3] == (8, 8)


def test_stride_position_basic_is_always_the_first_3x3():
    for stride_in in ("first_conv", "3x3"):
        model = tiny(layout=paper(stride_in=stride_in))
        assert model.get_layer("conv3_block1_1_conv").strides == (2, 2)
        assert model.get_layer("conv3_block1_2_conv").strides == (1, 1)


def test_only_strided_kxk_convs_pad_explicitly_and_symmetrically():
    model = tiny(depth=14)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            strided = layer.strides != (1, 1) and layer.kernel_size != (1, 1)
            assert layer.padding == ("valid" if strided else "same"), layer.name
            if strided:
                pad = model.get_layer(layer.name.replace("_conv", "_pad"))
                assert pad.padding == ((1, 1), (1, 1))


def test_downsample_in_last_unit_uses_a_1x1_max_pool_shortcut():
    model = tiny(depth=14, layout=paper(downsample_in="last_unit"))
    pool = model.get_layer("conv2_block2_0_pool")
    assert isinstance(pool, keras.layers.MaxPooling2D)
    assert pool.pool_size == (1, 1) and pool.strides == (2, 2)
    assert parents(model, "conv2_block2_0_pool") == ["conv2_block1_out"]  # raw x, not preact
    assert model.get_layer("conv3_block1_0_conv").strides == (1, 1)
    assert "conv4_block2_0_pool" not in [layer.name for layer in model.layers]
    shapes = {s: model.get_layer(f"conv{s}_block2_out").output.shape[1:3] for s in (2, 3, 4)}
    assert shapes == {2: (8, 8), 3: (4, 4), 4: (4, 4)}


def test_imagenet_stem():
    model = keras_preact.PreActResNet(
        family="imagenet", stage_blocks=(1, 1, 1, 1), block="basic", input_shape=(64, 64, 3)
    )
    conv = model.get_layer("conv1_conv")
    assert conv.kernel_size == (7, 7) and conv.strides == (2, 2) and conv.filters == 64
    assert model.get_layer("conv1_pad").padding == ((3, 3), (3, 3))
    pool = model.get_layer("pool1_pool")
    assert pool.pool_size == (3, 3) and pool.strides == (2, 2)
    assert parents(model, "pool1_pad") == ["conv1_relu"]
    assert model.get_layer("conv2_block1_out").output.shape[1:3] == (16, 16)


def test_batchnorm_constants():
    for model in (tiny(depth=14), tiny(unit="original")):
        bns = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
        assert bns
        for bn in bns:
            assert bn.epsilon == 1e-5 and bn.momentum == 0.9, bn.name
    model = tiny(layout=paper(bn_epsilon=1.001e-5), bn_momentum=0.99)
    bn = model.get_layer("conv1_bn")
    assert (bn.epsilon, bn.momentum) == (1.001e-5, 0.99)


def _biased(model):
    return {la.name for la in model.layers if isinstance(la, keras.layers.Conv2D) and la.use_bias}


@pytest.mark.parametrize(
    "conv_bias, expected",
    [
        (None, set()),
        (False, set()),
        (("stem",), {"conv1_conv"}),
        (("projection",), {"conv3_block1_0_conv", "conv4_block1_0_conv"}),
        (("residual_last",), {f"conv{s}_block1_2_conv" for s in (2, 3, 4)}),
        (("residual_inner",), {f"conv{s}_block1_1_conv" for s in (2, 3, 4)}),
    ],
)
def test_conv_bias_places(conv_bias, expected):
    assert _biased(tiny(layout=paper(conv_bias=conv_bias))) == expected


def test_conv_bias_true_biases_every_conv():
    model = tiny(layout=paper(conv_bias=True))
    convs = {la.name for la in model.layers if isinstance(la, keras.layers.Conv2D)}
    assert _biased(model) == convs


def test_initializers():
    model = tiny(depth=14)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            init = layer.kernel_initializer
            assert isinstance(init, keras.initializers.VarianceScaling), layer.name
            assert (init.scale, init.mode, init.distribution) == (
                2.0,
                "fan_out",
                "untruncated_normal",
            )
    dense = model.get_layer("predictions")
    init = dense.kernel_initializer
    assert (init.scale, init.mode, init.distribution) == (1.0 / 3.0, "fan_in", "uniform")
    assert not np.any(to_numpy(dense.bias))
    # The values: std sqrt(2 / (k * k * c_out)) (fan-out He init, "as in [23]").
    kernel = to_numpy(model.get_layer("conv4_block2_2_conv").kernel)
    expected = np.sqrt(2.0 / (3 * 3 * 64))
    assert abs(kernel.std() / expected - 1) < 0.05
    assert abs(kernel.mean()) < 0.1 * expected
    limit = np.sqrt(1.0 / 64)
    w = to_numpy(dense.kernel)
    assert w.max() <= limit and w.min() >= -limit and w.max() > 0.9 * limit


def test_custom_kernel_initializer():
    model = tiny(kernel_initializer="glorot_uniform")
    init = model.get_layer("conv2_block1_1_conv").kernel_initializer
    assert isinstance(init, keras.initializers.GlorotUniform)


def test_drop_path_rates_rise_linearly():
    model = tiny(depth=14, drop_path_rate=0.5)
    rates = {
        la.name: la.rate for la in model.layers if isinstance(la, keras_preact.layers.DropPath)
    }
    # Six units: rate 0.5 * i / 5; the first unit (rate 0) gets no layer.
    expected = [0.1, 0.2, 0.3, 0.4, 0.5]
    units = ["conv2_block2", "conv3_block1", "conv3_block2", "conv4_block1", "conv4_block2"]
    assert rates == pytest.approx({f"{u}_drop_path": r for u, r in zip(units, expected)})
    assert not any(isinstance(la, keras_preact.layers.DropPath) for la in tiny().layers)


def test_width_multiplier():
    model = tiny(width_multiplier=2)
    assert model.get_layer("conv4_block1_2_conv").filters == 128
    assert model.get_layer("conv1_conv").filters == 16  # the stem keeps its width


# --------------------------------------------------------------------------- inputs and formats


def test_channels_first_matches_channels_last(channels_first_supported):
    last = tiny(depth=14)
    first = tiny(depth=14, data_format="channels_first", input_shape=(3, 16, 16))
    assert first.get_layer("conv4_block2_out").output.shape[1:] == (64, 4, 4)
    set_seeded_weights(last, seed=3)
    set_seeded_weights(first, seed=3)  # kernels have the same layout in both formats
    x = random_inputs(last)
    np.testing.assert_allclose(
        to_numpy(first(np.transpose(x, (0, 3, 1, 2)), training=False)),
        to_numpy(last(x, training=False)),
        rtol=1e-4,
        atol=1e-5,
    )


def test_channels_first_imagenet_headless(channels_first_supported):
    model = keras_preact.PreActResNet18(
        include_top=False, data_format="channels_first", input_shape=(3, 33, 33)
    )
    assert model.output_shape == (None, 512, 2, 2)
    out = to_numpy(model(random_inputs(model, batch=1), training=False))
    assert out.shape == (1, 512, 2, 2) and np.all(np.isfinite(out))
    features = keras_preact.feature_extractor(model)
    assert features.output["conv2"].shape[1:] == (64, 9, 9)


def test_channels_first_from_keras_config(channels_first_supported):
    keras.config.set_image_data_format("channels_first")  # restored by conftest
    model = keras_preact.PreActResNet20()
    assert model.input_shape == (None, 3, 32, 32)
    assert model.get_layer("conv1_bn").axis == 1


@pytest.mark.parametrize("include_top, pooling", [(True, None), (False, None), (False, "avg")])
def test_mixed_bfloat16_outputs_float32(mixed_bfloat16, include_top, pooling):
    model = tiny(include_top=include_top, pooling=pooling)
    assert model.get_layer("conv2_block1_1_conv").compute_dtype == "bfloat16"
    assert model.get_layer("conv2_block1_1_conv").kernel.dtype == "float32"
    x = random_inputs(model)
    out = model(x, training=False)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert np.all(np.isfinite(to_numpy(out)))
    if include_top:
        y = np.array([0, 1])
        assert_trains_one_step(model, x, y)


def test_one_channel_28px_cifar_family():
    model = keras_preact.PreActResNet20(input_shape=(28, 28, 1), classes=10)
    assert model.get_layer("conv4_block3_out").output.shape[1:] == (7, 7, 64)
    x = random_inputs(model)
    run_model_checks(model, x, expected_output_shape=(None, 10), config_round_trip=False)
    assert_trains_one_step(model, x, np.array([3, 4]))


@pytest.mark.parametrize("size, sides", [(33, (17, 9, 9, 5, 3, 2)), (57, (29, 15, 15, 8, 4, 2))])
def test_imagenet_sizes_not_divisible_by_32(size, sides):
    model = keras_preact.PreActResNet18(include_top=False, input_shape=(size, size, 3))
    got = [model.get_layer(n).output.shape[1] for n in
           ("conv1_conv", "pool1_pool", "conv2_block2_out", "conv3_block2_out",
            "conv4_block2_out", "conv5_block2_out")]  # fmt: skip
    assert tuple(got) == sides
    out = to_numpy(model(random_inputs(model, batch=1), training=False))
    assert out.shape == (1, 2, 2, 512) and np.all(np.isfinite(out))


def test_unknown_spatial_size():
    model = tiny(input_shape=(None, None, 3))
    for size in (16, 20):
        x = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype("float32")
        assert to_numpy(model(x, training=False)).shape == (1, 5)


def test_input_tensor():
    inp = keras.Input((16, 16, 3), name="images")
    model = tiny(input_tensor=inp)
    assert model.inputs[0] is inp
    assert model.input_shape == (None, 16, 16, 3)


def test_feature_extractor_stage_strides():
    model = keras_preact.PreActResNet18(include_top=False, input_shape=(64, 64, 3))
    features = keras_preact.feature_extractor(model)
    assert sorted(features.output) == ["conv2", "conv3", "conv4", "conv5"]
    shapes = {k: tuple(v.shape[1:]) for k, v in features.output.items()}
    # Strides 4, 8, 16, 32 of a 64 px input.
    assert shapes == {
        "conv2": (16, 16, 64), "conv3": (8, 8, 128), "conv4": (4, 4, 256), "conv5": (2, 2, 512)
    }  # fmt: skip
    assert features.output["conv5"] is model.get_layer("post_relu").output
    assert features.output["conv4"] is model.get_layer("conv4_block2_out").output
    out = features(random_inputs(model, batch=1), training=False)
    assert to_numpy(out["conv3"]).shape == (1, 8, 8, 128)
    # Shares weights with the model.
    assert {id(w) for w in features.weights} <= {id(w) for w in model.weights}

    cifar = keras_preact.feature_extractor(tiny(depth=14, include_top=False))
    shapes = {k: tuple(v.shape[1:3]) for k, v in cifar.output.items()}
    assert shapes == {"conv2": (16, 16), "conv3": (8, 8), "conv4": (4, 4)}  # strides 1, 2, 4


def test_feature_extractor_out_indices():
    model = keras_preact.PreActResNet18(include_top=False, input_shape=(64, 64, 3))
    features = keras_preact.feature_extractor(model, out_indices=(-1, 0, 2))
    assert list(features.output) == ["stem", "conv3", "conv5"]  # level order
    shapes = {k: tuple(v.shape[1:]) for k, v in features.output.items()}
    assert shapes == {"stem": (32, 32, 64), "conv3": (8, 8, 128), "conv5": (2, 2, 512)}
    assert features.output["stem"] is model.get_layer("conv1_relu").output
    # No stem BN-ReLU in the timm layout: the stem level is the conv itself.
    timm = keras_preact.PreActResNet18(include_top=False, input_shape=(64, 64, 3), layout="timm")
    stem = keras_preact.feature_extractor(timm, out_indices=[0]).output["stem"]
    assert stem is timm.get_layer("conv1_conv").output
    cifar = tiny(depth=14, include_top=False)
    assert list(keras_preact.feature_extractor(cifar, out_indices=range(4)).output) == [
        "stem", "conv2", "conv3", "conv4"
    ]  # fmt: skip
    levels = r"0: 'stem', 1: 'conv2', 2: 'conv3', 3: 'conv4'"
    for bad in ((4,), (0, -5, 1), ("conv2",), (True,)):
        with pytest.raises(ValueError, match=rf"Allowed: ints in \[-4, 3\] \({levels}\)"):
            keras_preact.feature_extractor(cifar, out_indices=bad)
    with pytest.raises(ValueError, match="level 'conv4' is named twice"):
        keras_preact.feature_extractor(cifar, out_indices=(3, -1))
    with pytest.raises(ValueError, match=r"out_indices=2: expected a list or tuple"):
        keras_preact.feature_extractor(cifar, out_indices=2)


def test_import_does_not_import_tensorflow(backend):
    if backend == "tensorflow":
        pytest.skip("TensorFlow is the backend")
    proc = run_python(
        "import sys, keras_preact\n"
        "keras_preact.PreActResNet(depth=8, block='basic', input_shape=(8, 8, 3))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))"
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(unit="preact"), r"unit='preact'.*'full_preact'.*'original'"),
        (dict(shortcut="gated"), r"shortcut='gated'.*'conv1x1'.*'exclusive_gating'"),
        (dict(block="wide"), r"block='wide'.*'basic'.*'bottleneck'.*'one_layer'"),
        (dict(depth=21), r"depth=21.*6n\+2.*\[8, 20, 56, 110\]"),
        (dict(depth=21, block="bottleneck"), r"depth=21.*9n\+2"),
        (dict(depth=23, block=None), r"depth=23.*named CIFAR depth.*\[20, 32, 44, 56, 110, 164, 1001\]"),
        (dict(depth=19, family="imagenet", block=None, input_shape=(64, 64, 3)),
         r"depth=19.*\[18, 34, 50, 101, 152, 200\]"),
        (dict(family="imagenet", depth=18, block=None, input_shape=(31, 31, 3)),
         r"input_shape=\(31, 31, 3\).*imagenet.*>= 32"),
        (dict(input_shape=(3, 16, 16, 3)), r"input_shape=\(3, 16, 16, 3\).*3 entries"),
        (dict(include_top=False, pooling="mean"), r"pooling='mean'.*None, 'avg', 'max'"),
        (dict(family="resnet"), r"family='resnet'.*'cifar', 'imagenet'"),
        (dict(unit="original", layout="timm"),
         r"unit='original'.*\['full_preact', 'relu_preact'\]"),
        (dict(layout="caffe"), r"layout='caffe'.*\['paper', 'timm', 'keras', 'fb', 'fb_legacy'\]"),
        (dict(data_format="NHWC"), r"data_format='NHWC'.*'channels_first'"),
        (dict(drop_path_rate=1.0), r"drop_path_rate=1.0"),
        (dict(classes=0), r"classes=0"),
        (dict(depth=14, stage_blocks=(1, 1, 1)), r"depth=14 contradicts.*depth 8"),
        (dict(stage_blocks=(1, 1)), r"stage_blocks=\(1, 1\).*3 positive"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_depth_none_and_no_stage_blocks():
    with pytest.raises(ValueError, match="depth="):
        keras_preact.PreActResNet()


def test_trains_one_step_tiny():
    model = tiny()
    x = random_inputs(model, batch=4)
    assert_trains_one_step(model, x, np.array([0, 1, 2, 3]))


def test_conv_bias_accepts_a_single_place_name():
    # A bare string is one place, not a set of its characters.
    assert _biased(tiny(layout=paper(conv_bias="stem"))) == {"conv1_conv"}
    with pytest.raises(ValueError, match=r"conv_bias='head'.*'stem'"):
        tiny(layout=paper(conv_bias="head"))


def test_drop_path_and_dropout_shortcut_train_compiled():
    model = tiny(depth=14, drop_path_rate=0.3, shortcut="dropout", input_shape=(8, 8, 3), seed=0)
    x = random_inputs(model, batch=4)
    assert_trains_one_step(model, x, np.array([0, 1, 2, 3]))


def test_feature_extractor_strides_with_downsampling_in_the_last_unit():
    # keras.applications' layout strides the last unit of a stage; the stage's feature is the
    # output before it, so the documented strides 4/8/16/32 hold for this layout too.
    model = keras_preact.PreActResNet18(
        include_top=False, input_shape=(64, 64, 3), layout=paper(downsample_in="last_unit")
    )
    features = keras_preact.feature_extractor(model)
    shapes = {k: tuple(v.shape[1:]) for k, v in features.output.items()}
    assert shapes == {
        "conv2": (16, 16, 64), "conv3": (8, 8, 128), "conv4": (4, 4, 256), "conv5": (2, 2, 512)
    }  # fmt: skip
    assert features.output["conv2"] is model.get_layer("conv2_block1_out").output


# --------------------------------------------------------------------------- Layout


def test_layout_presets_are_validated_values():
    paper = keras_preact.Layout.get("paper")
    assert paper == keras_preact.Layout() and paper.name == "paper"
    assert list(keras_preact.LAYOUTS) == ["paper", "timm", "keras", "fb", "fb_legacy"]
    for name, layout in keras_preact.LAYOUTS.items():
        assert keras_preact.Layout.get(name) is layout and layout.name == name
        assert keras_preact.Layout(**layout.to_config()) == layout
    keras_layout = keras_preact.Layout.get("keras")
    assert keras_layout.conv_bias == frozenset({"stem", "projection", "residual_last"})
    assert keras_layout.differences(paper)["bn_epsilon"] == (1.001e-5, 1e-5)
    custom = paper.replace(stride_in="3x3", conv_bias="stem")
    assert custom.conv_bias == frozenset({"stem"}) and custom.name is None
    assert eval(repr(custom), {"Layout": keras_preact.Layout}) == custom  # noqa: S307
    with pytest.raises(ValueError, match=r"Unknown Layout option\(s\) \['stride'\]"):
        paper.replace(stride="3x3")


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(stride_in="1x1"), r"stride_in='1x1'.*'first_conv', '3x3'"),
        (dict(downsample_in="middle"), r"downsample_in='middle'.*'first_unit', 'last_unit'"),
        (dict(preact_scope="both"), r"preact_scope='both'.*'shared', 'branch'"),
        (dict(stem_pool_padding="edge"), r"stem_pool_padding='edge'.*'zeros', 'neg_inf'"),
        (dict(stem_norm="yes"), r"stem_norm='yes'.*True, False"),
        (dict(bn_epsilon="x"), r"bn_epsilon='x'.*\(0, 1\)"),
        (dict(bn_epsilon=0.0), r"bn_epsilon=0.0"),
        (dict(conv_bias=("stem", "head")), r"conv_bias=\('stem', 'head'\).*'residual_inner'"),
        (dict(conv_bias=3), r"conv_bias=3"),
    ],
)  # fmt: skip
def test_layout_options_raise_value_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        keras_preact.Layout(**changes)


def test_layout_keywords_of_earlier_versions_point_to_layout():
    with pytest.raises(TypeError, match=r"\['stride_in'\] are options of layout=.*replace"):
        tiny(stride_in="3x3")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['widht'\]"):
        tiny(widht=2)


def test_layout_preset_and_value_build_the_same_network():
    by_name = tiny(depth=11, block="bottleneck", layout="keras")
    by_value = tiny(depth=11, block="bottleneck", layout=keras_preact.Layout.get("keras"))
    assert [la.name for la in by_name.layers[1:]] == [la.name for la in by_value.layers[1:]]
    assert by_name.get_layer("conv1_conv").use_bias
    assert by_name.get_layer("conv2_block1_preact_bn").epsilon == 1.001e-5
    assert "conv2_block1_0_pool" not in [la.name for la in by_name.layers]


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth="50"), r"depth='50': expected an int, got str"),
        (dict(depth=20.0), r"depth=20.0: expected an int, got float"),
        (dict(depth=True), r"depth=True: expected an int, got bool"),
        (dict(drop_path_rate="0.1"), r"drop_path_rate='0.1': expected a number"),
        (dict(drop_path_rate=None), r"drop_path_rate=None: expected a number"),
        (dict(width_multiplier="2"), r"width_multiplier='2': expected a positive number"),
        (dict(width_multiplier=0.01), r"width_multiplier=0.01: it gives stage widths \(0, 0, 1\)"),
        (dict(depth=11, block="bottleneck", width_multiplier=0.05), r"width must be >= 4"),
        (dict(input_shape=32), r"input_shape=32: expected 3 entries"),
        (dict(input_shape=("32", 32, 3)), r"input_shape=\('32', 32, 3\): expected 3 entries"),
        (dict(depth=None, stage_blocks=3), r"stage_blocks=3: expected a tuple of 3 positive"),
        (dict(depth=None, stage_blocks=(1, "a", 1)), r"stage_blocks=\(1, 'a', 1\)"),
        (dict(shortcut=keras_preact.shortcuts.exclusive_gating),
         r"shortcut=shortcuts.exclusive_gating is the factory.*exclusive_gating\(\)"),
        (dict(shortcut=3), r"shortcut=3.*'identity'"),
        (dict(unit=["full_preact"]), r"unit=\['full_preact'\]"),
        (dict(classes=True), r"classes=True: expected an int, got bool"),
        (dict(classes=2.0), r"classes=2.0"),
        (dict(include_top="yes"), r"include_top='yes': expected True or False"),
        (dict(zero_init_residual=1), r"zero_init_residual=1: expected True or False"),
        (dict(bn_momentum=1.0), r"bn_momentum=1.0: expected a number in \[0.0, 1.0\)"),
        (dict(seed="0"), r"seed='0'"),
        (dict(name=3), r"name=3"),
        (dict(weights=3), r"weights=3: expected None, a file path or a record name"),
        (dict(input_tensor=[1, 2]), r"input_tensor=\[1, 2\]"),
        (dict(data_format=1), r"data_format=1.*'channels_first'"),
        (dict(kernel_initializer="he_nromal"), r"he_nromal"),
        (dict(include_preprocessing="yes"), r"include_preprocessing='yes'"),
        (dict(include_preprocessing=True), r"include_preprocessing=True needs weights.*preprocessing="),
        (dict(preprocessing="inception"), r"preprocessing='inception' has no effect"),
        (dict(include_preprocessing=True, preprocessing="caffe"),
         r"preprocessing='caffe'.*'fashion_mnist', 'imagenet_torch', 'inception'"),
        (dict(include_preprocessing=True, preprocessing="fashion_mnist", input_shape=(16, 16, 3)),
         r"normalizes 1 channels; the input has 3"),
    ],
)  # fmt: skip
def test_every_builder_argument_is_checked_first(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_numpy_integers_are_accepted_like_ints():
    model = tiny(depth=np.int64(8), classes=np.int64(7), input_shape=(np.int64(16), 16, 3))
    assert model.output_shape == (None, 7)
    assert tiny(stage_blocks=(np.int32(1),) * 3, depth=None).count_params() == tiny().count_params()


def test_feature_extractor_and_get_model_reject_strings_clearly():
    with pytest.raises(ValueError, match=r"expects a built keras.Model, got 'PreActResNet20'"):
        keras_preact.feature_extractor("PreActResNet20")
    with pytest.raises(ValueError, match=r"name=20.*PreActResNet20"):
        keras_preact.get_model(20)


# --------------------------------------------------------------------------- random layers


def _random_layers(model):
    random_types = (keras_preact.layers.DropPath, keras_preact.layers.ShortcutDropout)
    return [la for la in model.layers if isinstance(la, random_types)]


def test_every_random_layer_draws_its_own_masks():
    # One seed shared by every unit draws the same uniforms in each unit: with rising drop
    # rates the kept sets would be nested. Each layer derives its own seed from `seed=`.
    model = tiny(depth=14, drop_path_rate=0.5, shortcut="dropout", seed=0)
    layers = _random_layers(model)
    seeds = [la.seed for la in layers]
    assert len(layers) == 9 and len(set(seeds)) == len(seeds), seeds  # 5 drop paths, 4 dropouts
    assert seeds == [la.seed for la in _random_layers(tiny(depth=14, drop_path_rate=0.5,
                                                           shortcut="dropout", seed=0))]  # fmt: skip
    # Two units' shortcut-dropout masks, on the same input, differ.
    x = np.ones((4, 16, 16, 16), "float32")
    dropouts = [la for la in layers if isinstance(la, keras_preact.layers.ShortcutDropout)]
    first, second = dropouts[:2]
    a = to_numpy(first(x, training=True)) != 0
    b = to_numpy(second(x, training=True)) != 0
    assert 0.3 < a.mean() < 0.7 and 0.3 < b.mean() < 0.7
    assert np.mean(a != b) > 0.3
    # Drop path with rates 0.2 and 0.3 on 1000 samples: neither kept set contains the other.
    drops = [la for la in layers if isinstance(la, keras_preact.layers.DropPath)]
    ones = np.ones((1000, 1, 1, 1), "float32")
    kept = [to_numpy(d(ones, training=True)).ravel() != 0 for d in drops[1:3]]
    assert np.any(kept[0] & ~kept[1]) and np.any(kept[1] & ~kept[0])
    # An explicit seed of the dropout shortcut is a base seed too.
    seeded = tiny(depth=14, shortcut=keras_preact.shortcuts.dropout(seed=5))
    assert len({la.seed for la in _random_layers(seeded)}) == 4


# --------------------------------------------------------------------------- every builder


@pytest.mark.parametrize("name", builder_params(keras_preact.list_models()))
def test_shared_checks_on_every_builder(name, tmp_path):
    """The shared helper (shapes, eager == predict, config round trip, `.keras` save/load)
    over every named builder, at small inputs; seeded weights keep deep nets finite."""
    cifar = name in CIFAR
    size = 8 if cifar else 32
    model = keras_preact.get_model(
        name, input_shape=(size, size, 3), classes=3, classifier_activation=None
    )
    set_seeded_weights(model, seed=1, scale=0.01)
    x = random_inputs(model, batch=2)
    out = run_model_checks(model, x, expected_output_shape=(None, 3), tmp_path=tmp_path)
    assert np.all(np.isfinite(out))
