#!/usr/bin/env bash
# The main job on a fresh Debian/Ubuntu machine: install what it needs, then a real,
# short Fashion-MNIST training (PreActResNet20, 6 epochs; 92.3 % test top-1 in 11-15
# minutes on 2 CPU cores, see docs/training.md). Extra arguments go to
# training/cifar.py, e.g. `bash training/quickstart.sh --epochs=1` for a quick check.
#   Data:   the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
#   Malloc: Debian's libtcmalloc-minimal4, preloaded under TensorFlow (where it installs).
#   Python: the active virtual environment, or ./.venv (created here) with .[train].
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
# tcmalloc: TensorFlow's CPU steps fault their buffers in again at every op under glibc's
# malloc (docs/benchmarks.md, "Memory allocator on the CPU"); optional, so a failure only warns.
if ! ldconfig -p 2>/dev/null | grep -q -e libtcmalloc -e libjemalloc; then
  $SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
    || echo "note: libtcmalloc-minimal4 not installed; training with the system's malloc" >&2
fi
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv 2>/dev/null || {
      $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv
      python3 -m venv .venv
    }
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
if ! python -c "import keras_preact, absl, tensorflow" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[train]"
fi
export KERAS_BACKEND=${KERAS_BACKEND:-tensorflow}
if [ "$KERAS_BACKEND" = tensorflow ]; then
  # The module as a file: `python -m` would import the package, and so TensorFlow (~5 s).
  LD_PRELOAD=$(python keras_preact/train/allocator.py) && export LD_PRELOAD
fi
python training/cifar.py --dataset=fashion_mnist --source=files \
  --data_dir=/usr/share/datasets/fashion-mnist --model=PreActResNet20 \
  --epochs=6 --batch_size=128 --lr_schedule=cosine --base_lr=0.1 --warmup_steps=200 \
  --pipeline=numpy --verbose=2 --model_dir="${MODEL_DIR:-runs/fashion_mnist_preactresnet20}" "$@"
