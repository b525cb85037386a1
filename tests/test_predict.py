"""`keras_preact.train.predict`: the top classes of image files, from a weights record or a
run folder, read as the weights expect them."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from trainer_runs import REPO, cifar_cmd, fake_cifar, run

from keras_preact.train import predict, sources

FMNIST = "/usr/share/datasets/fashion-mnist"
# How files become the net's input does not depend on the backend (the models' numerics
# are tested per backend elsewhere): once, under JAX, the quickest to build and run a net.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="backend-independent; run once, under jax"
)


def _pngs(folder, images, labels):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        paths.append(os.path.join(folder, f"{i:03d}_label{label}.png"))
        Image.fromarray(image.squeeze()).save(paths[-1])
    return paths


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_the_shipped_record_names_real_test_images_written_as_png(tmp_path):
    """The first 40 Fashion-MNIST test images as PNG files: the probabilities are the
    model's on the IDX arrays (the files are read exactly as the weights expect), the names
    are Fashion-MNIST's, and at least 36 of the top-1 classes are right."""
    from keras_preact.data import idx

    x = idx.read_idx(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz"))[:40, ..., None]
    y = idx.read_idx(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz"))[:40]
    paths = _pngs(tmp_path / "png", x, y)
    predictor = predict.Predictor("fashion_mnist")
    rows = predictor.predict(paths, top=3, batch_size=16)
    np.testing.assert_allclose(
        [top[0][2] for _, top in rows], predictor.probabilities(x).max(-1), atol=1e-6
    )
    names = sources.CLASS_NAMES["fashion_mnist"]
    assert sum(top[0][0] == names[label] for (_, top), label in zip(rows, y)) >= 36


def test_a_run_folder_predicts_with_its_classes_and_normalization(tmp_path):
    """A CIFAR-10 run folder: its final weights, its normalization (the model applies the
    run's mean and std to [0, 255] pixels) and CIFAR-10's class names; JSON and CSV output."""
    data = fake_cifar(tmp_path / "data")
    run(cifar_cmd(data, tmp_path / "run", "--epochs=1", "--steps_per_epoch=1"))
    from keras_preact.data import cifar_files

    (_, _), (xt, yt) = cifar_files.load_cifar("cifar10", data)
    paths = _pngs(tmp_path / "png", xt[:5], yt[:5])
    predictor = predict.Predictor(str(tmp_path / "run"))
    assert predictor.weights.endswith("final.weights.h5") and predictor.shape == (32, 32, 3)
    rows = predictor.predict(paths, top=2)
    np.testing.assert_allclose(
        [top[0][2] for _, top in rows], predictor.probabilities(xt[:5]).max(-1), atol=1e-6
    )
    assert all(top[0][0] in sources.CLASS_NAMES["cifar10"] for _, top in rows)
    parsed = json.loads(predict.render(rows, "json"))
    assert [r["image"] for r in parsed] == paths and len(parsed[0]["top"]) == 2
    lines = predict.render(rows, "csv").splitlines()
    assert lines[0] == "image,rank,class,index,probability" and len(lines) == 11


def test_what_cannot_be_read_is_named(tmp_path):
    """A file that is not an image, a missing path and a folder without images each raise
    an error naming them; the command turns one into a single line and exit 1, and prints
    the table for a good file."""
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="notes.png is not a readable image"):
        predict.read_image(str(bad), (28, 28, 1))
    with pytest.raises(FileNotFoundError, match="missing.png: no such file"):
        predict.image_files([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="empty holds no image files"):
        predict.image_files([str(empty)])
    cmd = [sys.executable, "-m", "keras_preact.train.predict", "--weights=fashion_mnist"]
    out = subprocess.run([*cmd, str(bad)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 1 and "notes.png is not a readable image" in out.stderr, out.stderr
    good = _pngs(tmp_path / "good", np.zeros((1, 28, 28, 1), np.uint8), [0])
    out = subprocess.run([*cmd, "--top=2", *good], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[1].startswith(good[0])
