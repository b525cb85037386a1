"""tf.distribute: MirroredStrategy equals one device (BatchNorm over the global batch);
two-worker MultiWorkerMirrored, and a signal to one of its workers.

These need the TensorFlow backend (tf.distribute strategies hold TF variables);
under KERAS_BACKEND=jax or torch they are skipped. Each runs in a subprocess:
logical CPU devices and TF_CONFIG must be set before TensorFlow initializes.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies need KERAS_BACKEND=tensorflow",
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MIRRORED_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import keras_preact
    from keras_preact.train import custom_loop, modeling, optimization

    def plain_cnn():
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(5, name="fc")(x))

    def preact():
        return keras_preact.PreActResNet(depth=8, family="cifar", block="basic",
                                         input_shape=(8, 8, 3), classes=5,
                                         classifier_activation=None)

    def weights(strategy, build, x, y, loop):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = build()
            if strategy.num_replicas_in_sync > 1:
                modeling.global_batchnorm(model)
            optimization.add_weight_decay(model, 0.01)
            optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
            if loop == "fit":
                model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
            optimizer.build(model.trainable_variables)
        if loop == "fit":
            model.fit(x, y, batch_size=len(x), epochs=2, shuffle=False, verbose=0)
        else:
            data = strategy.experimental_distribute_dataset(
                tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)).repeat())
            model.compile(optimizer=optimizer)
            step = custom_loop.make_train_step(model, strategy, len(x))
            it = iter(data)
            for _ in range(2):
                step(it, tf.constant(0))
        return [np.asarray(w) for w in model.get_weights()]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 5, 8)
    # Two different halves: BatchNorm's statistics must be the global batch's.
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert mirrored.num_replicas_in_sync == 2
    worst = {}
    for name, build, xs, ys in (("cnn", plain_cnn, x, y), ("preact", preact, x, y)):
        for loop in ("fit", "custom"):
            ref = weights(one, build, xs, ys, "fit")
            got = weights(mirrored, build, xs, ys, loop)
            worst[f"{name}_{loop}"] = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, got))
    print("RESULT", worst)
""")


def test_mirrored_two_devices_matches_one_device():
    out = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=dict(os.environ, KERAS_BACKEND="tensorflow"),
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines, out.stderr[-4000:]
    worst = eval(lines[0][len("RESULT") :])  # noqa: S307 - our own dict literal
    print(worst)
    for key, diff in worst.items():
        assert diff < 1e-5, (key, worst)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(tmp_path, model_dir, epochs, tag, *extra):
    """Starts training/cifar.py as two MultiWorkerMirrored workers on 127.0.0.1."""
    ports = [_free_port(), _free_port()]
    workers = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            KERAS_BACKEND="tensorflow",
            TF_CONFIG=json.dumps(
                {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
            ),
        )
        cmd = [
            sys.executable,
            "training/cifar.py",
            "--strategy=multi_worker_mirrored",
            "--dataset=cifar10",
            "--source=files",
            f"--data_dir={tmp_path / 'data'}",
            f"--model_dir={model_dir}",
            "--batch_size=16",
            f"--epochs={epochs}",
            "--steps_per_epoch=3",
            "--lr_schedule=cosine",
            "--warmup_steps=2",
            "--base_lr=0.05",
            "--verbose=2",
            *extra,
        ]
        log = open(tmp_path / f"{tag}_worker{i}.log", "w")
        procs.append(
            (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        )
    return procs


def _wait_workers(tmp_path, procs, tag, codes=(0, 0)):
    for proc, log in procs:
        try:
            proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(tmp_path / f"{tag}_worker{i}.log").read_text() for i in range(2)]
    for (proc, _), text, code in zip(procs, logs, codes):
        assert proc.returncode == code, text[-4000:]
    return logs


def _two_workers(tmp_path, model_dir, epochs, tag, *extra):
    """Runs training/cifar.py as two MultiWorkerMirrored workers on 127.0.0.1."""
    return _wait_workers(tmp_path, _start_workers(tmp_path, model_dir, epochs, tag, *extra), tag)


def _fake_data(tmp_path):
    from keras_preact.data import cifar_files

    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64))
    test = (rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 20))
    cifar_files.write_cifar("cifar10", str(tmp_path / "data"), train, test)


def _h5_arrays(path):
    import h5py

    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if hasattr(v, "shape") else None)
    return out


@pytest.mark.slow
def test_two_worker_multi_worker_mirrored(tmp_path):
    """Two processes train training/cifar.py together and end with identical weights; rerun
    with more epochs, both resume at the checkpoint's optimizer step and schedule."""
    from keras_preact.train import optimization

    _fake_data(tmp_path)
    model_dir = tmp_path / "run"
    _two_workers(tmp_path, model_dir, 2, "first")
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["replicas"] == 2 and summary["loop"] == "custom"
    logs = _two_workers(tmp_path, model_dir, 3, "resumed")
    for text in logs:
        assert "2 epoch(s) done, optimizer step 6," in text, text[-3000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["resumed_from_epoch"] == 2
    schedule = optimization.WarmupSchedule(0.05, 9, decay="cosine", warmup_steps=2)
    np.testing.assert_allclose(summary["final_lr"], float(schedule(9)), atol=1e-7)
    a = _h5_arrays(model_dir / "final.weights.h5")
    b = _h5_arrays(model_dir / "workers" / "worker_1" / "final.weights.h5")
    assert a.keys() == b.keys() and len(a) > 10
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, differ


@pytest.mark.slow
def test_a_signal_to_one_of_two_workers_stops_both_at_one_step(tmp_path):
    """A preemption's SIGTERM reaches one worker: the workers agree on the stop in the next
    step, both save their checkpoint at that step and exit 143 (none waits forever in an
    all-reduce); the same commands resume both there and end at the planned step count."""
    import signal
    import time

    _fake_data(tmp_path)
    model_dir, steps = tmp_path / "run", ("--steps_per_epoch=20", "--lr_schedule=constant")
    procs = _start_workers(tmp_path, model_dir, 2, "first", *steps)
    chief_log, deadline = tmp_path / "first_worker0.log", time.time() + 300
    while "Epoch 1/2" not in chief_log.read_text() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)
    procs[1][0].send_signal(signal.SIGTERM)
    logs = _wait_workers(tmp_path, procs, "first", codes=(143, 143))
    assert "Stopped by SIGTERM: saved a checkpoint at step" in logs[1], logs[1][-3000:]
    assert "Stopped by SIGTERM of another process of the run: saved" in logs[0], logs[0][-3000:]
    (saved,) = os.listdir(model_dir / "checkpoints")
    assert saved.startswith("epoch-0000-step-"), saved
    assert os.listdir(model_dir / "workers" / "worker_1" / "checkpoints") == [saved]
    step = int(saved.rsplit("-", 1)[1])
    assert 0 < step < 20
    logs = _two_workers(tmp_path, model_dir, 2, "resumed", *steps)
    for text in logs:
        assert f"0 epoch(s) and {step} step(s) of the next done, optimizer step {step}," in text
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["processes"] == 2
