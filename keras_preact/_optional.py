"""Optional dependencies: imported where first needed, with an error that names what to
install.

A reader that cannot import its package must say so, not report the file it was reading as
corrupt: `require` raises `MissingDependency` (an ImportError), and the readers' own error
handlers let it through.
"""

import importlib

#: Top-level module -> (pip package, keras-preact extra, what needs it).
PACKAGES = {
    "h5py": ("h5py", "weights", "reading and writing .h5 weights files"),
    "safetensors": ("safetensors", "weights", "reading .safetensors files (timm's weights)"),
    "torchfile": ("torchfile", "weights", "reading .t7 files (fb.resnet.torch's weights)"),
    "tensorflow_datasets": ("tensorflow-datasets", "train", "reading TFDS datasets"),
}


class MissingDependency(ImportError):
    """An optional package is not installed; the message says which and how to get it."""


def require(module):
    """Imports `module` (e.g. "safetensors.numpy"), or raises `MissingDependency`.

    >>> require("h5py").__name__
    'h5py'
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package, extra, purpose = PACKAGES[module.split(".")[0]]
        raise MissingDependency(
            f"{purpose[0].upper()}{purpose[1:]} needs the {package} package, which is not "
            f"installed: pip install 'keras-preact[{extra}]' (or pip install {package}). "
            f"({type(e).__name__}: {e})"
        ) from e
