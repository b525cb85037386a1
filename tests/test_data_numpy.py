"""The numpy-only data modules: IDX and CIFAR readers, numpy augmentation."""

import os
import subprocess
import sys

import numpy as np
import pytest

from keras_preact.data import cifar_files, idx, numpy_pipeline

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    arrays = {}
    for prefix, n in (("train", 7), ("t10k", 3)):
        arrays[prefix] = (
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8),
        )
        idx.write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", arrays[prefix][0], compress)
        idx.write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", arrays[prefix][1], compress)
    (x, y), (xt, yt) = idx.load_fashion_mnist(str(tmp_path))
    np.testing.assert_array_equal(x[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(yt, arrays["t10k"][1])
    assert x.shape == (7, 28, 28, 1) and y.dtype == np.int64


def test_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="Not an IDX file"):
        idx.read_idx(str(bad))
    with pytest.raises(FileNotFoundError, match="train-images"):
        idx.load_fashion_mnist(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_files():
    (x, y), (xt, yt) = idx.load_fashion_mnist(FMNIST)
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert np.bincount(y).tolist() == [6000] * 10
    mean, std = numpy_pipeline.channel_stats(x)
    # Known statistics of Fashion-MNIST.
    assert abs(mean[0] - 0.2860) < 1e-3 and abs(std[0] - 0.3530) < 1e-3


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_round_trip(tmp_path, name):
    rng = np.random.default_rng(1)
    train = (rng.integers(0, 256, (11, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 11))
    test = (rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 4))
    cifar_files.write_cifar(name, str(tmp_path), train, test)
    (x, y), (xt, yt) = cifar_files.load_cifar(name, str(tmp_path))
    files = 5 if name == "cifar10" else 1
    written = np.concatenate([np.arange(11)[i::files] for i in range(files)])
    np.testing.assert_array_equal(x, train[0][written])
    np.testing.assert_array_equal(y, train[1][written])
    np.testing.assert_array_equal(xt, test[0])


def test_pad_crop_flip_is_a_shifted_window():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, (64, 28, 28, 1), dtype=np.uint8)
    out = numpy_pipeline.pad_crop_flip(x, np.random.default_rng(1), padding=4)
    assert out.shape == x.shape and out.dtype == x.dtype
    for a, b in zip(x, out):
        padded = np.pad(a, ((4, 4), (4, 4), (0, 0)))
        windows = [padded[i : i + 28, j : j + 28] for i in range(9) for j in range(9)]
        assert any(np.array_equal(b, w) or np.array_equal(b, w[:, ::-1]) for w in windows)
    assert not np.array_equal(out, x)


def test_array_dataset_is_reproducible_and_resumable():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    y = np.arange(50)
    ds = numpy_pipeline.ArrayDataset(
        x, y, 8, [0.5] * 3, [0.25] * 3, training=True, steps_per_epoch=4
    )
    epoch0 = [ds[i] for i in range(len(ds))]
    ds.epoch = 1  # what the trainer's data sets for epoch 2 (cifar.MemoryData.train)
    epoch1 = [ds[i] for i in range(len(ds))]
    resumed = numpy_pipeline.ArrayDataset(
        x, y, 8, [0.5] * 3, [0.25] * 3, training=True, steps_per_epoch=4
    )
    resumed.epoch = 1
    for (a, la), (b, lb) in zip(epoch1, [resumed[i] for i in range(4)]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    # A pass over the data (6 batches of 8) has no repeated example.
    labels = np.concatenate([lab for _, lab in epoch0 + epoch1][:6])
    assert len(set(labels.tolist())) == 48
    ev = numpy_pipeline.ArrayDataset(x, y, 8, [0.5] * 3, [0.25] * 3, training=False)
    assert len(ev) == 7 and ev[6][0].shape == (2, 8, 8, 3)


@pytest.mark.parametrize("training", [True, False])
def test_shards_of_an_array_dataset_make_its_batches(training):
    """Each process's share (`shard=(index, count)`) of every batch, put together in process
    order, is the one-process batch: the same images, crops, flips and erased patches for
    training; every evaluation image once, the last batch's shares short or empty."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (70, 12, 12, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 70)
    kw = dict(mean=[0.5] * 3, std=[0.25] * 3, training=training, erasing=0.5 * training)
    one = numpy_pipeline.ArrayDataset(x, y, 32, **kw)
    shares = [numpy_pipeline.ArrayDataset(x, y, 32, shard=(i, 4), **kw) for i in range(4)]
    assert all(len(s) == len(one) for s in shares)
    sizes = []
    for b in range(len(one)):
        parts = [s[b] for s in shares]
        sizes.append([len(p[1]) for p in parts])
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), one[b][0])
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), one[b][1])
    assert sizes[-1] == ([8, 8, 8, 8] if training else [6, 0, 0, 0]), sizes
    with pytest.raises(ValueError, match="shard=\\(0, 3\\)"):
        numpy_pipeline.ArrayDataset(x, y, 32, shard=(0, 3), **kw)


def test_numpy_modules_import_without_tensorflow():
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "import keras_preact.data.idx, keras_preact.data.cifar_files\n"
        "import keras_preact.data.numpy_pipeline\n"
        "print('ok')"
    )
    env = dict(
        os.environ,
        KERAS_BACKEND="jax"
        if os.environ.get("KERAS_BACKEND") == "tensorflow"
        else os.environ.get("KERAS_BACKEND", "jax"),
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
