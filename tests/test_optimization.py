"""keras_preact/train/optimization.py: the learning-rate schedules, the weight-decay set, the
loss."""

import keras
import numpy as np
import pytest
from trainer_runs import small_cnn

import keras_preact
from keras_preact.train import config, optimization


def _size(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


# ----------------------------------------------------------------------------
# Schedules.


def test_schedule_paper_cifar_and_cosine():
    paper = optimization.WarmupSchedule(
        0.1,
        64000,
        decay="step",
        boundaries=[32000, 48000],
        warmup_steps=400,
        warmup="constant",
        warmup_lr=0.01,
    )
    got = [float(paper(s)) for s in (0, 399, 400, 31999, 32000, 48000, 63999)]
    np.testing.assert_allclose(got, [0.01, 0.01, 0.1, 0.1, 0.01, 0.001, 0.001], rtol=1e-6)
    cosine = optimization.WarmupSchedule(0.2, 1000, decay="cosine", warmup_steps=100)
    np.testing.assert_allclose(float(cosine(49)), 0.1, rtol=1e-6)  # linear warm-up
    np.testing.assert_allclose(float(cosine(550)), 0.1, rtol=1e-5)  # half-way
    assert float(cosine(1000)) < 1e-7
    restored = optimization.WarmupSchedule.from_config(cosine.get_config())
    assert float(restored(300)) == float(cosine(300))
    with pytest.raises(ValueError, match="linear"):
        optimization.WarmupSchedule(0.1, 10, decay="linear")


def test_lr_schedule_of_the_paper_preset():
    """`lr_schedule(cfg)`: the preset's boundaries are epochs, the schedule's are steps (the
    paper's 32k and 48k iterations of 64k at 400 steps per epoch)."""
    cfg = config.get_config("paper", "cifar").derive(steps_per_epoch=400)
    schedule = optimization.lr_schedule(cfg)
    assert (schedule.total_steps, schedule.boundaries) == (64000, [32000, 48000])
    got = [float(schedule(s)) for s in (0, 399, 400, 31999, 32000, 48000, 63999)]
    np.testing.assert_allclose(got, [0.01, 0.01, 0.1, 0.1, 0.01, 0.001, 0.001], rtol=1e-6)
    # At another epoch length the boundaries stay at the same epochs.
    half = config.get_config("paper", "cifar", steps_per_epoch=200).derive()
    half = optimization.lr_schedule(half)
    assert half.boundaries == [16000, 24000] and half.total_steps == 32000


# ----------------------------------------------------------------------------
# Weight decay.


def test_weight_decay_on_kernels_only():
    model = small_cnn()
    kernels = [model.get_layer("conv").kernel, model.get_layer("fc").kernel]
    assert optimization.add_weight_decay(model, 1e-4) == kernels
    expected = sum(
        0.5e-4 * float(np.sum(np.square(keras.ops.convert_to_numpy(k)))) for k in kernels
    )
    np.testing.assert_allclose(
        float(sum(keras.ops.convert_to_numpy(v) for v in model.losses)), expected, rtol=1e-5
    )
    decayed = optimization.add_weight_decay(model, 1e-4, on="all")
    assert len(decayed) == 6 and decayed == model.trainable_variables
    assert optimization.add_weight_decay(small_cnn(), 0.0) == []
    with pytest.raises(ValueError, match="biases"):
        optimization.add_weight_decay(model, 1e-4, on="biases")


def test_weight_decay_reaches_a_nested_model():
    """A model used as a layer (the uint8 wrapper's case) has its kernels decayed too."""
    inner = small_cnn()
    inputs = keras.Input((6, 6, 2))
    outer = keras.Model(inputs, inner(keras.layers.Rescaling(0.5, name="scale")(inputs)))
    kernels = [inner.get_layer("conv").kernel, inner.get_layer("fc").kernel]
    assert optimization.add_weight_decay(outer, 1e-4) == kernels
    assert len(outer.losses) == 2
    assert optimization.decayed_variables(outer, "all") == list(inner.trainable_weights)


def test_scanned_and_written_out_nets_decay_the_same_weights():
    """A scanned stage stacks its units' kernels in one variable each: selected by path, they
    are decayed as the written-out net's kernels are (270,096 weights in PreActResNet20), and
    BatchNorm's stacked gamma and beta are not."""
    kwargs = dict(input_shape=(8, 8, 1), classes=2)
    written = keras_preact.PreActResNet20(**kwargs)
    scanned = keras_preact.PreActResNet20(scan_units=True, **kwargs)
    assert len(scanned.trainable_variables) < len(written.trainable_variables)  # it is scanned
    sizes = [_size(optimization.decayed_variables(m)) for m in (written, scanned)]
    assert sizes == [270_096, 270_096]
    for model in (written, scanned):
        assert optimization.decayed_variables(model, "all") == model.trainable_variables
    assert _size(scanned.trainable_variables) == _size(written.trainable_variables)


# ----------------------------------------------------------------------------
# The loss.


def test_sparse_crossentropy_smooths_like_keras():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], np.float32)
    labels = np.array([0, 2])
    for smoothing in (0.0, 0.2):
        ours = optimization.SparseCrossentropy(smoothing)(labels, logits)
        keras_loss = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=smoothing
        )(np.eye(3, dtype=np.float32)[labels], logits)
        np.testing.assert_allclose(float(ours), float(keras_loss), rtol=1e-6)
    assert float(optimization.SparseCrossentropy(0.2)(labels, logits)) > float(
        optimization.SparseCrossentropy(0.0)(labels, logits)
    )
