"""keras_preact.train.allocator: which malloc a launcher preloads for its trainers."""

import ctypes.util
import os
import subprocess
import sys

import pytest

from keras_preact.train import allocator

pytestmark = pytest.mark.backend_independent

LIBRARIES = {"tcmalloc_minimal": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}


@pytest.fixture
def installed(monkeypatch):
    """`find_library` answers from a dict that a test fills: the libraries "installed"."""
    present = {}
    monkeypatch.setattr(ctypes.util, "find_library", present.get)
    return present


def test_preload_env_puts_the_first_installed_allocator_first(installed):
    installed["jemalloc"] = LIBRARIES["jemalloc"]
    env = allocator.preload_env({"LD_PRELOAD": "libother.so", "A": "1"}, allocator.ALLOCATORS)
    assert env == {"LD_PRELOAD": "libjemalloc.so.2:libother.so", "A": "1"}
    installed["tcmalloc_minimal"] = LIBRARIES["tcmalloc_minimal"]
    env = allocator.preload_env({}, allocator.ALLOCATORS)
    assert env == {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}
    assert allocator.preloaded(env) == "tcmalloc"
    assert allocator.preload_env({}, ["jemalloc"])["LD_PRELOAD"] == "libjemalloc.so.2"


def test_nothing_installed_or_already_preloaded_leaves_the_environment(installed):
    assert allocator.preload_env({"B": "2"}, allocator.ALLOCATORS) == {"B": "2"}
    installed.update({"tcmalloc_minimal": LIBRARIES["tcmalloc_minimal"]})
    mine = {"LD_PRELOAD": "/opt/jemalloc/lib/libjemalloc.so.2"}
    assert allocator.preload_env(mine, allocator.ALLOCATORS) == mine
    assert allocator.preloaded({"LD_PRELOAD": "libtcmalloc.so.4 libx.so"}) == "tcmalloc"
    assert allocator.preloaded({"LD_PRELOAD": "libmytcmalloc_wrapper.so"}) is None
    assert allocator.preloaded({}) is None
    with pytest.raises(ValueError, match=r"allocator 'mimalloc' is none of \['system', "):
        allocator.find("mimalloc")


@pytest.mark.skipif(not allocator.find("tcmalloc"), reason="tcmalloc is not installed")
def test_a_child_started_with_the_environment_runs_on_tcmalloc():
    """The real loader: the library preload_env names is mapped into the child."""
    env = allocator.preload_env({**os.environ, "LD_PRELOAD": ""}, ["tcmalloc"])
    maps = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/maps').read())"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "libtcmalloc" in maps


def test_the_module_runs_as_a_file_without_importing_the_package():
    """training/quickstart.sh runs `python keras_preact/train/allocator.py` before training:
    the standard library only, no Keras backend imported (about 5 s under TensorFlow)."""
    program = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__');"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('keras', 'keras_preact', 'tensorflow', 'jax', 'torch', 'numpy')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", program, allocator.__file__],
        env={**os.environ, "LD_PRELOAD": "libjemalloc.so.2"}, capture_output=True, text=True,
        check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out == ["libjemalloc.so.2", "[]"]
