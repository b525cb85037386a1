"""Builder and preprocessing arguments that used to be accepted or misreported, and weights
files of the other structure (`scan_units`) loading through the model's own `load_weights`.

Small on purpose (PreActResNet20 on 8-32 px inputs, no training): most errors are raised
before anything is built.
"""

import re

import keras
import numpy as np
import pytest
from model_test_utils import random_inputs, set_seeded_weights, to_numpy

import keras_preact
from keras_preact import imagenet_utils, preprocess_input
from keras_preact import weights as kp_weights

# -- 19: (mean, std) in [0, 1] units -----------------------------------------------------------


def test_preprocessing_in_pixel_units_is_refused_with_the_conversion():
    with pytest.raises(ValueError, match=r"preprocessing=\(\(125\.0,\), \(60\.0,\)\).*"
                       r"\[0, 1\] units.*divide by 255.*\(\(0\.49\d*,\), \(0\.23\d*,\)\)"):  # fmt: skip
        keras_preact.PreActResNet20(input_shape=(32, 32, 1), include_preprocessing=True,
                                    preprocessing=((125.0,), (60.0,)))  # fmt: skip


@pytest.mark.parametrize(
    "pair, match",
    [
        (((-0.1,), (0.5,)), r"mean -0\.1"),
        (((0.5,), (0.0,)), r"std 0\.0"),
        (((0.5,), (1.5,)), r"std 1\.5"),
        (((0.5, 0.5, 255.0), (0.2, 0.2, 0.2)), r"mean 255\.0.*divide by 255"),
        (((0.5,), (float("nan"),)), r"std nan"),
    ],
)
def test_mean_std_bounds(pair, match):
    with pytest.raises(ValueError, match=r"Invalid preprocessing=.*" + match):
        imagenet_utils.mean_std(pair)


def test_mean_std_accepts_the_edges_of_its_bounds():
    assert imagenet_utils.mean_std(((0.0, 1.0), (1.0, 1e-3))) == ((0.0, 1.0), (1.0, 1e-3))


# -- 20: preprocess_input's weights= and model= must agree --------------------------------------


@pytest.fixture(scope="module")
def fashion_model():
    """What `PreActResNet20(weights="fashion_mnist")` returns, as far as preprocess_input
    reads it (its class and `weights_record`), without building the net."""
    inputs = keras.Input((2, 2, 1))
    outputs = keras.layers.Identity()(inputs)
    return keras_preact.PreActResNetModel(inputs, outputs, weights_record="fashion_mnist:e6")


def test_preprocess_input_refuses_weights_that_contradict_the_model(fashion_model):
    x = np.full((1, 2, 2, 3), 200.0)
    with pytest.raises(ValueError, match=r"weights='imagenet:fb_torch'.*imagenet_torch.*"
                       r"contradicts.*'fashion_mnist:e6'.*fashion_mnist"):  # fmt: skip
        preprocess_input(x, weights="imagenet:fb_torch", model=fashion_model)
    with pytest.raises(ValueError, match=r"weights='inception'.*contradicts.*fashion_mnist:e6"):
        preprocess_input(x, weights="inception", model=fashion_model)
    with pytest.raises(ValueError, match=r"weights='imagenet'.*contradicts.*fashion_mnist:e6"):
        preprocess_input(x, weights="imagenet", model=fashion_model)
    # A builder name and a record for another builder contradict each other as well.
    with pytest.raises(ValueError, match=r"imagenet:fb_torch.*PreActResNet200.*PreActResNet50"):
        preprocess_input(x, weights="imagenet:fb_torch", model="PreActResNet50")


def test_preprocess_input_accepts_weights_that_agree_with_the_model(fashion_model):
    x = np.full((1, 2, 2, 1), 255.0)
    expected = (1 - 0.2860406) / 0.35302424
    for weights in (None, "fashion_mnist", "fashion_mnist:e6"):
        np.testing.assert_allclose(preprocess_input(x, weights=weights, model=fashion_model), expected,
                                   rtol=1e-6)  # fmt: skip
    record = kp_weights.get_record("fashion_mnist:e6")
    np.testing.assert_allclose(preprocess_input(x, weights=record, model=fashion_model), expected,
                               rtol=1e-6)  # fmt: skip


# -- 21: input_tensor= and input_shape= must agree ---------------------------------------------


@pytest.mark.parametrize(
    "tensor_shape, shape",
    [((32, 32, 3), (64, 64, 3)), ((32, 32, 3), (32, 32, 1)), ((None, None, 3), (32, 32, 3))],
)
def test_input_shape_contradicting_input_tensor_raises(tensor_shape, shape):
    tensor = keras.Input(tensor_shape)
    expected = re.escape(f"input_shape={shape!r}") + ".*" + re.escape(f"{tensor_shape!r}")
    with pytest.raises(ValueError, match=expected):
        keras_preact.PreActResNet20(input_tensor=tensor, input_shape=shape)


def test_input_shape_that_fits_input_tensor_is_accepted():
    tensor = keras.Input((32, 32, 3))
    model = keras_preact.PreActResNet20(input_tensor=tensor, input_shape=(None, 32, 3))
    assert model.inputs[0] is tensor
    assert model.input_shape == (None, 32, 32, 3)


# -- 22: activation and initializer names --------------------------------------------------------


def test_unknown_activation_and_initializer_names_the_argument():
    kw = dict(input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match=r"Invalid classifier_activation='softmx'.*'softmax'"):
        keras_preact.PreActResNet20(**kw, classifier_activation="softmx")
    with pytest.raises(ValueError, match=r"Invalid kernel_initializer='he_nromal'.*'he_normal'"):
        keras_preact.PreActResNet20(**kw, kernel_initializer="he_nromal")


def test_known_activation_and_initializer_objects_are_accepted():
    model = keras_preact.PreActResNet(
        depth=8, block="basic", input_shape=(8, 8, 3), classes=3,
        classifier_activation=keras.activations.sigmoid,
        kernel_initializer=keras.initializers.Zeros(),  # a random one with a seed compiles per shape
    )  # fmt: skip
    assert model.get_layer("predictions").activation is keras.activations.sigmoid


# -- 23: a weights file of the other scan_units structure --------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A written-out and a scanned PreActResNet20 with seeded weights, each saved to a
    `.weights.h5`, and their outputs on one batch (tests may load into the models; the
    files and outputs stay)."""
    kw = dict(input_shape=(8, 8, 3), classes=5, classifier_activation=None)
    plain = keras_preact.PreActResNet20(**kw)
    scanned = keras_preact.PreActResNet20(**kw, scan_units=True)
    x = random_inputs(plain)
    folder = tmp_path_factory.mktemp("weights")
    out = dict(plain=plain, scanned=scanned, x=x, kw=kw)
    for seed, (key, model) in enumerate([("plain", plain), ("scanned", scanned)]):
        set_seeded_weights(model, seed=seed)
        out[f"{key}_path"] = str(folder / f"{key}.weights.h5")
        out[f"{key}_out"] = to_numpy(model(x))
        model.save_weights(out[f"{key}_path"])
    return out


def test_load_weights_converts_between_scanned_and_written_out_files(pair):
    x = pair["x"]
    pair["plain"].load_weights(pair["scanned_path"])  # Keras alone: "... could not be loaded"
    np.testing.assert_allclose(to_numpy(pair["plain"](x)), pair["scanned_out"], rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    # And back, through the documented routes: weights.load_weights_file and weights=.
    kp_weights.load_weights_file(pair["scanned"], pair["plain_path"])
    np.testing.assert_allclose(to_numpy(pair["scanned"](x)), pair["plain_out"], rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    pair["plain"].load_weights(pair["plain_path"])  # its own weights again, then the other's
    kp_weights.load_weights_file(pair["plain"], pair["scanned_path"])
    np.testing.assert_allclose(to_numpy(pair["plain"](x)), pair["scanned_out"], rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    built = keras_preact.PreActResNet20(**pair["kw"], weights=pair["scanned_path"])
    np.testing.assert_allclose(to_numpy(built(x)), pair["scanned_out"], rtol=1e-5, atol=1e-6)


def test_load_weights_of_the_other_structure_names_the_route_without_builder_arguments(pair):
    restored = keras_preact.PreActResNetModel.from_config(pair["plain"].get_config())
    before = [to_numpy(w) for w in restored.weights]
    with pytest.raises(ValueError, match=r"scan_units=True.*scan_units=False.*"
                       r"keras_preact\.scan\.copy_weights"):  # fmt: skip
        restored.load_weights(pair["scanned_path"])
    for w, b in zip(restored.weights, before):
        np.testing.assert_array_equal(to_numpy(w), b)


def test_a_training_checkpoint_of_the_other_structure_is_refused_by_a_compiled_model(
    pair, tmp_path
):
    plain, scanned = pair["plain"], pair["scanned"]
    for model in (plain, scanned):
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
        model.optimizer.build(model.trainable_variables)
    path = str(tmp_path / "checkpoint.weights.h5")
    scanned.save_weights(path)
    with pytest.raises(ValueError, match=r"compiled: the file's optimizer variables.*"
                       r"Resume with scan_units=True"):  # fmt: skip
        plain.load_weights(path)
    scanned.load_weights(path)  # its own structure: Keras' load, optimizer included
