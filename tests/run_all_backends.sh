#!/usr/bin/env bash
# The project's test command: the whole suite once per Keras backend (README "Tests").
# Extra arguments go to pytest, e.g. `bash tests/run_all_backends.sh -m "not slow"`.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
for backend in ${BACKENDS:-tensorflow jax torch}; do
  echo "=== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider "$@" || status=1
done
exit $status
