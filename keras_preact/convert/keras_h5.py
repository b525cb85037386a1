"""keras.applications `.h5` weights: the Keras 2 HDF5 layout, keyed by layer name.

Layout of the files Keras downloads for `ResNet50V2` & co. (`*_tf_dim_ordering_tf_kernels.h5`):
root attribute `layer_names`; one group per layer with attribute `weight_names`
(`"conv1_conv/kernel:0"`), each naming a dataset under the group. A whole-model `.h5`
keeps the same tree under `model_weights`. Kernels are already HWIO, so reading is
renaming only: this package's layer names are keras.applications' names.
"""

import os

import numpy as np


def _decode(x):
    return x.decode("utf8") if isinstance(x, bytes) else str(x)


def read(path):
    import h5py

    tensors = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise ValueError(
                f"{path!r} has no `layer_names` attribute: not a Keras 2 weights file."
            )
        for layer in map(_decode, root.attrs["layer_names"]):
            group = root[layer]
            for weight in map(_decode, group.attrs.get("weight_names", [])):
                var = weight.split("/")[-1].split(":")[0]
                tensors.setdefault(layer, {})[var] = np.asarray(group[weight], np.float32)
    return tensors


def write(path, tensors):
    import h5py

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
                    group.create_dataset(name, data=np.asarray(value, np.float32))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
