#!/usr/bin/env bash
# The main job on a fresh Debian/Ubuntu machine: install what it needs, then a real,
# short Fashion-MNIST training (PreActResNet20, 6 epochs, ~12-17 min on 2 CPU cores;
# see docs/training.md for the recorded run). Extra arguments go to training/cifar.py,
# e.g. `bash training/quickstart.sh --epochs=1` for a 2-3 minute check.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import keras_preact, absl, tensorflow" 2>/dev/null; then
  "$PYTHON" -m pip install -q -e ".[train]"
fi
export KERAS_BACKEND=${KERAS_BACKEND:-tensorflow}
"$PYTHON" training/cifar.py --dataset=fashion_mnist --source=files \
  --data_dir=/usr/share/datasets/fashion-mnist --model=PreActResNet20 \
  --epochs=6 --batch_size=128 --lr_schedule=cosine --base_lr=0.1 --warmup_steps=200 \
  --pipeline=numpy --verbose=2 --model_dir="${MODEL_DIR:-runs/fashion_mnist_preactresnet20}" "$@"
