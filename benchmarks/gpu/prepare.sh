#!/usr/bin/env bash
# Gathers what the GPU experiments need on a machine with JAX (CUDA) but no Keras, no
# TensorFlow and no network, into one git-ignored folder, `.gpu/` at the repository root:
#   .gpu/wheels/         keras and the two of its requirements such a machine lacks (namex,
#                        optree), as Python 3.12 manylinux x86_64 wheels
#   .gpu/fashion-mnist/  the four Fashion-MNIST IDX files
# docs/gpu.md gives the one-line install there and the command of each experiment.
#
#   bash benchmarks/gpu/prepare.sh            # KERAS_VERSION=3.15.1 PYTHON_VERSION=3.12 by default
#
# Keras 3.15 requires absl-py, numpy, rich, namex, h5py, optree, ml-dtypes and packaging
# (its wheel's METADATA); a CUDA machine with JAX and PyTorch usually has all but namex and
# optree (EXTRA_WHEELS adds more, e.g. EXTRA_WHEELS="h5py ml-dtypes"). The wheels and the data
# come to about 33 MB, to copy to an offline GPU cluster with the repository (about 5 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
KERAS_VERSION="${KERAS_VERSION:-$(python3 -c 'import keras; print(keras.__version__)' 2>/dev/null || echo 3.15.1)}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
DATA_SRC="${DATA_SRC:-/usr/share/datasets/fashion-mnist}"
DEST=.gpu
export KERAS_BACKEND="${KERAS_BACKEND:-numpy}"  # the helper imports below need no framework

grep -qx '/.gpu/' .gitignore || { echo "error: .gitignore lacks /.gpu/" >&2; exit 1; }
mkdir -p "$DEST/wheels" "$DEST/fashion-mnist"
rm -f "$DEST"/wheels/*.whl

# 1. Wheels: pip matches each manylinux tag exactly, so several are listed.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$DEST/wheels" \
  "keras==$KERAS_VERSION" namex optree ${EXTRA_WHEELS:-}
for w in "$DEST"/wheels/keras-*.whl; do
  echo "keras requires:" $(unzip -p "$w" '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v extra)
done

# 2. Data: the Debian package dataset-fashion-mnist's files (gzip; keras_preact.data.idx reads them).
if [ ! -f "$DATA_SRC/train-images-idx3-ubyte.gz" ]; then
  echo "error: no Fashion-MNIST in $DATA_SRC (apt-get install dataset-fashion-mnist, or set DATA_SRC)" >&2
  exit 1
fi
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  cp "$DATA_SRC/$f.gz" "$DEST/fashion-mnist/"
done
# `python3 -` imports from the current folder, the repository root: keras_preact needs no install.
python3 - "$DEST/fashion-mnist" <<'PY'
import sys
from keras_preact.data import idx
(x, y), (xt, yt) = idx.load_fashion_mnist(sys.argv[1])
assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1), (x.shape, xt.shape)
print(f"Fashion-MNIST: {len(x)} training and {len(xt)} test images read back")
PY

# 3. Sizes.
ls -l "$DEST"/wheels "$DEST"/fashion-mnist
total=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "$DEST: $((total / 1024)) KiB; tracked files: $((tree / 1024)) KiB"
