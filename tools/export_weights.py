r"""Exports a trained checkpoint as a shipped weights file and measures its test accuracy.

Reads a Keras 3 `.weights.h5` written by `training/cifar.py` (keyed by Keras' internal
paths, so it loads only into the same builder call), writes the by-layer-name HDF5 file
that `keras_preact.weights` ships and loads for any `include_top`/`data_format`, then
reloads it through `weights="fashion_mnist"`-style loading and prints the accuracy on the
whole Fashion-MNIST test set with the record's preprocessing.

    python tools/export_weights.py --checkpoint runs/fmnist_r20/best.weights.h5 \
        --out keras_preact/weights_files/preact_resnet20_fashion_mnist.h5
"""

import argparse
import os

import numpy as np

import keras_preact
from keras_preact import convert
from keras_preact import weights as kp_weights
from keras_preact.data import idx


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="PreActResNet20")
    parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    args = parser.parse_args()

    model = keras_preact.get_model(args.model, input_shape=(28, 28, 1), classes=10)
    kp_weights.load_weights_file(model, args.checkpoint)
    tensors = {
        layer.name: {w.name: np.asarray(w.numpy(), np.float32) for w in layer.weights}
        for layer in model.layers
        if layer.weights
    }
    convert.write_tensors(args.out, tensors)

    reloaded = keras_preact.get_model(args.model, input_shape=(28, 28, 1), classes=10,
                                      weights=args.out)  # fmt: skip
    _, (x_test, y_test) = idx.load_fashion_mnist(args.data_dir)
    x = keras_preact.preprocess_input(x_test, weights="fashion_mnist", data_format="channels_last")
    pred = np.argmax(reloaded.predict(x, batch_size=500, verbose=0), axis=-1)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes, sha256 "
          f"{kp_weights.file_digest(args.out)}); test top-1 {100 * np.mean(pred == y_test):.2f}% "
          f"on {len(y_test)} images")  # fmt: skip


if __name__ == "__main__":
    main()
