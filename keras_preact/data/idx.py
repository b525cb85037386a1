"""Reader for the IDX files of MNIST and Fashion-MNIST (numpy only).

The files may be gzip-compressed or not; the Debian package
`dataset-fashion-mnist` ships them re-gzipped, so their bytes (and checksums)
differ from the upstream `.gz` files while the decompressed data is identical.
"""

import gzip
import math
import os
import zlib

import numpy as np

#: Classes of Fashion-MNIST and MNIST: labels lie in `[0, NUM_CLASSES)`.
NUM_CLASSES = 10

# IDX type codes (third byte of the magic number) -> numpy dtype, big endian.
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path):
    """Reads one IDX file into a numpy array.

    Args:
        path: path to an IDX file, optionally gzip-compressed (detected from
            the content, not the file name).

    Returns:
        A numpy array with the shape and dtype stored in the file.

    Raises:
        ValueError: naming the file, if it is not a complete IDX file (a damaged gzip
            stream, a short header, data of another size than the header declares).

    Example:

    >>> labels = read_idx("t10k-labels-idx1-ubyte.gz")  # doctest: +SKIP
    >>> labels.shape  # doctest: +SKIP
    (10000,)
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:  # cut short, bad CRC, bad deflate data
            raise ValueError(
                f"{path!r}: damaged gzip stream ({type(e).__name__}: {e}); the file is "
                "truncated or corrupt. Download it again."
            ) from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"Not an IDX file: {path!r} (magic {data[:4]!r}).")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(
            f"Unknown IDX type code {type_code:#x} in {path!r}; "
            f"expected one of {sorted(_IDX_DTYPES)}."
        )
    dtype = np.dtype(_IDX_DTYPES[type_code])
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"IDX file {path!r} declares {ndim} dimensions but has {len(data)} bytes, fewer "
            f"than the {header} of its header: truncated or corrupt."
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(data) - header != expected:
        raise ValueError(
            f"IDX file {path!r} holds {len(data) - header} bytes of data, "
            f"expected {expected} for shape {shape}."
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def write_idx(path, array, compress=True):
    """Writes a uint8 array as an IDX file, gzip-compressed unless `compress=False`.

    The inverse of `read_idx` for the Fashion-MNIST/MNIST element type; tests use it to make
    small IDX fixtures (gzip `mtime=0`, so equal arrays give equal bytes).
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx writes uint8 arrays; received dtype={array.dtype}.")
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(data, mtime=0) if compress else data)


def _find(data_dir, stem):
    for suffix in (".gz", ""):
        path = os.path.join(data_dir, stem + suffix)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"Neither {stem}.gz nor {stem} found in data_dir={data_dir!r}.")


def load_fashion_mnist(data_dir):
    """Loads Fashion-MNIST (or MNIST) from the four IDX files in a directory.

    Args:
        data_dir: directory holding `train-images-idx3-ubyte[.gz]`,
            `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]` and
            `t10k-labels-idx1-ubyte[.gz]`, for example
            `/usr/share/datasets/fashion-mnist` from the Debian package
            `dataset-fashion-mnist`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images of shape
        `(N, 28, 28, 1)` and int64 labels of shape `(N,)`.

    Example:

    >>> (x, y), _ = load_fashion_mnist("/usr/share/datasets/fashion-mnist")
    >>> x.shape, y.shape
    ((60000, 28, 28, 1), (60000,))
    """
    splits = []
    for prefix in ("train", "t10k"):
        image_path = _find(data_dir, f"{prefix}-images-idx3-ubyte")
        label_path = _find(data_dir, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"Inconsistent {prefix} IDX files {image_path!r} (shape {images.shape}) and "
                f"{label_path!r} (shape {labels.shape}): expected (N, rows, cols) images "
                "and N labels."
            )
        labels = labels.astype(np.int64)
        bad = (labels < 0) | (labels >= NUM_CLASSES)
        if bad.any():
            raise ValueError(
                f"{label_path!r}: label {labels[bad][0]} (at index {np.flatnonzero(bad)[0]}, "
                f"{bad.sum()} such labels) is outside [0, {NUM_CLASSES}): Fashion-MNIST and "
                "MNIST have 10 classes. The file is corrupt or not a label file."
            )
        splits.append((images[..., None], labels))
    return tuple(splits)
