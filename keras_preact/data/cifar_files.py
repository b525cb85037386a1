"""Reader for the CIFAR-10/100 "python version" archives (numpy only).

These are the `cifar-10-python.tar.gz` and `cifar-100-python.tar.gz` files from
the CIFAR home page, either as the tarball or extracted into a directory.
"""

import os
import pickle
import tarfile

import numpy as np

_LAYOUT = {
    "cifar10": {
        "tarball": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
    },
    "cifar100": {
        "tarball": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
    },
}


def _unpickle(fileobj):
    return pickle.load(fileobj, encoding="bytes")


def _to_arrays(batches, label_key):
    images = np.concatenate([b[b"data"] for b in batches])
    labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
    # Rows are stored channel-major (3 x 32 x 32).
    images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images, dtype=np.uint8), labels.astype(np.int64)


def load_cifar(name, data_dir):
    """Loads CIFAR-10 or CIFAR-100 from the python-version files.

    Args:
        name: `"cifar10"` or `"cifar100"`.
        data_dir: a directory holding the tarball (`cifar-10-python.tar.gz`),
            the extracted folder (`cifar-10-batches-py/`) or the batch files
            themselves.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images of shape
        `(N, 32, 32, 3)` and int64 labels.

    Example:

    >>> (x, y), (xt, yt) = load_cifar("cifar10", "~/data")  # doctest: +SKIP
    """
    if name not in _LAYOUT:
        raise ValueError(f"name must be one of {sorted(_LAYOUT)}; got {name!r}.")
    layout = _LAYOUT[name]
    data_dir = os.path.expanduser(data_dir)
    tarball = os.path.join(data_dir, layout["tarball"])
    out = []
    if os.path.isfile(tarball):
        with tarfile.open(tarball, "r:gz") as tar:
            for split in ("train", "test"):
                batches = [
                    _unpickle(tar.extractfile(f"{layout['folder']}/{n}")) for n in layout[split]
                ]
                out.append(_to_arrays(batches, layout["label_key"]))
        return tuple(out)
    folder = os.path.join(data_dir, layout["folder"])
    if not os.path.isdir(folder):
        folder = data_dir
    for split in ("train", "test"):
        batches = []
        for n in layout[split]:
            path = os.path.join(folder, n)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{name}: {path!r} not found; expected {tarball!r} or the "
                    f"extracted {layout['folder']!r} folder in {data_dir!r}."
                )
            with open(path, "rb") as f:
                batches.append(_unpickle(f))
        out.append(_to_arrays(batches, layout["label_key"]))
    return tuple(out)


def write_cifar(name, data_dir, train, test):
    """Writes arrays in the python-version layout that `load_cifar` reads.

    Used to make small stand-in datasets for smoke tests; the training images
    are split over the same batch files as the real archive.

    Args:
        name: `"cifar10"` or `"cifar100"`.
        data_dir: output directory; the layout's folder is created in it.
        train: `(images, labels)`, uint8 `(N, 32, 32, 3)` and int labels.
        test: `(images, labels)`.

    Example:

    >>> x = np.zeros((10, 32, 32, 3), np.uint8); y = np.arange(10)
    >>> write_cifar("cifar10", "/tmp/c10", (x, y), (x, y))  # doctest: +SKIP
    """
    layout = _LAYOUT[name]
    folder = os.path.join(data_dir, layout["folder"])
    os.makedirs(folder, exist_ok=True)
    for split, (images, labels) in (("train", train), ("test", test)):
        files = layout[split]
        rows = np.asarray(images, np.uint8).transpose(0, 3, 1, 2).reshape(len(images), -1)
        for i, fname in enumerate(files):
            part = slice(i, None, len(files))
            batch = {b"data": rows[part], layout["label_key"]: [int(v) for v in labels[part]]}
            with open(os.path.join(folder, fname), "wb") as f:
                pickle.dump(batch, f)
