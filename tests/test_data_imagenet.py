"""The ImageNet tf.data pipeline on real photos written as ImageNet TFRecords."""

import io

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
skimage_data = pytest.importorskip("skimage.data")
PIL = pytest.importorskip("PIL.Image")

from keras_preact.data import imagenet_preprocessing as ipp  # noqa: E402
from keras_preact.data import tfdata  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")


def _jpeg(array, mode=None, quality=90):
    buf = io.BytesIO()
    image = PIL.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(array):
    buf = io.BytesIO()
    PIL.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _shard_dataset(shards, split, **kwargs):
    """`tfdata.imagenet_dataset` over the test's TFRecord shards."""
    return tfdata.imagenet_dataset(source="tfrecord", split=split, data_dir=str(shards), **kwargs)


@pytest.fixture(scope="module")
def photos():
    """Encoded real photos: RGB JPEGs, a grayscale JPEG, a CMYK JPEG and PNGs."""
    out = []
    for name in PHOTOS:
        array = getattr(skimage_data, name)()
        if array.ndim == 3 and array.shape[-1] == 4:
            array = array[..., :3]
        out.append(_jpeg(array))
    astronaut = skimage_data.astronaut()
    out.append(_jpeg(astronaut, mode="CMYK"))
    out.append(_png(skimage_data.coffee()))
    out.append(_png(skimage_data.camera()))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos):
    """Two train shards and one validation shard, with two broken images in it."""
    root = tmp_path_factory.mktemp("imagenet")
    labels = [i % 5 + 1 for i in range(len(photos))]
    half = len(photos) // 2
    tfdata.write_imagenet_tfrecords(
        str(root / "train-00000-of-00002"), photos[:half], labels[:half]
    )
    tfdata.write_imagenet_tfrecords(
        str(root / "train-00001-of-00002"), photos[half:], labels[half:]
    )
    broken = [photos[0][: len(photos[0]) // 3], b"\xff\xd8\xff\xe0 definitely not a jpeg"]
    tfdata.write_imagenet_tfrecords(
        str(root / "validation-00000-of-00001"), photos + broken, labels + [1, 2]
    )
    return root


def test_formats_decode_to_rgb(photos):
    decoded = [ipp.decode_crop(p, [0, 0, 64, 64]).numpy() for p in photos]
    assert all(d.shape == (64, 64, 3) and d.dtype == np.uint8 for d in decoded)
    # CMYK JPEG of the astronaut ~ its RGB JPEG; grayscale PNG has equal channels.
    rgb, cmyk = decoded[0].astype(float), decoded[len(PHOTOS)].astype(float)
    assert np.abs(rgb - cmyk).mean() < 12
    gray = decoded[-1]
    assert np.array_equal(gray[..., 0], gray[..., 1])
    png_coffee = decoded[-2].astype(float)
    jpg_coffee = decoded[1].astype(float)
    assert np.abs(png_coffee - jpg_coffee).mean() < 8


@pytest.mark.parametrize("crop", ["inception", "scale"])
def test_train_batches(shards, crop):
    ds = _shard_dataset(shards, "train", batch_size=4, training=True, crop=crop, color=True)
    for images, labels in ds.take(3):
        assert images.shape == (4, 224, 224, 3) and images.dtype == tf.float32
        assert labels.dtype == tf.int64
        assert np.all((labels.numpy() >= 0) & (labels.numpy() < 5))
        x = images.numpy()
        # Normalized [0, 1] values: (0 - 0.485)/0.229 ... (1 - 0.406)/0.225.
        assert x.min() >= -2.2 and x.max() <= 2.7 and np.isfinite(x).all()
    raw = _shard_dataset(shards, "train", batch_size=4, training=True, crop=crop, normalize=False)
    images, _ = next(iter(raw))
    assert images.dtype == tf.uint8


@pytest.mark.parametrize("photo", range(len(PHOTOS)))
def test_crop_ranges_over_many_draws(photos, photo):
    shape = ipp.image_shape(photos[photo])
    h, w = (float(v) for v in shape.numpy())
    for i in range(300):
        y, x, ch, cw = ipp.inception_window(shape, seed=[photo, i]).numpy()
        assert 0 <= y and y + ch <= h and 0 <= x and x + cw <= w
        area, ratio = ch * cw / (h * w), cw / ch
        # Rounding to whole pixels moves the ratio by at most ~1/side.
        assert 0.08 - 0.01 <= area <= 1.0
        assert 3 / 4 * (1 - 0.02) <= ratio <= 4 / 3 * (1 + 0.02)
        y, x, ch, cw = ipp.scale_window(shape, seed=[photo, i]).numpy()
        assert ch == cw and 0 <= y and y + ch <= h and 0 <= x and x + cw <= w
        # Crop side in original pixels = 224 * shorter / s, s in [256, 480].
        s = 224 * min(h, w) / ch
        assert 256 - 2 <= s <= 481 + 2


def test_eval_is_deterministic_and_skips_broken_images(shards, photos):
    counter = tfdata.SkipCounter()

    def run(resize, size, counter=None):
        ds = _shard_dataset(
            shards,
            "validation",
            batch_size=3,
            training=False,
            eval_resize=resize,
            image_size=size,
            counter=counter,
        )
        return np.concatenate([x.numpy() for x, _ in ds])

    first = run(256, 224, counter)
    assert first.shape == (len(photos), 224, 224, 3)
    assert counter.skipped() == 2
    np.testing.assert_array_equal(first, run(256, 224))
    # The paper's Table 5 evaluation: 320 from 320.
    assert run(320, 320).shape == (len(photos), 320, 320, 3)


def test_ten_crop(photos):
    crops = ipp.ten_crop(photos[1], resize=256, crop=224).numpy()
    assert crops.shape == (10, 224, 224, 3)
    np.testing.assert_allclose(crops[5], crops[0][:, ::-1], atol=1e-4)


def test_deterministic_training_pipeline(shards):
    def take():
        ds = _shard_dataset(
            shards, "train", batch_size=2, training=True, deterministic=True, seed=3
        )
        return np.concatenate([x.numpy() for x, _ in ds.take(2)])

    np.testing.assert_array_equal(take(), take())


def test_file_level_sharding(shards):
    contexts = [tf.distribute.InputContext(2, i, 2) for i in range(2)]
    seen = []
    for ctx in contexts:
        files = tfdata._encoded_records("tfrecord", "train", str(shards), False, ctx, 0, True, 1, 2)
        seen.append(sorted(int(y) for _, y in files))
    assert seen[0] and seen[1]
    assert sorted(seen[0] + seen[1]) == sorted(i % 5 for i in range(len(PHOTOS) + 3))


def test_tfds_source_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        ds = tfdata.imagenet_dataset(
            source="imagenette", split="train", batch_size=2, training=True, shuffle_buffer=4
        )
        images, labels = next(iter(ds))
    assert images.shape == (2, 224, 224, 3)
    assert labels.shape == (2,)
