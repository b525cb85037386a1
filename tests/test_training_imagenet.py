"""training/imagenet.py and training/evaluate.py on tiny ImageNet-format shards of real photos."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")
skimage_data = pytest.importorskip("skimage.data")
PIL = pytest.importorskip("PIL.Image")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(array):
    buf = io.BytesIO()
    PIL.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from keras_preact.data import tfdata

    root = tmp_path_factory.mktemp("shards")
    photos = [
        _jpeg(getattr(skimage_data, n)()[..., :3])
        for n in ("astronaut", "coffee", "chelsea", "rocket")
    ]
    photos.append(_jpeg(skimage_data.camera()))  # grayscale
    labels = [1, 2, 3, 1, 2]
    for i in range(2):
        tfdata.write_imagenet_tfrecords(str(root / f"train-{i:05d}-of-00002"), photos, labels)
    tfdata.write_imagenet_tfrecords(
        str(root / "validation-00000-of-00001"), photos + [b"not an image"], labels + [1]
    )
    return root


def _run(args, tmp_path):
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_imagenet_trainer_then_evaluate(shards, tmp_path):
    model_dir = tmp_path / "run"
    _run(
        [
            "training/imagenet.py",
            "--source=tfrecord",
            f"--data_dir={shards}",
            "--model=PreActResNet20",
            "--num_classes=3",
            "--num_train_examples=10",
            "--image_size=32",
            "--eval_size=32",
            "--eval_resize=36",
            "--batch_size=4",
            "--epochs=2",
            "--steps_per_epoch=2",
            "--shuffle_buffer=8",
            "--verbose=2",
            "--train_crop=inception",
            "--color_augmentation",
            f"--model_dir={model_dir}",
        ],
        tmp_path,
    )
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_images"] >= 0
    assert 0.0 <= summary["eval_top1"] <= 1.0
    config = json.loads((model_dir / "config.json").read_text())
    assert config["base_lr"] == pytest.approx(0.1 * 4 / 256)  # linear scaling rule
    weights = model_dir / "final.weights.h5"
    results = {}
    for name, extra in (
        ("224", []),
        ("320", ["--eval_resize=320", "--eval_size=320"]),
        ("ten", ["--ten_crop"]),
    ):
        out_json = tmp_path / f"{name}.json"
        _run(
            [
                "training/evaluate.py",
                "--model=PreActResNet20",
                f"--weights={weights}",
                "--source=tfrecord",
                f"--data_dir={shards}",
                "--num_classes=3",
                "--batch_size=2",
                f"--output={out_json}",
                *extra,
            ],
            tmp_path,
        )
        results[name] = json.loads(out_json.read_text())
    for result in results.values():
        # Five photos decode; the broken record is skipped and counted.
        assert result["examples"] == 5 and result["skipped_images"] == 1
        assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert results["320"]["eval_size"] == 320 and results["ten"]["ten_crop"]
    np.testing.assert_allclose(results["224"]["top5"], 1.0)  # 3 classes: top-5 is all
