"""`keras_preact.scan`: identical units as one loop over stacked weights.

A scanned network must be the written-out one with its weights regrouped: same outputs,
gradients, BatchNorm updates and parameter count, and weights that convert both ways.
"""

import keras
import numpy as np
import pytest
from model_test_utils import (
    assert_trains_one_step,
    random_inputs,
    run_model_checks,
    set_seeded_weights,
    to_numpy,
)

import keras_preact
from keras_preact import scan


def bn_unit(x, *, name, filters=4):
    """A small pre-activation unit from plain Keras layers, named from its prefix."""
    y = keras.layers.BatchNormalization(momentum=0.5, name=f"{name}_preact_bn")(x)
    y = keras.layers.ReLU(name=f"{name}_preact_relu")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_1_conv")(y)
    y = keras.layers.BatchNormalization(momentum=0.5, name=f"{name}_1_bn")(y)
    y = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_2_conv")(y)
    return keras.layers.Add(name=f"{name}_out")([x, y])


def net(scanned, *, units=3, unit=bn_unit):
    """conv -> `units` identical units (scanned or written out) -> pool -> dense."""
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1_conv")(inputs)
    names = [f"conv2_block{b}" for b in range(1, units + 1)]
    if scanned:
        x = scan.scan_units(x, unit, names=names)
    else:
        for n in names:
            x = unit(x, name=n)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(3, name="predictions")(x)
    return keras.Model(inputs, outputs, name="scanned" if scanned else "plain")


def seeded(model, seed=0):
    """Random weights from numpy, BN variances positive, for both layouts alike."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, values in sorted(scan.unit_weights(model).items()):
        weights[name] = [
            (rng.uniform(0.5, 1.5, w.shape) if "bn" in name and i == 3 else
             0.3 * rng.standard_normal(w.shape)).astype("float32")
            for i, w in enumerate(values)
        ]  # fmt: skip
    scan.set_unit_weights(model, weights)
    return weights


def pair():
    plain = net(False)
    seeded(plain)
    scanned = net(True)
    scan.copy_weights(plain, scanned)
    return plain, scanned


def batch(seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((4, 6, 6, 3)).astype("float32"), rng.integers(0, 3, 4)


def max_weight_difference(a, b):
    wa, wb = scan.unit_weights(a), scan.unit_weights(b)
    assert sorted(wa) == sorted(wb)
    return max(np.abs(p - q).max() for k in wa for p, q in zip(wa[k], wb[k]))


def test_structure_and_parameter_count():
    plain, scanned = net(False, units=4), net(True, units=4)
    layer = scanned.get_layer("conv2_block1_to_4_out")
    assert isinstance(layer, scan.Scan)
    assert layer.unit_names == tuple(f"conv2_block{b}" for b in range(1, 5))
    assert scanned.count_params() == plain.count_params()
    assert all(w.shape[0] == 4 for w in layer.weights)
    assert len(layer.trainable_weights) == 7 and len(layer.non_trainable_weights) == 4
    with pytest.raises(ValueError):
        scanned.get_layer("conv2_block2_1_conv")


def test_each_unit_gets_its_own_initial_weights():
    layer = net(True).get_layer("conv2_block1_to_3_out")
    kernel = to_numpy(layer.weights[2])  # unit_1_conv/kernel: one random draw per unit
    assert kernel.shape == (3, 3, 3, 4, 4)
    assert not np.allclose(kernel[0], kernel[1]) and not np.allclose(kernel[1], kernel[2])
    # He-uniform scale of the per-unit shape, not of the stacked one.
    limit = np.sqrt(6.0 / (3 * 3 * 4))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.5 * limit


@pytest.mark.parametrize("training", [False, True])
def test_outputs_match_written_out_units(training):
    plain, scanned = pair()
    x, _ = batch()
    np.testing.assert_allclose(
        to_numpy(scanned(x, training=training)),
        to_numpy(plain(x, training=training)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_training_step_matches_written_out_units():
    """Gradients reach every stacked weight and BN statistics update, as written out."""
    plain, scanned = pair()
    before = {k: [w.copy() for w in v] for k, v in scan.unit_weights(scanned).items()}
    x, y = batch()
    losses = []
    for m in (plain, scanned):
        m.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        losses.append(float(np.asarray(m.train_on_batch(x, y))))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert max_weight_difference(plain, scanned) < 1e-5
    after = scan.unit_weights(scanned)
    for unit in ("conv2_block1", "conv2_block3"):
        # A conv kernel (gradient) and a BN moving mean (statistics) of the first and last unit.
        assert not np.allclose(after[f"{unit}_1_conv"][0], before[f"{unit}_1_conv"][0])
        assert not np.allclose(after[f"{unit}_1_bn"][2], before[f"{unit}_1_bn"][2])


def test_training_step_compiles_with_xla():
    """`jit_compile=True`: Keras' default on TensorFlow GPUs compiles the loop's gradient."""
    if keras.backend.backend() == "torch":
        pytest.skip("jit_compile=True is torch.compile on torch, not XLA")
    plain, scanned = pair()
    x, y = batch()
    for m in (plain, scanned):
        m.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True,
        )
        m.train_on_batch(x, y)
    assert max_weight_difference(plain, scanned) < 1e-5


def test_inference_leaves_statistics_alone():
    _, scanned = pair()
    before = [to_numpy(w).copy() for w in scanned.non_trainable_weights]
    scanned.predict(batch()[0], verbose=0)
    for a, b in zip(before, scanned.non_trainable_weights):
        np.testing.assert_array_equal(a, to_numpy(b))


def test_config_round_trip_and_save_load(tmp_path):
    _, scanned = pair()
    run_model_checks(scanned, batch()[0], tmp_path=tmp_path)


def test_weights_convert_both_ways():
    plain, scanned = pair()
    back = net(False)
    scan.copy_weights(scanned, back)
    x, _ = batch()
    np.testing.assert_array_equal(to_numpy(back(x)), to_numpy(plain(x)))
    assert max_weight_difference(back, plain) == 0.0


def test_weight_conversion_errors_name_the_layer():
    plain, scanned = pair()
    weights = scan.unit_weights(plain)
    missing = dict(weights)
    del missing["conv2_block2_1_bn"]
    with pytest.raises(ValueError, match="conv2_block2_1_bn"):
        scan.set_unit_weights(scanned, missing)
    wrong = dict(weights)
    wrong["conv2_block3_2_conv"] = [np.zeros((1, 1, 4, 5), "float32")]
    with pytest.raises(ValueError, match=r"conv2_block3_2_conv.*\(1, 1, 4, 5\)"):
        scan.set_unit_weights(scanned, wrong)
    extra = dict(weights)
    extra["conv2_block4_1_conv"] = weights["conv2_block3_1_conv"]
    with pytest.raises(ValueError, match="conv2_block4_1_conv"):
        scan.set_unit_weights(scanned, extra)
    with pytest.raises(ValueError, match="predictions"):
        scan.set_unit_weights(net(True), {k: v for k, v in weights.items() if k != "predictions"})


def test_refuses_units_with_random_state():
    def dropout_unit(x, *, name):
        y = keras.layers.Conv2D(4, 1, name=f"{name}_1_conv")(x)
        y = keras.layers.Dropout(0.5, name=f"{name}_drop")(y)
        return keras.layers.Add(name=f"{name}_out")([x, y])

    with pytest.raises(ValueError, match="random state"):
        net(True, unit=dropout_unit)


def test_refuses_units_that_change_the_shape():
    def widening_unit(x, *, name):
        return keras.layers.Conv2D(8, 1, name=f"{name}_0_conv")(x)

    with pytest.raises(ValueError, match=r"keep its input shape.*\(6, 6, 4\).*\(6, 6, 8\)"):
        net(True, unit=widening_unit)


def test_refuses_layers_not_named_from_the_prefix():
    def badly_named_unit(x, *, name):
        y = keras.layers.Conv2D(4, 1, name="conv_without_prefix")(x)
        return keras.layers.Add(name=f"{name}_out")([x, y])

    with pytest.raises(ValueError, match="conv_without_prefix"):
        net(True, unit=badly_named_unit)


def test_refuses_bad_arguments():
    template = keras.Model(*(lambda i: (i, bn_unit(i, name="unit")))(keras.Input((6, 6, 4))))
    with pytest.raises(ValueError, match="unit_names"):
        scan.Scan(template, [])
    with pytest.raises(TypeError, match="keras.Model"):
        scan.Scan(bn_unit, ["a"])
    with pytest.raises(ValueError, match=r"does not fit the template"):
        scan.Scan(template, ["a", "b"])(keras.Input((6, 6, 5)))


def test_mixed_precision(mixed_bfloat16):
    plain, scanned = pair()
    x, y = batch()
    np.testing.assert_allclose(
        to_numpy(scanned(x, training=True)).astype("float32"),
        to_numpy(plain(x, training=True)).astype("float32"),
        rtol=0.05,
        atol=0.05,
    )
    assert all(w.dtype == "float32" for w in scanned.weights)
    scanned.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    assert np.isfinite(float(np.asarray(scanned.train_on_batch(x, y))))


# -- The builders' `scan_units=True` --------------------------------------------------------


def built_pair(**kwargs):
    """A written-out and a scanned builder model with the same (seeded) weights."""
    kw = dict(depth=20, input_shape=(16, 16, 3), classes=5, classifier_activation=None)
    kw.update(kwargs)
    plain = keras_preact.PreActResNet(**kw)
    set_seeded_weights(plain)
    scanned = keras_preact.PreActResNet(**kw, scan_units=True)
    scan.copy_weights(plain, scanned)
    return plain, scanned


@pytest.mark.parametrize(
    "kwargs, scans",
    [
        # Paper layout, 3 units per stage: units 2-3 of every stage are scanned.
        ({}, ["conv2_block2_to_3_out", "conv3_block2_to_3_out", "conv4_block2_to_3_out"]),
        # keras layout (stride in the last unit of a stage, no stem BN-ReLU), 4 per stage,
        # bottleneck units: the strided last units stay written out.
        (
            dict(depth=None, block="bottleneck", stage_blocks=(4, 4, 4), layout="keras"),
            ["conv2_block2_to_3_out", "conv3_block2_to_3_out", "conv4_block2_to_4_out"],
        ),
    ],
)
def test_builder_scan_units_equals_written_out(kwargs, scans):
    plain, scanned = built_pair(**kwargs)
    assert [layer.name for layer in scanned.layers if isinstance(layer, scan.Scan)] == scans
    assert scanned.count_params() == plain.count_params()
    x = random_inputs(plain, batch=3)
    for training in (False, True):
        np.testing.assert_allclose(
            to_numpy(scanned(x, training=training)),
            to_numpy(plain(x, training=training)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_builder_scan_units_layer_names_and_features():
    plain, scanned = built_pair()
    names = {layer.name for layer in scanned.layers}
    assert "conv2_block1_out" in names and "conv2_block2_to_3_out" in names
    assert not names & {"conv2_block2_1_conv", "conv2_block3_out", "conv4_block3_out"}
    # Stage outputs are the Scan layers' outputs: feature_extractor gives the same maps.
    x = random_inputs(plain)
    ours = keras_preact.feature_extractor(scanned)(x)
    theirs = keras_preact.feature_extractor(plain)(x)
    assert sorted(ours) == sorted(theirs) == ["conv2", "conv3", "conv4"]
    for k in ours:
        theirs_k = to_numpy(theirs[k])  # unnormalized sums, up to ~100: float32 noise scales
        atol = 1e-5 * np.abs(theirs_k).max()
        np.testing.assert_allclose(to_numpy(ours[k]), theirs_k, rtol=1e-5, atol=atol)


def test_builder_scan_units_checks_and_trains(tmp_path):
    _, scanned = built_pair(classifier_activation="softmax")
    x = random_inputs(scanned)
    run_model_checks(scanned, x, expected_output_shape=(None, 5), tmp_path=tmp_path)
    assert_trains_one_step(scanned, x, np.array([0, 4]))


def test_builder_scan_units_loads_weights_records():
    kw = dict(weights="fashion_mnist", include_preprocessing=True)
    plain = keras_preact.PreActResNet20(**kw)
    scanned = keras_preact.PreActResNet20(**kw, scan_units=True)
    assert scanned.weights_record == plain.weights_record == "fashion_mnist:e42"
    x = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(to_numpy(scanned(x)), to_numpy(plain(x)), rtol=1e-5, atol=1e-6)


def test_builder_scan_units_loads_keras_weights_files_of_either_structure(tmp_path):
    plain, scanned = built_pair()
    x = random_inputs(plain)
    expected = to_numpy(plain(x))
    plain_path, scanned_path = str(tmp_path / "plain.weights.h5"), str(tmp_path / "s.weights.h5")
    plain.save_weights(plain_path)
    scanned.save_weights(scanned_path)
    kw = dict(depth=20, input_shape=(16, 16, 3), classes=5, classifier_activation=None)
    for path in (plain_path, scanned_path):
        loaded = keras_preact.PreActResNet(**kw, weights=path, scan_units=True)
        np.testing.assert_allclose(to_numpy(loaded(x)), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scan_units=True structure"):
        keras_preact.PreActResNet(**{**kw, "classes": 6}, weights=plain_path, scan_units=True)


def test_builder_scan_units_refusals():
    kw = dict(input_shape=(16, 16, 3), classes=5)
    with pytest.raises(ValueError, match=r"drop_path_rate=0\.1 needs scan_units=False"):
        keras_preact.PreActResNet20(**kw, drop_path_rate=0.1, scan_units=True)
    with pytest.raises(ValueError, match="random state"):
        keras_preact.PreActResNet20(**kw, shortcut="dropout", scan_units=True)
    with pytest.raises(ValueError, match="scan_units='yes'"):
        keras_preact.PreActResNet20(**kw, scan_units="yes")
