import os
import tempfile

import keras
import pytest

# The trainers that tests start in subprocesses compile the same few programs again and
# again: under JAX they share one persistent compilation cache (the trainer honours
# JAX_COMPILATION_CACHE_DIR), which halves a repeated run (38 s -> 20 s here). Set after
# `import keras`, so this process's own JAX does not cache.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "keras_preact_test_jax_cache")
)


@pytest.fixture(autouse=True)
def _restore_globals():
    """Restores the global dtype policy and image data format after every test."""
    policy = keras.config.dtype_policy()
    data_format = keras.config.image_data_format()
    yield
    keras.config.set_dtype_policy(policy)
    keras.config.set_image_data_format(data_format)


@pytest.fixture
def seeded():
    """Seeds Keras' RNG with 1234: for modules whose thresholds depend on initializations
    (`pytestmark = pytest.mark.usefixtures("seeded")`)."""
    keras.utils.set_random_seed(1234)


@pytest.fixture
def mixed_bfloat16():
    """Runs the test under the `mixed_bfloat16` policy; the autouse fixture restores it."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    yield


@pytest.fixture
def backend():
    return keras.backend.backend()


@pytest.fixture
def channels_first_supported(backend):
    if backend == "tensorflow":
        pytest.skip("TensorFlow's CPU Conv2D does not support NCHW (channels_first)")
    if backend not in ("jax", "torch"):
        pytest.skip(f"channels_first not checked on backend {backend!r}")


#: The backend under which the `backend_independent` tests run (tests/run_all_backends.sh
#: runs it first).
ONCE_BACKEND = "tensorflow"


def pytest_collection_modifyitems(config, items):
    """Skips the `backend_independent` tests (input pipelines, files, command-line errors: no
    Keras op) outside `ONCE_BACKEND`; then puts the modules that hold slow tests first, each
    module's tests kept together and in order.

    With pytest-xdist's `--dist loadfile` (tests/run_all_backends.sh) modules are handed to
    the test processes in collection order: the long ones then start early, and the short
    ones fill in at the end instead of leaving one process running a long module alone.
    """
    if keras.backend.backend() != ONCE_BACKEND:
        once = pytest.mark.skip(reason=f"backend-independent; run once, under {ONCE_BACKEND}")
        for item in items:
            if item.get_closest_marker("backend_independent"):
                item.add_marker(once)
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)  # stable
