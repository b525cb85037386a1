"""Offline TFDS preparation (training/prepare_tfds.py) and TFDS-backed sources."""

import os
import subprocess
import sys

import numpy as np
import pytest

from keras_preact.data.idx import write_idx

tfds = pytest.importorskip("tensorflow_datasets")

pytestmark = pytest.mark.backend_independent
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prepare_fashion_mnist_offline_then_tfds_load(tmp_path):
    rng = np.random.default_rng(0)
    files = tmp_path / "files"
    files.mkdir()
    arrays = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        arrays[prefix] = (
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8),
        )
        write_idx(files / f"{prefix}-images-idx3-ubyte.gz", arrays[prefix][0])
        write_idx(files / f"{prefix}-labels-idx1-ubyte.gz", arrays[prefix][1])
    data_dir = tmp_path / "tfds"
    out = subprocess.run(
        [
            sys.executable,
            "training/prepare_tfds.py",
            "--dataset=fashion_mnist",
            f"--files_dir={files}",
            f"--data_dir={data_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # The registered builder reads the prepared files, with no download.
    x, y = tfds.as_numpy(
        tfds.load(
            "fashion_mnist",
            split="test",
            batch_size=-1,
            as_supervised=True,
            data_dir=str(data_dir),
            download=False,
        )
    )
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8
    order = np.argsort(y, kind="stable")
    expected = np.argsort(arrays["t10k"][1], kind="stable")
    np.testing.assert_array_equal(np.sort(y), np.sort(arrays["t10k"][1]))
    assert sorted(map(bytes, x[order].reshape(5, -1))) == sorted(
        map(bytes, arrays["t10k"][0][expected].reshape(5, -1))
    )
    from keras_preact.data import tfdata

    (xtr, ytr), (xte, yte) = tfdata.load_tfds_arrays(
        "fashion_mnist", data_dir=str(data_dir), download=False
    )
    assert xtr.shape == (12, 28, 28, 1) and yte.shape == (5,)
