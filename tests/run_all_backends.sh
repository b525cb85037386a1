#!/usr/bin/env bash
# The project's test command (README "Set-up" and .ci/run): installs what the suite needs
# when it is missing, then runs the whole suite and the package's doctests once per Keras
# backend.
#   Python: the active virtual environment, or ./.venv (created here).
#   Extra arguments go to pytest, e.g. `bash tests/run_all_backends.sh -m "not slow"`;
#   BACKENDS="jax" limits the backends (the `backend_independent` tests, input pipelines,
#   files and command-line errors, run only under tensorflow: tests/conftest.py); WORKERS=1
#   runs the tests in one process.
#   The tests run in WORKERS (default: one per CPU core, at most 4) pytest-xdist processes,
#   a test module's tests in one process (--dist loadfile: module fixtures are built once).
set -uo pipefail
cd "$(dirname "$0")/.."
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  # Real Fashion-MNIST for the smoke run and the shipped-weights accuracy test.
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null
fi
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
if ! python -c "import keras_preact, tensorflow, tensorflow_datasets, jax, torch, pytest, xdist, h5py, safetensors, torchfile, skimage, build, tf2onnx, onnxruntime, ai_edge_litert" 2>/dev/null; then
  quiet() { grep -v "^WARNING: Location" || true; }
  python -m pip install -q --upgrade pip 2>&1 | quiet
  # torch pinned first: 2.13.0 is the CPU build here; an unpinned torch pulls CUDA wheels.
  python -m pip install -q "torch==2.13.0" 2>&1 | quiet
  python -m pip install -q -e ".[dev,train,weights,jax,export]" 2>&1 | quiet
fi
python -c "import keras, tensorflow, jax, torch; print('keras', keras.__version__, '| tensorflow', tensorflow.__version__, '| jax', jax.__version__, '| torch', torch.__version__)"

workers=${WORKERS:-$(python -c "import os; print(min(4, max(1, len(os.sched_getaffinity(0)))))")}
status=0
for backend in ${BACKENDS:-tensorflow jax torch}; do
  echo "=== KERAS_BACKEND=$backend ($workers test processes)"
  # PyTorch's OpenMP threads spin-wait for each other: with several test processes on few
  # cores, one thread each (a torch step otherwise stalls while another process holds a core).
  threads=()
  [ "$backend" = torch ] && [ "$workers" -gt 1 ] && threads=(OMP_NUM_THREADS=1)
  # The suite, and the examples in the package's docstrings (doctests).
  env "${threads[@]}" KERAS_BACKEND=$backend python -m pytest -q -rs -p no:cacheprovider \
    -n "$workers" --dist loadfile --durations=15 --doctest-modules tests keras_preact "$@" || status=1
done
exit $status
