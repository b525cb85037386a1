"""The shared model checks (STYLE habit 7): per-model tests call `run_model_checks`.

Everything here uses `keras.ops` and numpy only; the backend comes from `KERAS_BACKEND`.
"""

import copy
import os
import subprocess
import sys

import keras
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def tiny(**kwargs):
    """A fast CIFAR-family net: one basic unit per stage (depth 8) on 16x16 inputs."""
    import keras_preact

    kw = dict(depth=8, family="cifar", block="basic", input_shape=(16, 16, 3), classes=5)
    kw.update(kwargs)
    return keras_preact.PreActResNet(**kw)


def paper(**changes):
    """The paper's `Layout` with some options changed."""
    import keras_preact

    return keras_preact.Layout.get("paper").replace(**changes)


def random_inputs(model, batch=2, seed=0):
    """A seeded numpy batch matching the model's (fully defined) input shape."""
    shape = tuple(model.input_shape[1:])
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype("float32")


def set_seeded_weights(model, seed=0, scale=0.1):
    """Sets every weight from a seeded numpy generator (never a backend initializer).

    BN moving variances get positive values so inference outputs stay finite and non-trivial.
    """
    rng = np.random.default_rng(seed)
    values = []
    for w in model.weights:
        shape = tuple(w.shape)
        if "moving_variance" in w.path:
            v = rng.uniform(0.5, 1.5, shape)
        elif "gamma" in w.path:
            v = 1.0 + scale * rng.standard_normal(shape)
        elif "seed_generator" in w.path:
            values.append(to_numpy(w))
            continue
        else:
            v = scale * rng.standard_normal(shape)
        values.append(v.astype(w.dtype))
    model.set_weights(values)


def trainable_count(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def assert_finite(x, what="output"):
    x = np.asarray(to_numpy(x), dtype="float64")
    assert np.all(np.isfinite(x)), f"{what} has non-finite values"


def assert_config_round_trip(model, x):
    """get_config / from_config rebuilds the same graph; with copied weights, same outputs."""
    config = model.get_config()
    clone = model.__class__.from_config(copy.deepcopy(config))  # from_config may pop keys
    assert [layer.name for layer in clone.layers] == [layer.name for layer in model.layers]
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(
        to_numpy(clone(x, training=False)), to_numpy(model(x, training=False)), rtol=1e-5, atol=1e-5
    )


def assert_save_load(model, x, path):
    """`.keras` save and load in this process gives identical inference outputs."""
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        to_numpy(loaded(x, training=False)), to_numpy(model(x, training=False)), rtol=0, atol=1e-6
    )
    return loaded


def run_model_checks(
    model, x, *, expected_output_shape=None, tmp_path=None, config_round_trip=True
):
    """The shared checks: symbolic and eager shapes, eager == predict, finiteness,
    config round trip and (with `tmp_path`) `.keras` save/load.

    Returns the eager inference output as numpy.
    """
    if expected_output_shape is not None:
        assert tuple(model.output_shape) == tuple(expected_output_shape)
    eager = to_numpy(model(x, training=False))
    assert eager.shape == (x.shape[0], *model.output_shape[1:])
    assert_finite(eager, "eager output")
    predicted = model.predict(x, batch_size=x.shape[0], verbose=0)
    np.testing.assert_allclose(predicted, eager, rtol=1e-4, atol=1e-5)
    if config_round_trip:
        assert_config_round_trip(model, x)
    if tmp_path is not None:
        assert_save_load(model, x, str(tmp_path / f"{model.name}.keras"))
    return eager


def assert_trains_one_step(model, x, y, loss="sparse_categorical_crossentropy", run_eagerly=False):
    """One SGD step gives a finite loss and changes at least one trainable weight.

    `run_eagerly=True` skips compiling the step, faster for one step of a tiny model.
    """
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, run_eagerly=run_eagerly)
    value = model.train_on_batch(x, y)
    value = float(np.asarray(value if np.ndim(value) == 0 else value[0]))
    assert np.isfinite(value), f"loss {value}"
    after = [to_numpy(w) for w in model.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), "no weight moved"
    return value


def run_python(code, *, backend=None, timeout=300):
    """Runs `code` in a fresh Python process with the repository importable.

    Returns the `subprocess.CompletedProcess`; raises with its stderr tail if it failed.
    """
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend or keras.backend.backend()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


#: The arguments of a pipeline call that are not its `tfdata.InputSpec`'s.
PIPELINE_CALL = ("training", "input_context", "counter", "epoch", "skip_records", "position")


def pipeline(make, **kwargs):
    """`make(spec, split, **call)` (`tfdata.imagenet_dataset` or `tfdata.encoded_records`)
    from one set of keywords: `split`, the call's (`PIPELINE_CALL`) and the `InputSpec`'s."""
    from keras_preact.data import tfdata

    split = kwargs.pop("split")
    call = {k: kwargs.pop(k) for k in PIPELINE_CALL if k in kwargs}
    return make(tfdata.InputSpec(**kwargs), split, **call)


#: The deepest builders. Their whole-model checks run under one backend, `DEEP_BACKEND`:
#: their units and stages are the shallower builders' (which every backend checks) repeated,
#: and at this depth each check costs up to minutes per backend.
DEEP = ("PreActResNet101", "PreActResNet110", "PreActResNet152", "PreActResNet200",
        "PreActResNet1001")  # fmt: skip
DEEP_BACKEND = "tensorflow"


def builder_params(names):
    """`pytest.param`s of builder names; a `DEEP` one is slow, and skipped outside
    `DEEP_BACKEND`."""
    import pytest

    once = pytest.mark.skipif(
        keras.backend.backend() != DEEP_BACKEND,
        reason=f"a deep builder's units are the shallower builders'; checked once, under {DEEP_BACKEND}",
    )
    return [pytest.param(n, marks=[pytest.mark.slow, once] if n in DEEP else []) for n in names]
