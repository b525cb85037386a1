"""Readers of upstream weight files into one neutral form, and its on-disk cache.

Every reader returns `{layer_name: {variable_name: np.ndarray}}` keyed by this package's
layer names (`conv2_block1_1_conv`, `post_bn`, ...) and Keras variable names (`kernel`,
`bias`, `gamma`, `beta`, `moving_mean`, `moving_variance`), already in Keras layouts
(conv kernels HWIO, dense kernels `(in, out)`), float32. `keras_preact.weights.assign`
then checks every tensor against the model before setting any.
"""

import os

from keras_preact._optional import require
from keras_preact.convert import keras_h5, timm, torch7

#: format name -> the module whose `read(path)` returns the neutral form.
FORMATS = {
    "keras_h5": keras_h5,
    "keras_preact_h5": keras_h5,  # our own by-name files: same layout, tagged, any layout
    "timm_safetensors": timm,
    "torch7": torch7,
}


def detect_format(path):
    """The format of a weights file, from its content: one of `FORMATS` or `"keras_native"`.

    `"keras_preact_h5"` is this package's own by-layer-name file (`write_tensors`: shipped
    weights, conversion caches); it carries no layout, the builder arguments give it.

    `"keras_native"` is a Keras 3 `.weights.h5` file (`model.save_weights`), keyed by
    Keras' internal paths rather than layer names; it loads with `model.load_weights`.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head == b"\x89HDF\r\n\x1a\n":
        h5py = require("h5py")

        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise ValueError(
                f"Cannot open the weights file {path!r} as HDF5 ({e}): it is truncated or "
                "corrupt. Re-export or re-download it."
            ) from e
        with f:
            if "keras_preact" in f.attrs:
                return "keras_preact_h5"
            if "layer_names" in f.attrs or "model_weights" in f:
                return "keras_h5"
            if "layers" in f or "vars" in f:
                return "keras_native"
        raise ValueError(
            f"{path!r} is an HDF5 file but neither a Keras 2 nor a Keras 3 weights file."
        )
    if path.endswith(".safetensors"):
        return "timm_safetensors"
    if path.endswith(".t7"):
        return "torch7"
    raise ValueError(
        f"Cannot tell the format of {path!r}: expected an HDF5 Keras weights file, a timm "
        "`.safetensors` file or a Torch7 `.t7` file."
    )


#: Raised for a tensor whose declared shape does not fit, before its data is read.
ShapeError = keras_h5.ShapeError


def read_tensors(path, fmt=None, expected=None):
    """Reads `path` (format `fmt`, detected when None) into the neutral form.

    `expected` (`{layer: {variable: shape}}`, a model's) lets an HDF5 reader check every
    declared shape before it reads any data (see `keras_h5.read`); the other formats' readers
    bound every tensor by the file's size, and `keras_preact.weights.assign` checks them.
    """
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"No converter for format {fmt!r}; converters: {sorted(FORMATS)}.")
    if FORMATS[fmt] is keras_h5:
        return keras_h5.read(os.fspath(path), expected=expected)
    return FORMATS[fmt].read(os.fspath(path))


def write_tensors(path, tensors, dtype="float32"):
    """Writes the neutral form as a by-layer-name HDF5 file, atomically (tmp + os.replace).

    The file has the Keras 2 weights layout (`layer_names`, `weight_names`), so
    `keras_h5.read` reads it back and Keras' own legacy loader accepts it too.
    `dtype="float16"` stores every tensor in half precision (half the size; read back as
    float32); it raises if a tensor does not fit float16's range.
    """
    keras_h5.write(os.fspath(path), tensors, dtype=dtype)
