"""Reader for the CIFAR-10/100 "python version" archives (numpy only).

These are the `cifar-10-python.tar.gz` and `cifar-100-python.tar.gz` files from
the CIFAR home page, either as the tarball or extracted into a directory.
"""

import io
import os
import pickle
import tarfile
import zlib

import numpy as np

_LAYOUT = {
    "cifar10": {
        "tarball": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
        "classes": 10,
    },
    "cifar100": {
        "tarball": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "classes": 100,
    },
}


#: The globals a CIFAR batch may name: numpy's array and dtype reconstruction (the archive's
#: Python 2 pickles and any later protocol), `_codecs.encode`, which protocol 2 uses for
#: bytes, and `bytes()` for an empty one (`_empty_bytes`). Everything else (`os.system`,
#: `builtins.eval`, ...) is refused: a pickle can call any global it names.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
_PIXELS = 3 * 32 * 32


def _empty_bytes(*args):
    """`bytes()` as protocol 2 pickles an empty bytes; `bytes(n)` (n zero bytes) is refused."""
    if args:
        raise pickle.UnpicklingError(f"bytes{args!r}: only bytes() makes an empty batch field")
    return b""


class _BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR batch and runs no code: `find_class` admits only `_SAFE_GLOBALS`."""

    def __init__(self, data, where):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.where = where

    def find_class(self, module, name):
        if (module, name) in (("builtins", "bytes"), ("__builtin__", "bytes")):
            return _empty_bytes
        if (module, name) not in _SAFE_GLOBALS:
            raise ValueError(
                f"{self.where}: refused to load the global {module}.{name}: a CIFAR batch holds "
                "only numpy arrays, lists and bytes, and unpickling it would run that code. "
                "The file is not the CIFAR archive's; do not use it."
            )
        return super().find_class(module, name)


def _unpickle(data, where, label_key, classes):
    """The `(data, labels)` of one batch file's bytes, checked; errors name `where`."""
    try:
        batch = _BatchUnpickler(data, where).load()
    except ValueError as e:
        if str(e).startswith(f"{where}:"):
            raise
        batch, error = None, e
    except (pickle.UnpicklingError, EOFError, TypeError, KeyError, IndexError, AttributeError,
            MemoryError, RecursionError) as e:  # fmt: skip
        batch, error = None, e
    if batch is None:
        raise ValueError(
            f"{where}: not a readable CIFAR batch ({type(error).__name__}: {error}); the file "
            "is truncated or corrupt. Download the archive again."
        ) from error
    if not isinstance(batch, dict):
        raise ValueError(f"{where}: a CIFAR batch is a dict; this file holds a {type(batch)}.")
    missing = [k for k in (b"data", label_key) if k not in batch]
    if missing:
        raise ValueError(
            f"{where}: the batch lacks {missing}; it has {sorted(map(repr, batch))[:8]}."
        )
    images = batch[b"data"]
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
            and images.shape[1] == _PIXELS):  # fmt: skip
        described = (
            f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images)
        )
        raise ValueError(f"{where}: `data` is {described}; expected uint8 (N, {_PIXELS}).")
    labels = batch[label_key]
    if not (isinstance(labels, (list, np.ndarray))
            and all(isinstance(v, (int, np.integer)) for v in labels)):  # fmt: skip
        raise ValueError(f"{where}: {label_key!r} is not a list of ints.")
    labels = np.asarray(labels, np.int64).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{where}: {len(images)} images but {len(labels)} labels.")
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        raise ValueError(
            f"{where}: label {labels[bad][0]} (at index {np.flatnonzero(bad)[0]}, {bad.sum()} "
            f"such labels) is outside [0, {classes}): this dataset has {classes} classes."
        )
    return images, labels


def _to_arrays(batches):
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    # Rows are stored channel-major (3 x 32 x 32).
    images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images, dtype=np.uint8), labels


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

    Raises:
        ValueError: naming the file, for a damaged archive or batch, a batch that is
            not in the CIFAR format, a label outside the dataset's classes, or a
            pickle naming any global but numpy's array reconstruction (nothing in it
            is run).

    Example:

    >>> (x, y), (xt, yt) = load_cifar("cifar10", "~/data")  # doctest: +SKIP
    """
    if name not in _LAYOUT:
        raise ValueError(f"name must be one of {sorted(_LAYOUT)}; got {name!r}.")
    layout = _LAYOUT[name]
    data_dir = os.path.expanduser(data_dir)
    tarball = os.path.join(data_dir, layout["tarball"])
    checks = layout["label_key"], layout["classes"]
    out = []
    if os.path.isfile(tarball):
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                for split in ("train", "test"):
                    batches = []
                    for n in layout[split]:
                        member = f"{layout['folder']}/{n}"
                        try:
                            data = tar.extractfile(member).read()
                        except KeyError as e:
                            raise ValueError(f"{tarball!r} has no member {member!r}.") from e
                        batches.append(_unpickle(data, f"{tarball}:{member}", *checks))
                    out.append(_to_arrays(batches))
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ValueError(
                f"{tarball!r}: damaged archive ({type(e).__name__}: {e}); it is truncated or "
                "corrupt. Download it again."
            ) from e
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
                batches.append(_unpickle(f.read(), path, *checks))
        out.append(_to_arrays(batches))
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
                pickle.dump(batch, f, protocol=2)  # the archive's own protocol
