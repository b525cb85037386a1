"""training/cifar.py end to end, and the trainers' pieces (schedules, weight decay, checkpoints)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer_runs import REPO, cifar_cmd, fake_cifar, run  # noqa: E402

from training import callbacks, checkpoints, optimization  # noqa: E402

LOOPS = [
    "fit",
    pytest.param(
        "custom",
        marks=pytest.mark.skipif(
            keras.backend.backend() != "tensorflow", reason="the custom loop is tf.distribute's"
        ),
    ),
]


def _cifar_cmd(data_dir, model_dir, *extra):
    """A run at a constant learning rate (the flags in `extra` override it)."""
    return cifar_cmd(data_dir, model_dir, "--lr_schedule=constant", "--base_lr=0.02", *extra)


def _log_rows(model_dir):
    with open(os.path.join(model_dir, "log.csv")) as f:
        return list(csv.DictReader(f))


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


def _small_cnn():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="fc")(x))


def test_weight_decay_on_kernels_only():
    model = _small_cnn()
    assert optimization.add_weight_decay(model, 1e-4) == 2
    kernels = [model.get_layer("conv").kernel, model.get_layer("fc").kernel]
    expected = sum(
        0.5e-4 * float(np.sum(np.square(keras.ops.convert_to_numpy(k)))) for k in kernels
    )
    np.testing.assert_allclose(
        float(sum(keras.ops.convert_to_numpy(v) for v in model.losses)), expected, rtol=1e-5
    )
    assert optimization.add_weight_decay(model, 1e-4, on="all") == 6
    with pytest.raises(ValueError, match="biases"):
        optimization.add_weight_decay(model, 1e-4, on="biases")


def test_weight_decay_reaches_a_nested_model():
    """A model used as a layer (the uint8 wrapper's case) has its kernels decayed too."""
    inner = _small_cnn()
    inputs = keras.Input((6, 6, 2))
    outer = keras.Model(inputs, inner(keras.layers.Rescaling(0.5, name="scale")(inputs)))
    assert optimization.add_weight_decay(outer, 1e-4) == 2
    assert len(outer.losses) == 2
    assert optimization.decayed_variables(outer, "all") == list(inner.trainable_weights)


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


def test_nan_guard_stops_loudly():
    with pytest.raises(FloatingPointError, match="nan"):
        callbacks.NaNGuard().on_train_batch_end(3, {"loss": float("nan")})
    callbacks.NaNGuard().on_train_batch_end(3, {"loss": 1.0})


def test_atomic_weights_and_json(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = str(tmp_path / "w.weights.h5")
    checkpoints.save_weights_atomic(model, path)
    checkpoints.write_json_atomic(str(tmp_path / "s.json"), {"epoch": 1})
    assert sorted(os.listdir(tmp_path)) == ["s.json", "w.weights.h5"]


@pytest.mark.parametrize("loop", ["fit", "custom"])
def test_checkpointer_restores_the_optimizer(tmp_path, loop):
    """The checkpoint of either loop's model holds the optimizer's step and momentum."""

    def compiled_model():
        keras.utils.set_random_seed(0)
        model = _small_cnn()
        schedule = optimization.WarmupSchedule(0.1, 10, decay="cosine", warmup_steps=2)
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
        if loop == "fit":
            model.compile(optimizer, optimization.SparseCrossentropy())
        else:  # what modeling.build does for the custom loop
            model.compile(optimizer=optimizer)
        optimizer.build(model.trainable_variables)
        return model

    def numpy_values(variables):
        return [keras.ops.convert_to_numpy(v) for v in variables]

    model = compiled_model()
    variables = model.trainable_variables
    for i in range(3):  # three optimizer steps, as either loop makes them
        grads = [
            keras.ops.convert_to_tensor(np.full(v.shape, i + 1.0, "float32")) for v in variables
        ]
        model.optimizer.apply(grads, variables)
    checkpoints.Checkpointer(str(tmp_path)).save(model, epoch=1, logs={"loss": 1.0})
    fresh = compiled_model()
    assert int(keras.ops.convert_to_numpy(fresh.optimizer.iterations)) == 0
    restored = checkpoints.Checkpointer(str(tmp_path)).restore(fresh)
    assert restored.epoch == 1 and restored.steps == 3
    saved, loaded = numpy_values(model.optimizer.variables), numpy_values(fresh.optimizer.variables)
    assert len(saved) == len(loaded) > 2
    for a, b in zip(saved, loaded):
        np.testing.assert_array_equal(a, b)
    assert all(np.any(m) for m in loaded[2:])  # the momentum buffers are not zero
    for a, b in zip(numpy_values(model.weights), numpy_values(fresh.weights)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        float(keras.ops.convert_to_numpy(fresh.optimizer.learning_rate)),
        float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
    )


def test_checkpointer_refuses_a_model_without_optimizer(tmp_path):
    with pytest.raises(ValueError, match="compile it with its optimizer"):
        checkpoints.Checkpointer(str(tmp_path)).save(_small_cnn(), epoch=1, logs={})


@pytest.mark.slow
@pytest.mark.parametrize("loop", LOOPS)
def test_resume_after_sigkill(tmp_path, loop):
    """A run killed with SIGKILL resumes at its last epoch with the optimizer's step, so the
    learning-rate schedule and the step count continue exactly."""
    data = fake_cifar(tmp_path / "data")
    model_dir = tmp_path / "run"
    epochs, steps = 6, 2
    cmd = _cifar_cmd(
        data,
        model_dir,
        f"--epochs={epochs}",
        f"--steps_per_epoch={steps}",
        f"--loop={loop}",
        "--lr_schedule=cosine",
        "--warmup_steps=5",
        "--base_lr=0.05",
    )

    def saved_epoch():  # the newest complete checkpoint (a folder appears whole)
        return max((int(p.name[6:]) for p in model_dir.glob("checkpoints/epoch-*")), default=0)

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if saved_epoch() >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = saved_epoch()
    assert 2 <= killed_at < epochs
    rerun = run(cmd)
    # The optimizer comes back at the step the checkpoint was written at (not 0).
    resumed_step = killed_at * steps
    assert f"{killed_at} epoch(s) done, optimizer step {resumed_step}," in rerun.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["resumed_from_epoch"] >= killed_at
    assert summary["steps"] == epochs * steps  # no step lost or repeated across the kill
    assert summary["epochs_run"] == epochs  # the whole run, not only the last process
    assert summary["epochs_run_this_process"] == epochs - summary["resumed_from_epoch"]
    # One row per epoch (none lost or repeated across the kill), each with the learning
    # rate of the schedule at the step the epoch ended.
    schedule = optimization.WarmupSchedule(0.05, epochs * steps, decay="cosine", warmup_steps=5)
    rows = _log_rows(model_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    for row in rows:
        expected = float(schedule((int(row["epoch"]) + 1) * steps))
        np.testing.assert_allclose(float(row["lr"]), expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(summary["final_lr"], float(schedule(epochs * steps)), atol=1e-8)
    assert (model_dir / "final.weights.h5").exists()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["batch_size"] == 16 and config["strategy"] == "default"
    assert config["loop"] == loop


@pytest.mark.slow
def test_resume_continues_momentum_exactly(tmp_path):
    """2 epochs, then the same command resumed to 4, ends with the weights of an
    uninterrupted 4-epoch run: the numpy pipeline replays the same batches and the
    optimizer resumes its step and momentum (a constant rate, so --epochs does not change
    the schedule)."""
    data = fake_cifar(tmp_path / "data")
    common = ["--steps_per_epoch=2", "--pipeline=numpy", "--loop=fit"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(_cifar_cmd(data, straight, "--epochs=4", *common))
    run(_cifar_cmd(data, resumed, "--epochs=2", *common))
    run(_cifar_cmd(data, resumed, "--epochs=4", *common))
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 2 and summary["steps"] == 8
    a = _h5_arrays(straight / "final.weights.h5")
    b = _h5_arrays(resumed / "final.weights.h5")
    assert a.keys() == b.keys() and len(a) > 10
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst < 1e-5, worst


def _h5_arrays(path):
    import h5py

    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if hasattr(v, "shape") else None)
    return out


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="checks the jax/torch path on a machine without TensorFlow",
)
def test_cifar_trainer_runs_without_tensorflow(tmp_path):
    """jax and torch train in-memory data with TensorFlow made unimportable."""
    data = fake_cifar(tmp_path / "data")
    argv = _cifar_cmd(data, tmp_path / "run", "--epochs=2", "--steps_per_epoch=2")[1:]
    code = (
        "import runpy, sys\n"
        "sys.modules['tensorflow'] = None\n"
        "sys.modules['tensorboard'] = None\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_path('training/cifar.py', run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # JAX keeps the run's compiled programs for a resume (--compilation_cache, default on).
    cache = tmp_path / "run" / "jax_cache"
    if keras.backend.backend() == "jax":
        assert len(os.listdir(cache)) > 0
    else:
        assert not cache.exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["backend"] == keras.backend.backend()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["pipeline"] == "numpy"


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution is JAX's")
def test_jax_data_parallel_two_host_devices(tmp_path):
    """--strategy=mirrored under jax: DataParallel over two (forced) CPU devices."""
    data = fake_cifar(tmp_path / "data")
    cmd = _cifar_cmd(
        data, tmp_path / "run", "--epochs=1", "--steps_per_epoch=2", "--strategy=mirrored"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["replicas"] == 2 and summary["steps"] == 2
