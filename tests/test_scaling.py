"""Scale-out proven equal to one process: several processes (and devices) of one run on
127.0.0.1 end with one process's losses and weights, a deliberately broken variant does not,
a killed process stops the job, and the same command resumes it; the run folder is written
once.

JAX: `jax.distributed` over gloo (`--strategy=multi_worker_mirrored --coordinator_address`).
PyTorch: `torchrun` and DistributedDataParallel over gloo (`--loop=torch`).
TensorFlow: `MultiWorkerMirroredStrategy` workers from `TF_CONFIG` (the custom loop).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from trainer_runs import REPO, cifar_cmd, fake_cifar

pytestmark = pytest.mark.slow
jax_only = pytest.mark.skipif(keras.backend.backend() != "jax", reason="jax.distributed")
torch_only = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torchrun and DDP")
tf_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute")

#: A duplicated shard: every process feeds the first share of each batch (a broken
#: variant the comparison must catch).
DUPLICATED_SHARD = """
import sys
from keras_preact.data import numpy_pipeline
original = numpy_pipeline.ArrayDataset.__init__
def first_share(self, *args, shard=(0, 1), **kwargs):
    original(self, *args, shard=(0, shard[1]), **kwargs)
numpy_pipeline.ArrayDataset.__init__ = first_share
sys.argv[0] = "training/cifar.py"
from keras_preact.train import cifar
cifar.run_main()
"""

#: `(loss, weights)` tolerances of "the same run" at lr 0.1 with augmentation, per engine:
#: float32 sums in another order (an all-reduce over processes or devices) grow over the
#: steps. PyTorch and TensorFlow after 4 steps, measured: PyTorch 3e-4 and 8e-3; TensorFlow
#: 2.5e-4 and 1.3e-2 (one replica's BatchNorm takes E[(x - mean)^2], the synchronized one
#: E[x^2] - mean^2 from the shares' sums: 1e-4 apart after one step). JAX after
#: `JAX_STEPS`: the weights' difference grows about twentyfold a step with random erasing
#: and how fast depends on the CPU (max weight difference after 1, 2, 3, 4 steps on one
#: 2-core AMD EPYC: 1.2e-7, 2e-5, 4.4e-4, 2.1e-3; after 4 steps on another machine 3.5e-3,
#: past the 1e-3 tolerance). A broken variant must differ by `BROKEN` times the tolerance
#: in both (measured: a duplicated shard under JAX, 2 steps, 0.015 and 0.046; DDP without
#: its all-reduce, 4 steps, 0.11 and 1.4).
TOLERANCES = {"jax": (1e-5, 1e-3), "torch": (1e-3, 2e-2), "tensorflow": (1e-3, 3e-2)}
BROKEN = 20
#: The JAX comparison's steps: a broken shard shows from the first step, while rounding's
#: growth stays far inside the tolerance.
JAX_STEPS = 2


def _check(rows, good, broken):
    """Asserts the `good` rows of `_compare` are within the backend's tolerances and the
    `broken` one is far outside them."""
    print(
        "\n".join(f"{k}: loss diff {v[0]:.3g}, max weight diff {v[1]:.3g}" for k, v in rows.items())
    )
    tolerances = TOLERANCES[keras.backend.backend()]
    for tag in good:
        assert all(d < t for d, t in zip(rows[tag], tolerances)), (tag, rows)
    assert all(d > BROKEN * t for d, t in zip(rows[broken], tolerances)), rows


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices):
    return dict(
        os.environ,
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )


def _start(cmd, processes, logs, *, devices=1, program=None):
    """`cmd` as `processes` JAX processes of one run on 127.0.0.1 (process 0 writes)."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(processes):
        line = list(cmd)
        if program is not None:
            line[1:2] = ["-c", program]
        if processes > 1:
            line += ["--strategy=multi_worker_mirrored", f"--coordinator_address={address}",
                     f"--num_processes={processes}", f"--process_id={i}"]  # fmt: skip
        log = open(logs / f"process{i}.log", "w")
        procs.append((subprocess.Popen(line, cwd=REPO, env=_env(devices), stdout=log,
                                       stderr=subprocess.STDOUT), log))  # fmt: skip
    return procs


def _wait(procs, logs, codes=None, timeout=500):
    for proc, log in procs:
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    texts = [(logs / f"process{i}.log").read_text() for i in range(len(procs))]
    for i, ((proc, _), text) in enumerate(zip(procs, texts)):
        if codes is None or codes[i] is not None:
            assert proc.returncode == (codes[i] if codes else 0), text[-4000:]
    return texts


def _train(tmp_path, tag, data, processes, devices, *extra, program=None):
    logs = tmp_path / f"logs_{tag}"
    logs.mkdir()
    model_dir = tmp_path / tag
    cmd = cifar_cmd(data, model_dir, "--loop=jax", "--lr_schedule=constant", "--base_lr=0.1",
                    "--erasing=0.5", *extra)  # fmt: skip
    if devices > 1 and processes == 1:
        cmd.append("--strategy=mirrored")
    texts = _wait(_start(cmd, processes, logs, devices=devices, program=program), logs)
    return model_dir, texts


def _weights(path):
    import h5py

    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if hasattr(v, "shape") else None)
    return out


def _files(model_dir):
    """The run folder's files, TensorBoard's event files by their folder only."""
    found = set()
    for root, _, names in os.walk(model_dir):
        rel = os.path.relpath(root, model_dir)
        found |= {rel if "tensorboard" in rel else os.path.join(rel, n) for n in names}
    return found


def _first_checkpoint(model_dir, running, log):
    """Waits for the epoch-1 checkpoint while `running()`; fails with the end of `log`."""
    first, deadline = model_dir / "checkpoints" / "epoch-0001" / "state.json", time.time() + 400
    while not first.exists() and time.time() < deadline and running():
        time.sleep(0.1)
    assert first.exists(), log.read_text()[-3000:]


def _kill_one_in_epoch_two(model_dir, procs, logs, victim=1):
    """SIGKILL to process `victim` once the epoch-1 checkpoint exists; the other must then
    stop with an error (its collectives fail), not wait forever."""
    other = 1 - victim
    _first_checkpoint(model_dir, lambda: procs[0][0].poll() is None, logs / "process0.log")
    procs[victim][0].send_signal(signal.SIGKILL)
    begun = time.time()
    codes = [None, None]
    codes[victim] = -signal.SIGKILL
    texts = _wait(procs, logs, codes=codes, timeout=300)
    assert procs[other][0].returncode != 0, texts[other][-3000:]
    print(f"process {other} exited {procs[other][0].returncode} {time.time() - begun:.0f} s "
          f"after the kill")  # fmt: skip


def _ended_as_one_run(model_dir, texts):
    """The resumed run (3 epochs of 20 steps, killed in epoch 2) ended as one run does."""
    assert all("Resuming from" in text for text in texts), texts[0][-3000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["epochs_run"] == 3, summary
    assert summary["resumed_from_epoch"] >= 1, summary


def _compare(one, other):
    """`(loss difference, largest weight difference)` of two runs' folders."""
    a = json.loads((one / "summary.json").read_text())
    b = json.loads((other / "summary.json").read_text())
    loss = abs(a["train_loss_per_epoch"][-1] - b["train_loss_per_epoch"][-1])
    wa, wb = _weights(one / "final.weights.h5"), _weights(other / "final.weights.h5")
    assert wa.keys() == wb.keys() and len(wa) > 10
    return loss, max(float(np.max(np.abs(wa[k] - wb[k]))) for k in wa)


@jax_only
def test_jax_processes_train_as_one_process(tmp_path):
    """Batch 16, `JAX_STEPS` steps, with random erasing: two processes of one device end with one
    process's loss and weights (each process reads its own share of every batch, augmented
    as in the whole batch); the run folder of two processes holds what one process writes,
    once. Every process feeding the first share (a duplicated shard) ends elsewhere, far
    outside the tolerance. (One process of two devices: `test_training_cifar.py`'s
    `test_two_host_devices_train_as_one`.)"""
    data = fake_cifar(tmp_path / "data")
    common = ("--epochs=1", f"--steps_per_epoch={JAX_STEPS}")
    one, _ = _train(tmp_path, "one", data, 1, 1, *common)
    rows = {}
    for tag, processes, devices, program in (
        ("two_processes", 2, 1, None),
        ("duplicated_shard", 2, 1, DUPLICATED_SHARD),
    ):
        folder, texts = _train(tmp_path, tag, data, processes, devices, *common, program=program)
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["replicas"] == 2 and summary["processes"] == processes, summary
        assert summary["steps"] == JAX_STEPS, summary
        if program is None:  # every test image once (the broken variant counts one twice)
            assert summary["test_images_scored"] == 16, summary
        rows[tag] = _compare(one, folder)
        if processes > 1:
            assert _files(folder) == _files(one)
            assert "Epoch 1/1" not in texts[1]  # the other process prints nothing of its own
    _check(rows, ("two_processes",), "duplicated_shard")


@jax_only
def test_a_killed_jax_process_stops_the_run_and_the_same_command_resumes_it(tmp_path):
    """SIGKILL of process 0 (the coordinator of jax.distributed) during epoch 2: process 1
    aborts at once, not waiting forever (a process other than the coordinator is declared
    dead after the coordination service's heartbeat timeout, 100 s by default); the same two
    commands resume at the last checkpoint and end at the uninterrupted run's step
    count."""
    data = fake_cifar(tmp_path / "data")
    logs, model_dir = tmp_path / "logs", tmp_path / "run"
    logs.mkdir()
    cmd = cifar_cmd(data, model_dir, "--loop=jax", "--epochs=3", "--steps_per_epoch=20",
                    "--lr_schedule=constant")  # fmt: skip
    _kill_one_in_epoch_two(model_dir, _start(cmd, 2, logs), logs, victim=0)
    (logs / "resumed").mkdir()
    texts = _wait(_start(cmd, 2, logs / "resumed"), logs / "resumed")
    _ended_as_one_run(model_dir, texts)


#: DDP without its gradient all-reduce: each process steps on its own share's gradients
#: (a broken variant the comparison must catch).
UNSYNCED_GRADIENTS = """
import sys
from keras_preact.train import torch_loop
original = torch_loop.TorchRunner._step
def unsynced(self, x, y):
    with self.ddp.no_sync():
        return original(self, x, y)
torch_loop.TorchRunner._step = unsynced
sys.argv[0] = "training/cifar.py"
from keras_preact.train import cifar
cifar.run_main()
"""


def _torchrun(tmp_path, tag, data, processes, *extra, program=None, wait=True):
    """`training/cifar.py` under `torchrun --nproc_per_node=processes` (gloo on CPU)."""
    logs = tmp_path / f"logs_{tag}"
    logs.mkdir(exist_ok=True)
    model_dir = tmp_path / tag
    cmd = cifar_cmd(data, model_dir, "--lr_schedule=constant", "--base_lr=0.1",
                    "--erasing=0.5", *extra)  # fmt: skip
    script = ["training/cifar.py"] if program is None else ["--no-python", sys.executable,
                                                            "-c", program]  # fmt: skip
    line = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={_free_port()}", *script, *cmd[2:]]  # fmt: skip
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    log = open(logs / "torchrun.log", "w")
    proc = subprocess.Popen(line, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if not wait:
        return model_dir, proc, log
    try:
        proc.wait(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (logs / "torchrun.log").read_text()
    assert proc.returncode == 0, text[-5000:]
    return model_dir, text


@torch_only
def test_torch_processes_train_as_one_process(tmp_path):
    """Batch 16, 4 steps, with random erasing: two DDP processes end with the loss and
    weights of one process under `model.fit` (each reads its own share, BatchNorm takes the
    global batch's statistics), and of one DDP process; the run folder of two holds what one
    process writes, once. Without the gradient all-reduce the run ends elsewhere."""
    data = fake_cifar(tmp_path / "data")
    common = ("--epochs=1", "--steps_per_epoch=4")
    one, _ = _train_torch_fit(tmp_path, data, *common)
    rows = {}
    for tag, processes, program in (
        ("two_processes", 2, None),
        ("one_process_ddp", 1, None),
        ("unsynced_gradients", 2, UNSYNCED_GRADIENTS),
    ):
        folder, _ = _torchrun(tmp_path, tag, data, processes, "--loop=torch", *common,
                              program=program)  # fmt: skip
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["replicas"] == processes and summary["processes"] == processes, summary
        assert summary["loop"] == "torch" and summary["steps"] == 4, summary
        assert summary["test_images_scored"] == 16, summary
        rows[tag] = _compare(one, folder)
        assert _files(folder) == _files(one)
    _check(rows, ("two_processes", "one_process_ddp"), "unsynced_gradients")


def _children(pid):
    """The process ids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def _train_torch_fit(tmp_path, data, *extra):
    model_dir = tmp_path / "one"
    cmd = cifar_cmd(data, model_dir, "--lr_schedule=constant", "--base_lr=0.1",
                    "--erasing=0.5", "--loop=fit", "--pipeline=numpy", *extra)  # fmt: skip
    env = dict(os.environ, KERAS_BACKEND="torch")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return model_dir, out.stdout


@torch_only
def test_a_killed_torch_process_stops_the_run_and_the_same_command_resumes_it(tmp_path):
    """SIGKILL of one DDP process during epoch 2: torchrun stops the job with a non-zero
    exit; the same command resumes at the last checkpoint and ends at the uninterrupted
    run's step count."""
    data = fake_cifar(tmp_path / "data")
    extra = ("--loop=torch", "--epochs=3", "--steps_per_epoch=20")
    model_dir, proc, log = _torchrun(tmp_path, "run", data, 2, *extra, wait=False)
    _first_checkpoint(
        model_dir, lambda: proc.poll() is None, tmp_path / "logs_run" / "torchrun.log"
    )
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    try:
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "logs_run" / "torchrun.log").read_text()
    assert proc.returncode != 0, text[-3000:]
    model_dir, text = _torchrun(tmp_path, "run", data, 2, *extra)
    _ended_as_one_run(model_dir, [text])


def _tf_workers(tmp_path, tag, data, workers, *extra, wait=True):
    """`training/cifar.py` as `workers` MultiWorkerMirroredStrategy workers on 127.0.0.1
    (one process with the default strategy when `workers` is 1), the custom loop."""
    logs, model_dir = tmp_path / f"logs_{tag}", tmp_path / tag
    logs.mkdir(exist_ok=True)
    cmd = cifar_cmd(data, model_dir, "--loop=custom", "--lr_schedule=constant", "--base_lr=0.1",
                    "--deterministic", *extra)  # fmt: skip
    addresses = [f"127.0.0.1:{_free_port()}" for _ in range(workers)]
    procs = []
    for i in range(workers):
        env = dict(os.environ, KERAS_BACKEND="tensorflow")
        line = list(cmd)
        if workers > 1:
            task = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}}
            env["TF_CONFIG"] = json.dumps(task)
            line.append("--strategy=multi_worker_mirrored")
        log = open(logs / f"process{i}.log", "w")
        procs.append((subprocess.Popen(line, cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))  # fmt: skip
    if not wait:
        return model_dir, procs, logs
    return model_dir, _wait(procs, logs)


@tf_only
def test_tensorflow_workers_train_as_one_process(tmp_path):
    """Batch 16, 4 steps (`--deterministic`: each image augmented by its slot in the
    stream): two MultiWorkerMirroredStrategy workers end with the loss and weights of one
    process (each worker reads its share of every batch; BatchNorm is synchronized)."""
    data = fake_cifar(tmp_path / "data")
    common = ("--epochs=1", "--steps_per_epoch=4")
    one, _ = _tf_workers(tmp_path, "one", data, 1, *common)
    two, _ = _tf_workers(tmp_path, "two", data, 2, *common)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["replicas"] == 2 and summary["processes"] == 2 and summary["steps"] == 4
    assert summary["test_images_scored"] == 16, summary
    loss, weights = _compare(one, two)
    print(f"two workers: loss diff {loss:.3g}, max weight diff {weights:.3g}")
    tolerances = TOLERANCES["tensorflow"]
    assert loss < tolerances[0] and weights < tolerances[1], (loss, weights)


@tf_only
def test_a_killed_tensorflow_worker_stops_the_run_and_the_same_command_resumes_it(tmp_path):
    """SIGKILL of worker 1 during epoch 2: worker 0 stops too (the strategy's health check
    aborts its collectives), not waiting forever; the same commands resume at the last
    checkpoint and end at the uninterrupted run's step count."""
    data = fake_cifar(tmp_path / "data")
    extra = ("--epochs=3", "--steps_per_epoch=20")
    _kill_one_in_epoch_two(*_tf_workers(tmp_path, "run", data, 2, *extra, wait=False))
    model_dir, texts = _tf_workers(tmp_path, "run", data, 2, *extra)
    _ended_as_one_run(model_dir, texts)


def _imagenet_shards(root):
    """ImageNet-format shards of real photos: 2 training shards, and 2 validation shards
    whose second (the second process's) holds one undecodable record."""
    import io

    import PIL.Image
    from skimage import data as photos

    from keras_preact.data import tfdata

    def jpeg(array):
        out = io.BytesIO()
        PIL.Image.fromarray(array).save(out, format="JPEG", quality=90)
        return out.getvalue()

    images = [jpeg(getattr(photos, n)()[..., :3]) for n in ("astronaut", "coffee", "chelsea")]
    labels = [1, 2, 3]
    root.mkdir()
    for i in range(2):
        tfdata.write_imagenet_tfrecords(str(root / f"train-{i:05d}-of-00002"), images, labels)
    tfdata.write_imagenet_tfrecords(str(root / "validation-00000-of-00002"), images, labels)
    tfdata.write_imagenet_tfrecords(
        str(root / "validation-00001-of-00002"), images[:2] + [b"not an image"], [1, 2, 3]
    )
    return root


@jax_only
def test_jax_processes_read_their_imagenet_shards_and_count_every_record_once(tmp_path):
    """The ImageNet trainer as two JAX processes: each reads its own shards; the evaluation
    scores every image of both processes' shards once (3 + 2, batches of unequal count)
    and the summary counts the undecodable record that only process 1 read."""
    shards = _imagenet_shards(tmp_path / "shards")
    logs = tmp_path / "logs"
    logs.mkdir()
    cmd = [sys.executable, "training/imagenet.py", "--source=tfrecord", f"--data_dir={shards}",
           "--model=PreActResNet20", "--num_classes=3", "--num_train_examples=6",
           "--image_size=32", "--eval_size=32", "--eval_resize=36", "--batch_size=4",
           "--shuffle_buffer=8", "--verbose=2", "--epochs=1", "--lr_schedule=constant",
           f"--model_dir={tmp_path / 'run'}"]  # fmt: skip
    _wait(_start(cmd, 2, logs), logs)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 1, summary
    assert summary["eval_images_scored"] == 5, summary
    assert summary["eval_skipped_by_cause"]["undecodable"] == 1, summary
