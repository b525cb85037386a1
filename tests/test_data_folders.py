"""Class-folder datasets (`keras_preact.data.folders`) and their tf.data pipeline: layouts,
what the listing leaves out and why, image modes, and a TFDS dataset of any kind."""

import io
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
PIL = pytest.importorskip("PIL.Image")

from model_test_utils import pipeline  # noqa: E402

from keras_preact.data import folders, tfdata  # noqa: E402

pytestmark = pytest.mark.backend_independent


def _save(path, array, fmt="PNG", mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = PIL.fromarray(array) if mode is None else PIL.fromarray(array).convert(mode)
    image.save(path, format=fmt)
    return path


def _gray(seed, size=12):
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _rgb(seed, size=12):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _tree(root, classes=("cat", "dog"), per_class=3, splits=("train", "val"), image=_gray):
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                _save(os.path.join(root, split, name, f"{i}.png"), image(100 * c + i))
    return str(root)


def test_train_and_val_folders_give_sorted_classes_and_labels(tmp_path):
    root = _tree(tmp_path, classes=("zebra", "ant", "moth"))
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "ant" / ".DS_Store").write_bytes(b"\0")
    listing = folders.list_folder(root)
    assert listing.class_names == ("ant", "moth", "zebra")
    assert len(listing.train) == len(listing.validation) == 9
    assert [os.path.basename(os.path.dirname(p)) for p in listing.train.paths[:3]] == ["ant"] * 3
    assert listing.train.labels == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    count, names = listing.skipped["not_an_image"]
    assert count == 1 and names[0].endswith("notes.txt")  # hidden files are not counted
    assert listing.channels == 1 and listing.shorter_side() == 12
    assert any("not an image: 1" in line for line in listing.report())


def test_validation_split_is_seeded_and_per_class(tmp_path):
    for c in ("a", "b"):
        for i in range(10):
            _save(str(tmp_path / c / f"{i}.png"), _gray(i))
    one = folders.list_folder(str(tmp_path), validation_split=0.2, seed=3)
    again = folders.list_folder(str(tmp_path), validation_split=0.2, seed=3)
    other = folders.list_folder(str(tmp_path), validation_split=0.2, seed=4)
    assert one == again and one.validation != other.validation
    assert one.layout == "split" and len(one.validation) == 4 and len(one.train) == 16
    assert sorted(one.validation.labels) == [0, 0, 1, 1]
    assert not set(one.train.paths) & set(one.validation.paths)


def _empty_class(root):
    for f in (root / "train" / "dog").iterdir():
        f.unlink()
    os.makedirs(root / "train" / "dog" / "empty")  # a sub-folder, but no image


@pytest.mark.parametrize(
    "make, match",
    [
        (_empty_class, "without images .*: train/dog"),
        (lambda root: _save(str(root / "val" / "bird" / "0.png"), _gray(0)),
         r"only in train/: none; only in val/: \['bird'\]"),
        (lambda root: os.rename(root / "val", root / "elsewhere"), "no val/ or validation/"),
    ],
    ids=["empty class", "different classes", "no validation folder"],
)  # fmt: skip
def test_layouts_that_cannot_train_are_refused_by_name(tmp_path, make, match):
    _tree(tmp_path)
    make(tmp_path)
    with pytest.raises(folders.FolderError, match=match):
        folders.list_folder(str(tmp_path))


def test_class_folders_without_train_need_a_validation_split(tmp_path):
    _save(str(tmp_path / "a" / "0.png"), _gray(0))
    with pytest.raises(folders.FolderError, match="--validation_split"):
        folders.list_folder(str(tmp_path))


def test_unreadable_and_too_large_images_are_left_out_and_named(tmp_path):
    root = _tree(tmp_path)
    (tmp_path / "train" / "cat" / "html.jpg").write_text("<html>a saved web page</html>")
    (tmp_path / "train" / "cat" / "empty.png").write_bytes(b"")
    _save(str(tmp_path / "train" / "dog" / "huge.png"), _gray(1, size=40))
    listing = folders.list_folder(root, max_pixels=30 * 30)
    count, names = listing.skipped["unreadable"]
    assert count == 2 and {os.path.basename(n.split(":")[0]) for n in names} == {
        "html.jpg",
        "empty.png",
    }
    assert (
        listing.skipped["too_large"][0] == 1
        and "40x40 pixels" in listing.skipped["too_large"][1][0]
    )
    assert len(listing.train) == 6  # the three left out are not in the listing
    with pytest.raises(folders.FolderError, match="unreadable image"):
        folders.list_folder(root, on_bad="stop")


def _decode(path, channels, image_size=12):
    spec = tfdata.InputSpec(source="folder", listing=_one_file_listing(path), batch_size=1,
                            crop="pad", image_size=image_size, channels=channels,
                            normalize=False)  # fmt: skip
    images = [x for x, _ in tfdata.imagenet_dataset(spec, "validation", training=False)]
    return images[0][0].numpy() if images else None


def _one_file_listing(path):
    split = folders.Split((str(path),), (0,))
    return folders.Listing(os.path.dirname(path), ("a",), split, split, "folders", {})


def test_image_modes_decode_to_the_runs_channels(tmp_path):
    rgb = _rgb(0)
    alpha = np.concatenate([rgb, np.full((12, 12, 1), 7, np.uint8)], -1)
    rgba = _save(str(tmp_path / "rgba.png"), alpha)
    np.testing.assert_array_equal(_decode(rgba, 3), rgb)  # alpha dropped, colours kept
    gray = _gray(1)
    as_rgb = _decode(_save(str(tmp_path / "gray.png"), gray), 3)
    assert as_rgb.shape == (12, 12, 3) and all((as_rgb[..., i] == gray).all() for i in range(3))
    deep = _save(str(tmp_path / "deep.png"), gray.astype(np.uint16) * 257, mode="I;16")
    np.testing.assert_array_equal(_decode(deep, 1)[..., 0], gray)  # 16 bits scaled to 8
    cmyk = tmp_path / "cmyk.jpg"
    ramp = np.linspace(0, 255, 12).astype(np.uint8)
    smooth = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128), -1).astype(np.uint8)
    PIL.fromarray(smooth).convert("CMYK").save(cmyk, format="JPEG", quality=100)
    expected = np.asarray(PIL.open(cmyk).convert("RGB"), np.float64)
    assert np.abs(_decode(cmyk, 3) - expected).max() < 8  # JPEG's CMYK -> RGB, as PIL does
    listing = folders.list_folder(_tree(tmp_path / "mixed", image=_rgb))
    assert listing.channels == 3


def test_a_corrupt_image_is_skipped_by_the_pipeline_and_counted(tmp_path):
    root = _tree(tmp_path)
    good = (tmp_path / "val" / "cat" / "0.png").read_bytes()
    (tmp_path / "val" / "cat" / "0.png").write_bytes(good[:60])  # the header reads, not the data
    listing = folders.list_folder(root)
    assert len(listing.validation) == 6  # the header check passes it
    counter = tfdata.SkipCounter()
    spec = tfdata.InputSpec(source="folder", listing=listing, batch_size=4, crop="pad",
                            image_size=12, channels=1, normalize=False)  # fmt: skip
    labels = [int(y) for _, b in tfdata.imagenet_dataset(spec, "validation", training=False,
                                                         counter=counter) for y in b]  # fmt: skip
    assert sorted(labels) == [0, 0, 1, 1, 1]
    assert counter.counts()["undecodable"] == 1
    os.remove(tmp_path / "val" / "dog" / "0.png")  # gone since the listing
    counter = tfdata.SkipCounter()
    list(tfdata.imagenet_dataset(spec, "validation", training=False, counter=counter))
    assert counter.counts()["corrupt_record"] == 1 and counter.counts()["undecodable"] == 1


def test_folder_training_stream_is_deterministic_and_padded_and_cropped(tmp_path):
    listing = folders.list_folder(_tree(tmp_path, per_class=4))
    spec = tfdata.InputSpec(source="folder", listing=listing, batch_size=4, crop="pad",
                            image_size=12, channels=1, normalize=False, deterministic=True,
                            seed=1)  # fmt: skip

    def first(epoch):
        ds = tfdata.imagenet_dataset(spec, "train", training=True, epoch=epoch)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(2)]

    a, b, c = first(0), first(0), first(1)
    assert a[0][0].shape == (4, 12, 12, 1) and a[0][0].dtype == np.uint8
    for (x, y), (x2, y2) in zip(a, b):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert any((x != x2).any() for (x, _), (x2, _) in zip(a, c))  # another epoch, another order
    # Two input pipelines read disjoint halves.
    halves = [
        sorted(p for p in [r[0].numpy() for r in tfdata.encoded_records(
            spec, "validation", input_context=tf.distribute.InputContext(2, i, 2))])
        for i in range(2)
    ]  # fmt: skip
    assert len(halves[0]) + len(halves[1]) == 8 and not set(halves[0]) & set(halves[1])


def test_scale_range_follows_the_crop_size():
    assert tfdata.InputSpec(source="tfrecord").scale_range == (256, 480)
    assert tfdata.InputSpec(source="tfrecord", image_size=64).scale_range == (73, 137)
    with pytest.raises(ValueError, match="crop='square'; allowed"):
        tfdata.InputSpec(source="tfrecord", crop="square")


def test_any_tfds_dataset_gives_its_counts_names_and_channels():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        spec = tfdata.InputSpec(source="mnist", batch_size=2, crop="pad", image_size=28,
                                channels=1, normalize=False)  # fmt: skip
        assert tfdata.class_names(spec) == tuple(str(i) for i in range(10))
        assert tfdata.count_examples(spec, "train") == 6  # counted: the mock has no split sizes
        images, labels = next(iter(pipeline(tfdata.imagenet_dataset, split="train",
                                            training=True, **spec.__dict__)))  # fmt: skip
    assert images.shape == (2, 28, 28, 1) and labels.shape == (2,)


def test_tfrecord_records_are_counted_from_their_headers(tmp_path):
    png = io.BytesIO()
    PIL.fromarray(_gray(0)).save(png, format="PNG")
    for i, n in enumerate((3, 5)):
        tfdata.write_imagenet_tfrecords(str(tmp_path / f"train-{i:05d}-of-00002"),
                                        [png.getvalue()] * n, [1] * n)  # fmt: skip
    spec = tfdata.InputSpec(source="tfrecord", data_dir=str(tmp_path))
    assert tfdata.count_examples(spec, "train") == 8
