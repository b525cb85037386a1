"""keras.applications `.h5` weights: the Keras 2 HDF5 layout, keyed by layer name.

Layout of the files Keras downloads for `ResNet50V2` & co. (`*_tf_dim_ordering_tf_kernels.h5`):
root attribute `layer_names`; one group per layer with attribute `weight_names`
(`"conv1_conv/kernel:0"`), each naming a dataset under the group. A whole-model `.h5`
keeps the same tree under `model_weights`. Kernels are already HWIO, so reading is
renaming only: this package's layer names are keras.applications' names.
"""

import math
import os

import numpy as np

from keras_preact._optional import require


def _decode(x):
    return x.decode("utf8") if isinstance(x, bytes) else str(x)


#: The most elements a tensor may declare when no model says what to expect (2^27, 512 MiB
#: of float32; the largest tensor of any record has 2M). A file of a few KB can declare a
#: dataset of any size; reading it would allocate all of it.
MAX_ELEMENTS = 1 << 27


class ShapeError(ValueError):
    """A dataset whose declared shape does not fit the model: raised before reading it."""


def read(path, expected=None):
    """The neutral tensors of a Keras 2 layout file.

    `expected` (`{layer: {variable: shape}}`, the model's) is checked against every dataset's
    declared shape before any data is read: a dataset of another shape raises `ShapeError`,
    one the model has no place for raises too (except `predictions`, skipped when the model
    has none). Without `expected`, datasets larger than `MAX_ELEMENTS` raise.
    """
    h5py = require("h5py")

    tensors = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise ValueError(
                f"{path!r} has no `layer_names` attribute: not a Keras 2 weights file."
            )
        datasets = []  # every check first, then the reads
        for layer in map(_decode, root.attrs["layer_names"]):
            group = root[layer]
            for weight in map(_decode, group.attrs.get("weight_names", [])):
                var = weight.split("/")[-1].split(":")[0]
                dataset = group[weight]
                if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind not in "fiu":
                    raise ValueError(f"{path!r}: {dataset.name} is not a numeric dataset.")
                shape = tuple(dataset.shape)
                if expected is None:
                    if math.prod(shape) > MAX_ELEMENTS:
                        raise ShapeError(
                            f"{path!r}: dataset {dataset.name} declares shape {shape}, more "
                            f"than the {MAX_ELEMENTS} elements any weight tensor has; not "
                            "read. The file is corrupt or hostile."
                        )
                elif var in expected.get(layer, {}):
                    if shape != tuple(expected[layer][var]):
                        raise ShapeError(
                            f"{path!r}: dataset {dataset.name} declares shape {shape}: tensor "
                            f"{layer}/{var} has shape {shape}, the model expects "
                            f"{tuple(expected[layer][var])}. Nothing was read."
                        )
                elif layer == "predictions" and layer not in expected:
                    continue  # include_top=False: the classifier is not loaded
                else:
                    raise ShapeError(
                        f"{path!r}: dataset {dataset.name} ({layer}/{var}, shape {shape}) has "
                        "no place in the model: the file is for another depth or layout. "
                        "Nothing was read."
                    )
                datasets.append((layer, var, dataset))
        for layer, var, dataset in datasets:
            tensors.setdefault(layer, {})[var] = np.asarray(dataset, np.float32)
    return tensors


#: Storage types `write` accepts. Reading always returns float32; float16 halves a shipped
#: file (HDF5 has no portable bfloat16 type, so float16 is the half-size choice).
STORAGE_DTYPES = ("float32", "float16")


def write(path, tensors, dtype="float32"):
    h5py = require("h5py")

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {STORAGE_DTYPES}.")
    if dtype == "float16":
        finfo = np.finfo(np.float16)
        for layer, weights in tensors.items():
            for var, value in weights.items():
                v = np.asarray(value, np.float64)
                big = np.abs(v).max(initial=0.0)
                if not np.all(np.isfinite(v)) or big > finfo.max:
                    raise ValueError(
                        f"{layer}/{var} (max |x| {big:.4g}) does not fit float16 (max "
                        f"{finfo.max:.4g}); store it as float32."
                    )

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["layer_names"] = np.array([n.encode("utf8") for n in tensors])
            f.attrs["backend"] = b"numpy"
            f.attrs["keras_version"] = b"keras_preact"
            f.attrs["keras_preact"] = b"1"  # tells our files from keras.applications ones
            for layer, weights in tensors.items():
                group = f.create_group(layer)
                names = [f"{layer}/{var}:0" for var in weights]
                group.attrs["weight_names"] = np.array([n.encode("utf8") for n in names])
                for name, value in zip(names, weights.values()):
                    group.create_dataset(name, data=np.asarray(value, dtype))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
