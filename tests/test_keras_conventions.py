"""The keras.applications conventions, over every named builder.

What users of `keras.applications.ResNet50V2` rely on: the builders' signatures and
docstrings, a backbone (`include_top=False`) that takes any height and width by default,
1- and 4-channel inputs, `input_tensor=`, every `pooling`, channels_first where the backend
runs it, and a config round trip. `preprocess_input`'s keras modes are checked in the
section at the end. Each builder is built four times per backend, on small inputs (the
ImageNet family at its 32 px minimum, CIFAR at 16 px), so the module stays short.
"""

import inspect

import keras
import numpy as np
import pytest
from model_test_utils import builder_params, to_numpy

import keras_preact
from keras_preact import preact_resnet

NAMES = keras_preact.list_models()
FIXED = ("depth", "family", "block", "stage_blocks")
KERAS_ARGS = ("include_top", "weights", "input_tensor", "input_shape", "pooling", "classes",
              "classifier_activation")  # fmt: skip


def _side(name):
    return 32 if keras_preact.MODELS[name]["family"] == "imagenet" else 16


def _features(name):
    """Channels of the last feature map of builder `name` at width 1."""
    row = keras_preact.MODELS[name]
    return preact_resnet.FAMILIES[row["family"]]["widths"][row["block"]][-1]


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype("float32")


# -- Signatures and docstrings ----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_signature_lists_every_argument_with_its_default(name):
    builder = getattr(keras_preact, name)
    generic = inspect.signature(keras_preact.PreActResNet).parameters
    params = inspect.signature(builder).parameters
    expected = {k: p.default for k, p in generic.items() if p.kind is p.KEYWORD_ONLY}
    for k in FIXED:
        expected.pop(k)
    assert {k: p.default for k, p in params.items()} == expected
    assert all(p.kind is p.KEYWORD_ONLY for p in params.values())
    # keras.applications' arguments first, in its order.
    assert tuple(params)[: len(KERAS_ARGS)] == KERAS_ARGS
    assert builder.__name__ == name and builder.__module__ == "keras_preact.preact_resnet"


@pytest.mark.parametrize("name", NAMES)
def test_help_documents_every_argument(name):
    builder = getattr(keras_preact, name)
    doc = inspect.getdoc(builder)
    depth = keras_preact.MODELS[name]["depth"]
    assert doc.startswith(f"Pre-activation ResNet-{depth} ")
    args = doc.split("\nArgs:\n")[1].split("\nReturns:\n")[0]
    documented = [line.split(":")[0].strip() for line in args.splitlines() if line[4:5] != " "]
    assert documented == list(inspect.signature(builder).parameters)
    assert "Returns:" in doc and "Raises:" in doc
    for record in keras_preact.weights.list_records(model=name):
        assert repr(record.name) in doc
    import pydoc

    assert "include_top=True" in pydoc.render_doc(builder)  # what help() prints


def test_fixed_arguments_and_unknown_keywords_raise():
    with pytest.raises(TypeError, match="PreActResNet50 fixes `depth`"):
        keras_preact.PreActResNet50(depth=34)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['widht_multiplier'\]"):
        keras_preact.PreActResNet20(widht_multiplier=2)


# -- Inputs, pooling, channels_first, serialization --------------------------------------------


@pytest.mark.parametrize("name", builder_params(NAMES))
def test_backbone_takes_any_size_channels_pooling_and_round_trips(name, backend):
    builder, side, width = getattr(keras_preact, name), _side(name), _features(name)
    # Called, not `predict`ed: the same forward pass, without tracing a graph per input
    # size (20 s per `predict` of PreActResNet1001 under TensorFlow, 3 s per call).
    run = lambda model, x: to_numpy(model(x, training=False))  # noqa: E731

    # include_top=False leaves height and width open, as keras.applications does.
    model = builder(include_top=False)
    assert tuple(model.input.shape) == (None, None, None, 3)
    assert len(model.output.shape) == 4 and model.output.shape[-1] == width
    for size in (side, side + 8):
        out = run(model, _images((1, size, size, 3)))
        # (Not checked for finiteness: untrained deep nets in inference mode overflow, as
        # their BatchNorm layers do not normalize yet.)
        assert out.shape[0] == 1 and out.shape[-1] == width

    # One channel and average pooling; channels_first where the backend runs it on CPU.
    data_format = "channels_last" if backend == "tensorflow" else "channels_first"
    shape = (None, None, 1) if data_format == "channels_last" else (1, None, None)
    model = builder(include_top=False, input_shape=shape, pooling="avg", data_format=data_format)
    x = _images((2, side, side, 1) if data_format == "channels_last" else (2, 1, side, side))
    assert run(model, x).shape == (2, width)

    # Four channels through input_tensor, max pooling; then a config round trip.
    tensor = keras.Input((side, side, 4))
    model = builder(include_top=False, input_tensor=tensor, pooling="max")
    assert model.inputs[0] is tensor
    x = _images((2, side, side, 4), seed=1)
    out = run(model, x)
    assert out.shape == (2, width)
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(run(clone, x), out, rtol=1e-5, atol=1e-5)
    assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]


@pytest.mark.parametrize("name, too_small", [("PreActResNet18", 31), ("PreActResNet20", 3)])
def test_input_shape_checks_stay_with_open_sizes(name, too_small):
    builder = getattr(keras_preact, name)
    with pytest.raises(ValueError, match=rf"input_shape=\({too_small}, None, 3\) is too small"):
        builder(include_top=False, input_shape=(too_small, None, 3))
    # The classifier keeps the fixed default input, as keras.applications' does.
    default = preact_resnet.FAMILIES[keras_preact.MODELS[name]["family"]]["input_shape"]
    assert tuple(builder(weights=None).input.shape[1:]) == default


def test_record_channels_stay_with_open_sizes():
    model = keras_preact.PreActResNet20(weights="fashion_mnist", include_top=False)
    assert tuple(model.input.shape) == (None, None, None, 1)


# -- preprocess_input: keras.applications' modes -------------------------------------------------


def _keras_preprocess(x, data_format, mode):
    from keras.applications import imagenet_utils as keras_utils

    # keras normalizes float numpy input in place: give it a copy.
    x = x.copy() if isinstance(x, np.ndarray) else x
    return to_numpy(keras_utils.preprocess_input(x, data_format=data_format, mode=mode))


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("kind", ["float", "uint8", "tensor", "single_image"])
def test_preprocess_input_modes_match_keras_applications(mode, data_format, kind):
    rng = np.random.default_rng(0)
    shape = (2, 5, 4, 3) if data_format == "channels_last" else (2, 3, 5, 4)
    x = rng.uniform(0, 255, shape).astype("float32")
    if kind == "uint8":
        x = x.astype("uint8")
    elif kind == "single_image":
        x = x[0]
    expected = _keras_preprocess(x, data_format, mode)
    given = keras.ops.convert_to_tensor(x) if kind == "tensor" else x
    out = keras_preact.preprocess_input(given, data_format, mode)
    assert isinstance(out, np.ndarray) == (kind != "tensor")
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-5, atol=1e-4)
    keyword = keras_preact.preprocess_input(given, data_format=data_format, mode=mode)
    np.testing.assert_allclose(to_numpy(keyword), expected, rtol=1e-5, atol=1e-4)


def test_preprocess_input_on_symbolic_input_and_the_default_data_format():
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, keras_preact.preprocess_input(inputs, mode="caffe"))
    x = np.random.default_rng(1).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    expected = _keras_preprocess(x, None, "caffe")
    np.testing.assert_allclose(to_numpy(model.predict(x, verbose=0)), expected, rtol=1e-5)
    keras.config.set_image_data_format("channels_first")  # restored by conftest
    x = np.transpose(x, (0, 3, 1, 2))
    np.testing.assert_allclose(
        keras_preact.preprocess_input(x, mode="caffe"), _keras_preprocess(x, None, "caffe"),
        rtol=1e-5,
    )  # fmt: skip


def test_preprocess_input_modes_agree_with_the_records():
    x = np.random.default_rng(2).uniform(0, 255, (1, 2, 2, 3)).astype("float32")
    pairs = [("tf", dict(weights="inception")), ("tf", dict(weights="imagenet:keras")),
             ("torch", dict(weights="imagenet:fb_torch")),
             ("torch", dict(weights="imagenet", model="PreActResNet200"))]  # fmt: skip
    for mode, ours in pairs:
        np.testing.assert_allclose(
            keras_preact.preprocess_input(x, mode=mode), keras_preact.preprocess_input(x, **ours)
        )
        # Both given: fine when they name the same normalization.
        keras_preact.preprocess_input(x, mode=mode, **ours)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (
            (),
            {},
            r"needs the normalization, given one of three ways: mode=\['caffe', 'tf', "
            r"'torch'\].*weights=.*model=",
        ),
        ((None, "inception"), {}, r"mode='inception'. Allowed: \['caffe', 'tf', 'torch'\]"),
        (
            ("inception",),
            {},
            r"data_format='inception'.*second positional argument is "
            r"data_format.*weights='inception'",
        ),
        (("tf",), {}, r"data_format='tf'.*pass mode='tf'"),
        (("NHWC",), {"mode": "tf"}, r"data_format='NHWC'. Allowed: None, 'channels_last'"),
        (
            (),
            {"mode": "caffe", "weights": "inception"},
            r"mode='caffe' contradicts weights='inception'.*preprocessing is 'inception' "
            r"\(mode='tf'\)",
        ),
        (
            (),
            {"mode": "tf", "weights": "imagenet:fb_torch"},
            r"mode='tf' contradicts.*'imagenet_torch' \(mode='torch'\)",
        ),
    ],
)
def test_preprocess_input_errors_name_the_ways(args, kwargs, match):
    x = np.zeros((1, 2, 2, 3), "float32")
    with pytest.raises(ValueError, match=match):
        keras_preact.preprocess_input(x, *args, **kwargs)
