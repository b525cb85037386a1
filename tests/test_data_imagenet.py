"""The ImageNet tf.data pipeline on real photos written as ImageNet TFRecords."""

import io
import struct

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
skimage_data = pytest.importorskip("skimage.data")
PIL = pytest.importorskip("PIL.Image")

from model_test_utils import pipeline  # noqa: E402

from keras_preact.data import imagenet_preprocessing as ipp  # noqa: E402
from keras_preact.data import tfdata  # noqa: E402

pytestmark = pytest.mark.backend_independent

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
    return pipeline(
        tfdata.imagenet_dataset, source="tfrecord", split=split, data_dir=str(shards), **kwargs
    )


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
    assert counter.counts() == _counts(undecodable=2, delivered=len(photos))
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
        files = pipeline(
            tfdata.encoded_records,
            source="tfrecord",
            split="train",
            data_dir=str(shards),
            input_context=ctx,
        )
        seen.append(sorted(int(y) for _, y in files))
    assert seen[0] and seen[1]
    assert sorted(seen[0] + seen[1]) == sorted(i % 5 for i in range(len(PHOTOS) + 3))


def test_tfds_source_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        ds = pipeline(
            tfdata.imagenet_dataset,
            source="imagenette",
            split="train",
            batch_size=2,
            training=True,
            shuffle_buffer=4,
        )
        images, labels = next(iter(ds))
    assert images.shape == (2, 224, 224, 3)
    assert labels.shape == (2,)


# ----------------------------------------------------------------------------
# Bad records: each is dropped and counted by cause; nothing else is lost.


def _counts(**nonzero):
    return {**dict.fromkeys((*tfdata.SKIP_CAUSES, "delivered"), 0), **nonzero}


def _example(image=None, label=None, **features):
    """A serialized `tf.train.Example` with the given ImageNet features (None: absent)."""
    feature = dict(features)
    if image is not None:
        feature["image/encoded"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))
    if label is not None:
        feature["image/class/label"] = tf.train.Feature(
            int64_list=tf.train.Int64List(value=[label])
        )
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_both_splits(folder, records):
    """The same records as `train-00000-of-00001` and `validation-00000-of-00001`."""
    folder.mkdir()
    paths = [str(folder / f"{split}-00000-of-00001") for split in ("train", "validation")]
    for path in paths:
        with tf.io.TFRecordWriter(path) as writer:
            for record in records:
                writer.write(record)
    return paths


def _record_spans(path):
    """`(start, data length)` of each record of a TFRecord file, from its framing."""
    raw = open(path, "rb").read()
    spans, pos = [], 0
    while pos < len(raw):
        (length,) = struct.unpack("<Q", raw[pos : pos + 8])
        spans.append((pos, length))
        pos += 16 + length  # length, its CRC, data, the data's CRC
    return spans


def _damage(path, at):
    """Flips the bits of byte `at` of a file."""
    raw = bytearray(open(path, "rb").read())
    raw[at] ^= 0xFF
    open(path, "wb").write(bytes(raw))


@pytest.fixture(scope="module")
def small_photos():
    """Ten small JPEGs of real photos (48 px on the longer side)."""
    out = []
    for i in range(10):
        image = PIL.fromarray(getattr(skimage_data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        image.thumbnail((48, 48))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _eval_labels(folder, counter, **kwargs):
    ds = _shard_dataset(
        folder, "validation", batch_size=4, training=False, image_size=32, eval_resize=36,
        counter=counter, **kwargs,
    )  # fmt: skip
    return sorted(int(y) for _, labels in ds for y in labels)


def _train_labels(folder, counter, images, **kwargs):
    # Ordered: an unordered parallel map may move images across an epoch's end.
    ds = _shard_dataset(
        folder, "train", batch_size=3, training=True, image_size=32, shuffle_buffer=4,
        deterministic=True, counter=counter, **kwargs,
    )  # fmt: skip
    return [int(y) for _, labels in ds.take(images // 3) for y in labels]


def test_corrupt_record_costs_only_that_record(tmp_path, small_photos):
    # Record i holds label i + 1 (i after label_offset); one byte of record 4's
    # data is flipped, so its CRC fails.
    paths = _write_both_splits(
        tmp_path / "shards", [_example(p, i + 1) for i, p in enumerate(small_photos)]
    )
    for path in paths:
        start, length = _record_spans(path)[4]
        _damage(path, start + 12 + length // 2)
    good = [0, 1, 2, 3, 5, 6, 7, 8, 9]
    counter = tfdata.SkipCounter()
    assert _eval_labels(tmp_path / "shards", counter) == good
    assert counter.counts() == _counts(corrupt_record=1, delivered=9)
    # Training: shuffle, then repeat, so 27 images are exactly three epochs.
    counter = tfdata.SkipCounter()
    labels = _train_labels(tmp_path / "shards", counter, 27)
    assert sorted(labels) == sorted(good * 3)
    counts = counter.counts()
    # Met once per epoch; the reader runs ahead of the batches taken, so later
    # epochs can already be counted. One pass of the training reader is exact:
    assert counts["corrupt_record"] >= 3 and counter.skipped() == counts["corrupt_record"]
    counter = tfdata.SkipCounter()
    records = pipeline(tfdata.encoded_records,
        source="tfrecord", split="train", data_dir=str(tmp_path / "shards"), training=True,
        counter=counter,
    )  # fmt: skip
    assert sorted(int(y) for _, y in records) == good
    assert counter.counts() == _counts(corrupt_record=1)


@pytest.mark.parametrize(
    "damage",
    ["data", "length", "length_crc", "data_crc", "two_records", "truncated", "trailing_bytes"],
)
def test_reader_resumes_after_unreadable_records(tmp_path, damage):
    # Record i: label i + 1 and i + 1 KB of image bytes (not decoded here).
    path = str(tmp_path / "validation-00000-of-00001")
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(10):
            writer.write(_example(bytes([i]) * (1000 * i + 1000), i + 1))
    spans = _record_spans(path)
    start, length = spans[4]
    lost, bad = [4], 1
    if damage == "data":
        _damage(path, start + 12 + length // 2)
    elif damage == "length":  # the length fails its CRC: found by a scan
        _damage(path, start + 1)
    elif damage == "length_crc":
        _damage(path, start + 9)
    elif damage == "data_crc":
        _damage(path, start + 12 + length + 1)
    elif damage == "two_records":
        _damage(path, start + 12)
        _damage(path, spans[7][0] + 3)
        lost, bad = [4, 7], 2
    elif damage == "truncated":
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[: spans[9][0] + 20])
        lost = [9]
    else:
        open(path, "ab").write(b"\x01\x02\x03")
        lost = []
    expected = [i for i in range(10) if i not in lost]

    def labels(**kwargs):
        records = pipeline(
            tfdata.encoded_records,
            source="tfrecord",
            split="validation",
            data_dir=str(tmp_path),
            training=False,
            seed=0,
            deterministic=True,
            label_offset=1,
            cycle_length=4,
            **kwargs,
        )
        return [int(y) for _, y in records]

    assert labels() == expected
    counter = tfdata.SkipCounter()
    assert labels(counter=counter) == expected
    assert counter.counts() == _counts(corrupt_record=bad)


def test_out_of_range_labels_are_skipped_and_counted(tmp_path, small_photos):
    # 1-based labels; after label_offset=1: 0, -1, 1000, 4999, 2**40, 999.
    labels = [1, 0, 1001, 5000, 2**40 + 1, 1000]
    _write_both_splits(tmp_path / "shards", [_example(p, y) for p, y in zip(small_photos, labels)])
    # With label smoothing the one-hot depth bounds the labels.
    ds = _shard_dataset(
        tmp_path / "shards", "validation", batch_size=8, training=False, image_size=32,
        one_hot_classes=1000,
    )  # fmt: skip
    (_, one_hot), *rest = list(ds)
    assert not rest and one_hot.shape == (2, 1000)
    np.testing.assert_array_equal(np.argmax(one_hot, -1), [0, 999])
    counter = tfdata.SkipCounter()
    assert _eval_labels(tmp_path / "shards", counter, num_classes=1000) == [0, 999]
    assert counter.counts() == _counts(bad_label=4, delivered=2)
    counter = tfdata.SkipCounter()
    assert set(_train_labels(tmp_path / "shards", counter, 12, num_classes=1000)) == {0, 999}
    assert counter.counts()["bad_label"] >= 4 * 6  # four per epoch, six epochs


def test_bad_class_counts_raise(tmp_path, small_photos):
    _write_both_splits(tmp_path / "shards", [_example(small_photos[0], 1)])
    with pytest.raises(ValueError, match="num_classes must be a positive int or None; got 0"):
        _shard_dataset(tmp_path / "shards", "train", batch_size=1, training=True, num_classes=0)
    with pytest.raises(ValueError, match="num_classes=10 and one_hot_classes=5 disagree"):
        _shard_dataset(
            tmp_path / "shards", "train", batch_size=1, training=True, num_classes=10,
            one_hot_classes=5,
        )  # fmt: skip
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(ValueError, match="declares 10 classes, more than num_classes=3"):
            pipeline(
                tfdata.imagenet_dataset,
                source="imagenette",
                split="train",
                batch_size=2,
                training=True,
                num_classes=3,
            )


def test_unparsable_records_are_skipped_and_counted(tmp_path, small_photos):
    records = [
        _example(small_photos[0], 1),
        b"not a tf.train.Example \xff\x00",
        b"",  # an empty Example: no features at all
        _example(None, 2),  # no image
        _example(small_photos[1], None),  # no label
        _example(small_photos[2], None, **{
            "image/class/label": tf.train.Feature(float_list=tf.train.FloatList(value=[3.0]))
        }),  # a float label
        _example(small_photos[3], 3),
        _example(b"\xff\xd8\xff\xe0 not a jpeg", 4),  # parses, does not decode
    ]  # fmt: skip
    _write_both_splits(tmp_path / "shards", records)
    counter = tfdata.SkipCounter()
    assert _eval_labels(tmp_path / "shards", counter) == [0, 2]
    assert counter.skipped() == 6
    assert counter.counts() == _counts(unparsable=5, undecodable=1, delivered=2)
    counter.reset()
    assert counter.counts() == _counts()
    assert set(_train_labels(tmp_path / "shards", counter, 9)) == {0, 2}
    assert counter.counts()["unparsable"] >= 5 * 4  # five per epoch, 4-5 epochs


def test_one_counter_for_several_input_pipelines(tmp_path, small_photos):
    """Two input pipelines of one process (as `distribute_datasets_from_function`
    makes them) count into one `SkipCounter`; so does a strategy's pipeline."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(2):
        records = [_example(small_photos[i], shard * 5 + i + 1) for i in range(5)]
        records[shard] = b"garbage"  # one unparsable record per shard
        records[2 + shard] = _example(small_photos[0], 99)  # and one bad label
        with tf.io.TFRecordWriter(str(folder / f"validation-0000{shard}-of-00002")) as writer:
            for record in records:
                writer.write(record)
    counter = tfdata.SkipCounter()

    def dataset_fn(context):
        return _shard_dataset(
            folder, "validation", batch_size=2, training=False, image_size=32,
            input_context=context, counter=counter, num_classes=10,
        )  # fmt: skip

    iterators = [iter(dataset_fn(tf.distribute.InputContext(2, i, 1))) for i in range(2)]
    seen = 0
    while iterators:  # alternate between the two pipelines
        try:
            seen += len(next(iterators[0])[1])
            iterators.append(iterators.pop(0))
        except StopIteration:
            iterators.pop(0)
    assert seen == 6
    assert counter.counts() == _counts(unparsable=2, bad_label=2, delivered=6)
    counter.reset()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    data = strategy.distribute_datasets_from_function(dataset_fn)
    assert sum(len(labels) for _, labels in data) == 6
    assert counter.counts() == _counts(unparsable=2, bad_label=2, delivered=6)


# ----------------------------------------------------------------------------
# The training stream at a position: an epoch's stream, and a resume inside it.


@pytest.fixture(scope="module")
def stream_shards(tmp_path_factory, small_photos):
    """Two train shards of the small photos (labels 0-4), with an undecodable image and
    a record with a bad label among them."""
    folder = tmp_path_factory.mktemp("stream")
    records = [_example(p, i % 5 + 1) for i, p in enumerate(small_photos)]
    records[3] = _example(b"\xff\xd8\xff\xe0 not a jpeg", 2)
    records[8] = _example(small_photos[8], 0)  # label -1 after label_offset
    for shard in range(2):
        with tf.io.TFRecordWriter(str(folder / f"train-0000{shard}-of-00002")) as writer:
            for record in records[shard::2]:
                writer.write(record)
    return folder


def _stream(folder, **kwargs):
    """A deterministic training stream of uint8 images: 9 records, 8 images a pass."""
    return _shard_dataset(
        folder, "train", batch_size=3, training=True, image_size=16, shuffle_buffer=4,
        deterministic=True, normalize=False, num_classes=5, seed=7, **kwargs,
    )  # fmt: skip


def _take(ds, batches):
    return [tuple(t.numpy() for t in batch) for _, batch in zip(range(batches), ds)]


@pytest.fixture(scope="module")
def straight(stream_shards):
    """Six batches of epoch 0's stream, and its `StreamPosition.records(k)` for k = 0..6."""
    position = tfdata.StreamPosition()
    iterator = iter(_stream(stream_shards, position=position))
    batches, records = [], [position.records(0)]
    for _ in range(6):
        batches.append(tuple(t.numpy() for t in next(iterator)))
        records.append(position.records(len(batches)))  # as a trainer reads it
    with pytest.raises(ValueError, match="batches=99 is not noted"):
        position.records(99)
    return batches, records


def test_a_stream_resumed_at_its_position_continues_batch_for_batch(stream_shards, straight):
    """`skip_records=position.records(k)` gives the uninterrupted stream's batches from
    k + 1 on, images and labels: over the undecodable image and the end of a pass."""
    batches, records = straight
    assert records[0] == 0 and records == sorted(records) and records[-1] > 2 * 9
    position = tfdata.StreamPosition()  # one for every resume: each build resets it
    for k in range(1, 5):
        resumed = _take(_stream(stream_shards, skip_records=records[k], position=position), 2)
        for (xa, ya), (xb, yb) in zip(batches[k : k + 2], resumed, strict=True):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa, xb)
        # The resumed stream notes the uninterrupted one's positions: a resume resumes.
        assert [position.records(j) for j in range(3)] == records[k : k + 3]


def test_every_epoch_is_a_stream_of_its_own(stream_shards, straight):
    epoch1, again = (_take(_stream(stream_shards, epoch=1), 3) for _ in range(2))
    labels = [np.concatenate([y for _, y in b]) for b in (straight[0][:3], epoch1)]
    assert sorted(labels[0][:8]) == sorted(labels[1][:8])  # one pass, another order
    assert not np.array_equal(labels[0], labels[1])
    for (xa, ya), (xb, yb) in zip(epoch1, again, strict=True):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


def test_skipped_records_are_not_decoded(stream_shards):
    counter = tfdata.SkipCounter()
    _take(_stream(stream_shards, skip_records=300, counter=counter), 1)
    # 33 passes read, each with its undecodable image; decoded: a few batches, prefetched.
    started = int(counter.variable("undecodable").numpy())
    assert started < 60, started
