"""The memory allocator of a CPU training process.

TensorFlow's CPU kernels allocate their large buffers (activations, im2col workspaces) with
`malloc` at every op. glibc serves a buffer over its mmap threshold (at most 32 MiB) with a
fresh `mmap` and returns it with `munmap`, so every step touches new pages and the kernel
zero-fills them one page fault at a time: on a 2-core VM, PreActResNet56 at batch 128 took
about a million page faults per step, half of its wall time in the kernel. tcmalloc and
jemalloc keep freed memory for reuse. An allocator can only be chosen before a process
starts (`LD_PRELOAD`), so this module picks one for the child processes a launcher starts;
docs/benchmarks.md ("Memory allocator on the CPU") has the measurement. From a shell:

    export LD_PRELOAD=$(python -m keras_preact.train.allocator)   # tcmalloc where installed

The module imports only the standard library, so `python keras_preact/train/allocator.py`
gives the same line without importing the package (and Keras' backend) first.

Example:

>>> env = preload_env({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, ALLOCATORS)
>>> env["LD_PRELOAD"]  # an allocator already preloaded is kept
'/opt/libjemalloc.so.2'
>>> preloaded({"LD_PRELOAD": "libfoo.so:/usr/lib/libtcmalloc_minimal.so.4"})
'tcmalloc'
"""

import ctypes.util
import os

#: The allocators looked for, first found first: `ctypes.util.find_library` names.
ALLOCATORS = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}


def preloaded(env=None):
    """The allocator of `ALLOCATORS` that `env`'s `LD_PRELOAD` names, or None."""
    paths = (os.environ if env is None else env).get("LD_PRELOAD", "")
    for path in paths.replace(" ", ":").split(":"):
        base = os.path.basename(path)
        for name, libraries in ALLOCATORS.items():
            if any(base.startswith(f"lib{lib}.so") for lib in libraries):
                return name
    return None


def find(name):
    """The shared library of allocator `name` (a key of `ALLOCATORS`) that the dynamic
    loader would load, e.g. `libtcmalloc_minimal.so.4`, or None where it is not installed."""
    if name not in ALLOCATORS:
        raise ValueError(f"allocator {name!r} is none of {['system', *ALLOCATORS]}.")
    for library in ALLOCATORS[name]:
        if found := ctypes.util.find_library(library):
            return found
    return None


def preload_env(env, names):
    """A copy of `env` whose `LD_PRELOAD` starts with the first installed allocator of
    `names`; unchanged where `env` already preloads one of `ALLOCATORS` or none is found."""
    env = dict(env)
    if preloaded(env):
        return env
    for name in names:
        if library := find(name):
            env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD")) if p)
            break
    return env


def main():
    """Prints `LD_PRELOAD` with the first installed allocator in front (as it is, if it
    already preloads one or none is installed)."""
    print(preload_env(os.environ, ALLOCATORS).get("LD_PRELOAD", ""))


if __name__ == "__main__":
    main()
