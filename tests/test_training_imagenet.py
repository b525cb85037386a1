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


def _train(shards, model_dir, tmp_path, *extra):
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
            "--shuffle_buffer=8",
            "--verbose=2",
            f"--model_dir={model_dir}",
            *extra,
        ],
        tmp_path,
    )
    return json.loads((model_dir / "summary.json").read_text())


@pytest.mark.slow
def test_imagenet_trainer_then_evaluate(shards, tmp_path):
    model_dir = tmp_path / "run"
    summary = _train(
        shards,
        model_dir,
        tmp_path,
        "--epochs=2",
        "--steps_per_epoch=2",
        "--train_crop=inception",
        "--color_augmentation",
        "--num_eval_examples=2",
        "--weight_decay=0",  # the eval loss is then the cross-entropy alone
    )
    assert summary["steps"] == 4
    assert summary["train_skipped_images"] == 0  # every training image decodes
    assert set(summary["train_skipped_by_cause"].values()) == {0}
    # The final evaluation scored the 2 images asked for, and counted its own skips apart.
    assert summary["eval_images_scored"] == 2
    config = json.loads((model_dir / "config.json").read_text())
    assert config["base_lr"] == pytest.approx(0.1 * 4 / 256)  # linear scaling rule
    assert config["origins"]["base_lr"] == "derived"
    if __import__("keras").backend.backend() != "tensorflow":
        return  # evaluate.py's protocols below are backend-independent: checked under TF
    weights = model_dir / "final.weights.h5"
    results = {}
    for name, extra in (
        ("trainer's", ["--eval_size=32", "--eval_resize=36", "--batch_size=2", "--max_batches=1"]),
        ("224", ["--batch_size=2"]),
        ("320", ["--eval_resize=320", "--eval_size=320", "--batch_size=2"]),
        ("ten", ["--ten_crop", "--batch_size=2"]),
    ):
        out_json = tmp_path / f"{name}.json"
        _run(
            [
                "training/evaluate.py",  # model and classes come from the run's config.json
                f"--weights={weights}",
                "--source=tfrecord",
                f"--data_dir={shards}",
                f"--output={out_json}",
                *extra,
            ],
            tmp_path,
        )
        results[name] = json.loads(out_json.read_text())
    # The trainer evaluated its first 2 validation images (--num_eval_examples=2): the
    # same weights, rebuilt by evaluate.py, give the same numbers on those 2 images.
    same = results["trainer's"]
    assert same["examples"] == 2 and same["model"] == "PreActResNet20"
    np.testing.assert_allclose(same["loss"], summary["eval_loss"], rtol=1e-4)
    assert same["top1"] == pytest.approx(summary["eval_top1"])
    for name in ("224", "320", "ten"):
        # Five photos decode; the broken record is skipped and counted.
        assert results[name]["examples"] == 5 and results[name]["skipped_images"] == 1
        assert results[name]["skipped_by_cause"]["undecodable"] == 1
    assert results["320"]["eval_size"] == 320 and results["ten"]["ten_crop"]
    # The protocols see different pixels, so their losses differ.
    assert len({round(results[n]["loss"], 6) for n in ("224", "320", "ten")}) == 3


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("keras").backend.backend() != "tensorflow",
    reason="the custom loop is tf.distribute's",
)
def test_imagenet_custom_loop_with_label_smoothing(shards, tmp_path):
    """Label smoothing under the strategy.run loop: trains and evaluates (sparse labels)."""
    summary = _train(
        shards,
        tmp_path / "run",
        tmp_path,
        "--loop=custom",
        "--label_smoothing=0.1",
        "--epochs=1",
        "--steps_per_epoch=2",
    )
    assert summary["steps"] == 2 and summary["loop"] == "custom"
    assert np.isfinite(summary["eval_loss"]) and summary["train_skipped_images"] == 0
    # The whole validation shard: five photos scored, the broken one skipped and named, once
    # (the per-epoch evaluation met it too; the final pass counts afresh).
    assert summary["eval_images_scored"] == 5
    assert summary["eval_skipped_by_cause"] == {
        "corrupt_record": 0,
        "unparsable": 0,
        "bad_label": 0,
        "undecodable": 1,
    }


def _h5_arrays(path):
    import h5py

    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if hasattr(v, "shape") else None)
    return out


@pytest.mark.slow
def test_an_imagenet_resume_sees_the_records_of_one_run(shards, tmp_path):
    """Stopped inside epoch 1 (`--max_steps=2`), the checkpoint records how many records the
    stream had consumed; the resume skips them (undecoded), so it trains on the batches of an
    uninterrupted run and ends with its weights (`--deterministic`: fixed order and
    augmentation), also where the framework iterates the stream twice (Keras' PyTorch
    trainer draws a first batch to build the model). Under JAX the run uses the jitted loop,
    which reads the tf.data stream."""
    import keras

    loop = "jax" if keras.backend.backend() == "jax" else "fit"
    common = ["--epochs=2", "--steps_per_epoch=3", "--deterministic", f"--loop={loop}",
              "--train_crop=inception"]  # fmt: skip
    straight = _train(shards, tmp_path / "straight", tmp_path, *common)
    stopped = _train(shards, tmp_path / "stopped", tmp_path, *common, "--max_steps=2")
    assert stopped["stopped_by"] == "max_steps" and stopped["steps"] == 2
    (folder,) = os.listdir(tmp_path / "stopped" / "checkpoints")
    state = json.loads((tmp_path / "stopped" / "checkpoints" / folder / "state.json").read_text())
    assert state["input"] == [{"epoch": 0, "records": 8}]  # 2 batches of 4
    resumed = _train(shards, tmp_path / "stopped", tmp_path, *common)
    assert resumed["steps"] == straight["steps"] == 6 and resumed["resumed_from_epoch"] == 0
    a = _h5_arrays(tmp_path / "straight" / "final.weights.h5")
    b = _h5_arrays(tmp_path / "stopped" / "final.weights.h5")
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst < 1e-5, worst


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("keras").backend.backend() != "tensorflow",
    reason="a fixed input size and the double count were TensorFlow's (fit under a strategy)",
)
def test_evaluation_at_another_size_counts_every_image_once(shards, tmp_path):
    """Validation during training at 40 px of a net trained at 32 px (the 320-px protocol's
    kind): the model's spatial size is left open. Through a MirroredStrategy, whose
    `model.evaluate` peeks at the dataset first: the images scored and the records skipped
    are counted once (five photos decode, one record does not)."""
    summary = _train(shards, tmp_path / "run", tmp_path, "--epochs=1", "--steps_per_epoch=1",
                     "--eval_size=40", "--eval_resize=44", "--strategy=mirrored")  # fmt: skip
    assert summary["eval_size"] == 40 and summary["eval_images_scored"] == 5
    assert summary["eval_skipped_by_cause"]["undecodable"] == 1
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(rows) == 2 and "val_top1" in rows[0]
