"""training/imagenet.py on a user's own data: class folders (with `~` paths), label mistakes
in TFRecord shards stopped before training, epochs from counted records, and the run's
class names reaching predict."""

import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytest.importorskip("tensorflow")
PIL = pytest.importorskip("PIL.Image")
skimage_data = pytest.importorskip("skimage.data")

from model_test_utils import REPO  # noqa: E402

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the tf.data input is the same under every backend (the trainer's loops under JAX "
    "and PyTorch are test_training_imagenet's); run once",
)


def _jpeg(array):
    buf = io.BytesIO()
    PIL.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _shards(root, labels):
    from keras_preact.data import tfdata

    photos = [
        _jpeg(getattr(skimage_data, n)()[..., :3]) for n in ("astronaut", "coffee", "chelsea")
    ]
    images = [photos[i % 3] for i in range(len(labels))]
    root.mkdir()
    for split in ("train", "validation"):
        tfdata.write_imagenet_tfrecords(str(root / f"{split}-00000-of-00001"), images, labels)
    return root


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, "training/imagenet.py", "--model=PreActResNet20", "--batch_size=4",
         "--verbose=2", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize(
    "labels, flags, fix",
    [
        ([0, 1, 2] * 4, ["--num_classes=3"], "--label_offset=0"),
        ([1, 2, 3] * 4, ["--num_classes=2"], "--num_classes=3"),
    ],
    ids=["0-based labels under --label_offset=1", "3 classes under --num_classes=2"],
)
def test_label_mistakes_stop_before_training_and_name_the_flag(tmp_path, labels, flags, fix):
    shards = _shards(tmp_path / "shards", labels)
    out = _run(f"--data_dir={shards}", *flags, f"--model_dir={tmp_path / 'run'}", "--epochs=1")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert fix in out.stderr and "--bad_labels=skip" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skipped_labels_are_reported_while_training_and_epochs_are_counted(tmp_path):
    shards = _shards(tmp_path / "shards", [1, 2, 3] * 4)  # 12 records, labels 0..2 after offset
    out = _run(f"--data_dir={shards}", "--num_classes=2", "--bad_labels=skip", "--epochs=1",
               "--image_size=32", f"--model_dir={tmp_path / 'run'}")  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Training records skipped so far: bad_label" in out.stdout, out.stdout[-2000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    # Counted from the shards (12 records), not ImageNet's 1,281,167.
    assert cfg["num_train_examples"] == 12 and cfg["steps_per_epoch"] == 3
    assert cfg["train_crop"] == "scale" and cfg["eval_resize"] == 37  # 32 x 256 / 224


def _folder(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for name in ("circle", "square"):
            for i in range(n):
                image = np.full((20, 20), 40, np.uint8) + rng.integers(0, 30, (20, 20), np.uint8)
                if name == "square":
                    image[5:15, 5:15] = 220
                else:
                    yy, xx = np.mgrid[:20, :20]
                    image[(yy - 10) ** 2 + (xx - 10) ** 2 < 30] = 220
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                PIL.fromarray(image).save(folder / f"{i}.png")
    (root / "train" / "circle" / "notes.txt").write_text("not an image")


def test_a_folder_of_own_images_trains_and_predict_names_its_classes(tmp_path):
    home = tmp_path / "home"
    _folder(home / "shapes")
    out = _run("--dataset=folder", "--data_dir=~/shapes", "--model_dir=~/runs/shapes",
               "--epochs=2", env={"HOME": str(home)})  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "2 classes, 16 training and 4 validation images" in out.stdout
    assert "not an image: 1" in out.stdout
    run = home / "runs" / "shapes"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["class_names"] == ["circle", "square"]
    assert (cfg["channels"], cfg["image_size"], cfg["train_crop"]) == (1, 20, "pad")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["listing_left_out"]["not_an_image"]["count"] == 1
    predicted = subprocess.run(
        [sys.executable, "-m", "keras_preact.train.predict", f"--weights={run}", "--top=2",
         "--format=json", str(home / "shapes" / "val" / "square" / "0.png")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    rows = json.loads(predicted.stdout)
    assert {t["class"] for t in rows[0]["top"]} == {"circle", "square"}


def test_source_hints_name_commands_that_exist():
    from keras_preact.train import sources

    pytest.importorskip("tensorflow_datasets")
    problem = sources.tfds_problem("files", None)  # a --source meant for cifar.py
    assert "'files' is not a TFDS dataset" in problem and "--dataset=folder" in problem
    offline = lambda host: False  # noqa: E731
    for name in ("imagenette", "cifar100"):
        hint = sources.tfds_problem(name, "/nonexistent", can_reach=offline)
        assert "prepare_tfds.py" not in hint and f"tfds build {name}" in hint, hint
    assert "prepare_tfds.py --dataset=cifar10 " in sources.tfds_problem(
        "cifar10", "/nonexistent", can_reach=offline
    )
