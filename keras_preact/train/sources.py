"""Where the data comes from: the in-memory datasets, and whether a source can load.

`tfds_problem`, `files_problem` and `tfrecord_problem` run while the flags are parsed: a
TFDS dataset that is not prepared in `--data_dir` and cannot be downloaded fails at once
with what to do instead, not after TFDS's ten download retries (about three and a half
minutes offline), and a `--data_dir` without the dataset's files fails before any model
is built, naming the files it needs.
"""

import glob
import os
import socket

from keras_preact._optional import MissingDependency, require

#: The in-memory datasets of `cifar.py` and `evaluate.py`, with their number of classes.
MEMORY_DATASETS = {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10}
#: The class names of the in-memory datasets, in label order (the datasets' own lists).
CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                "ship", "truck"),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "cifar100": tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl
        boy bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock
        cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox
        girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
        maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
        pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road
        rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
        sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
        turtle wardrobe whale willow_tree wolf woman worm""".split()),
}  # fmt: skip
#: The image shape of each in-memory dataset.
MEMORY_SHAPES = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "fashion_mnist": (28, 28, 1)}
#: The host each TFDS builder downloads from (tensorflow_datasets' builders' URLs).
TFDS_HOSTS = {
    "cifar10": "www.cs.toronto.edu",
    "cifar100": "www.cs.toronto.edu",
    "fashion_mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    "imagenette": "s3.amazonaws.com",
}
#: TFDS datasets `training/prepare_tfds.py` prepares from downloaded files.
PREPARABLE = ("fashion_mnist", "cifar10")
#: TFDS datasets that are only ever built from manually downloaded files.
TFDS_MANUAL = ("imagenet2012",)


def reachable(host, port=443, timeout=3.0):
    """Whether a TCP connection to `host:port` opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tfds_problem(name, data_dir, *, can_reach=reachable):
    """Why `tfds.load(name, data_dir=data_dir)` cannot work here, or None if it can.

    Args:
        name: a TFDS dataset name.
        data_dir: the TFDS data_dir (None: TFDS's default, ~/tensorflow_datasets).
        can_reach: `host -> bool`, the network check (replaced in tests).
    """
    try:
        tfds = require("tensorflow_datasets")
    except MissingDependency as e:
        return (f"{e} Or read the data without TFDS: --source=files (cifar.py), "
                "--source=tfrecord or --dataset=folder (imagenet.py).")  # fmt: skip
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds' DatasetNotFoundError (and a bad name's ValueError)
        if "not found" not in str(e).lower() and not isinstance(e, ValueError):
            raise
        return (
            f"{name!r} is not a TFDS dataset. ImageNet-format data: --source=tfrecord "
            "--data_dir=SHARDS, or a TFDS name (imagenet2012, imagenette); your own images: "
            "--dataset=folder --data_dir=FOLDER; another TFDS dataset: --dataset=tfds:NAME "
            "(the names: python -c 'import tensorflow_datasets as t; print(t.list_builders())')."
        )
    if builder.is_prepared():
        return None
    where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets)"
    if name in TFDS_MANUAL:
        return (
            f"TFDS dataset {name!r} is not prepared in {where}; it is only built from "
            f"files you download: tfds build {name} --manual_dir=FOLDER (docs/training.md, "
            "'Preparing TFDS data offline'), or use --source=tfrecord with ImageNet shards."
        )
    host = TFDS_HOSTS.get(name)
    if host is not None and not can_reach(host):
        hint = {
            "fashion_mnist": "--source=files --data_dir=/usr/share/datasets/fashion-mnist "
            "(apt-get install dataset-fashion-mnist)",
            "cifar10": "--source=files --data_dir=FOLDER (holding cifar-10-python.tar.gz)",
            "cifar100": "--source=files --data_dir=FOLDER (holding cifar-100-python.tar.gz)",
            "imagenette": "--dataset=folder --data_dir=FOLDER (the imagenette2 archive "
            "unpacked: its train/ and val/ class folders)",
        }.get(name, "--source=tfrecord --data_dir=SHARDS (ImageNet-format shards)")
        prepare = (
            f", or prepare the TFDS copy from them: python training/prepare_tfds.py "
            f"--dataset={name} --files_dir=FOLDER --data_dir=DIR (docs/training.md)"
            if name in PREPARABLE
            else f", or build it on a machine with network: tfds build {name} --data_dir=DIR, "
            f"and copy DIR here"
        )
        return (
            f"TFDS dataset {name!r} is not prepared in {where} and its download host "
            f"{host} cannot be reached (offline?). Read the files directly with {hint}{prepare}."
        )
    return None


#: The files `--source=files` reads, per dataset: alternatives, any one of which will do
#: (`keras_preact.data.idx` and `keras_preact.data.cifar_files` read them).
_IDX = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte"]  # fmt: skip
_CIFAR = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", ["data_batch_1", "test_batch"]),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train", "test"]),
}


def files_problem(dataset, data_dir):
    """Why `--source=files --data_dir=DATA_DIR` cannot load `dataset`, or None if it can.

    Only looks for the files (names, not contents), so it is cheap enough for a flag check.

    Example:

    >>> files_problem("fashion_mnist", "/usr/share/datasets/fashion-mnist")  # doctest: +SKIP
    """
    where = f"--data_dir={data_dir}"
    if not os.path.isdir(data_dir):
        return f"{where} is not a folder; pass the folder that holds the {dataset} files."
    if dataset == "fashion_mnist":
        found = lambda stem: any(  # noqa: E731
            os.path.isfile(os.path.join(data_dir, stem + s)) for s in (".gz", "")
        )
        missing = [stem for stem in _IDX if not found(stem)]
        if not missing:
            return None
        return (
            f"{where} lacks the Fashion-MNIST IDX files {[m + '[.gz]' for m in missing]}; "
            "Debian's copy: apt-get install dataset-fashion-mnist, then "
            "--data_dir=/usr/share/datasets/fashion-mnist."
        )
    tarball, folder, batches = _CIFAR[dataset]
    if os.path.isfile(os.path.join(data_dir, tarball)):
        return None
    for root in (os.path.join(data_dir, folder), data_dir):
        if all(os.path.isfile(os.path.join(root, b)) for b in batches):
            return None
    return (
        f"{where} holds neither {tarball} nor its extracted folder {folder}/ (the "
        f"python version of {dataset} from https://www.cs.toronto.edu/~kriz/cifar.html)."
    )


def tfrecord_problem(data_dir, prefixes):
    """Why `--source=tfrecord --data_dir=DATA_DIR` has no `PREFIX-*` shards for each of
    `prefixes` (`"train"`, `"validation"`), or None if it has them (a `gs://` folder is
    checked when it is read)."""
    if "://" in data_dir:
        return None
    if not os.path.isdir(data_dir):
        return f"--data_dir={data_dir} is not a folder; pass the folder of the TFRecord shards."
    folder = glob.escape(data_dir)
    missing = [p for p in prefixes if not glob.glob(os.path.join(folder, f"{p}-*"))]
    if not missing:
        return None
    return (
        f"--data_dir={data_dir} has no {' and no '.join(p + '-*' for p in missing)} "
        "ImageNet-format TFRecord shards (train-00000-of-01024, validation-00000-of-00128, "
        "...: docs/training.md, 'Input pipeline'); or pass a TFDS name as --source."
    )


def load_arrays(dataset, source, data_dir):
    """`((x_train, y_train), (x_test, y_test))` of an in-memory dataset, uint8 / int64."""
    if source == "files":
        if dataset == "fashion_mnist":
            from keras_preact.data import idx

            return idx.load_fashion_mnist(data_dir)
        from keras_preact.data import cifar_files

        return cifar_files.load_cifar(dataset, data_dir)
    from keras_preact.data import tfdata

    return tfdata.load_tfds_arrays(dataset, data_dir=data_dir)


def imagenet_eval_batches(
    *, source, split, data_dir, batch_size, size, resize, ten_crop=False, label_offset=1,
    num_classes=None, raw=False, max_batches=None,
):  # fmt: skip
    """`(batches, counter)`: the evaluation protocol's numpy batches of ImageNet-format data
    and the `tfdata.SkipCounter` of the records it dropped (`evaluate.py`).

    Each image is resized to `resize` (shorter side) and centre-cropped to `size`, the
    trainers' evaluation (`preprocess_eval`), or with `ten_crop` gives the four corner and
    centre crops and their mirrors, `(batch, 10, size, size, 3)`. Pixels are uint8 in
    [0, 255] if `raw`, else normalized with ImageNet's statistics.

    With `max_batches`, only the first `max_batches * batch_size` records are read and the
    pipeline ends there, so the counts, read once `batches` is exhausted, are exact: those
    of these records (a dropped record leaves its batch one image short). A pipeline cut
    after decoding would still be decoding records when it is stopped, and count them.
    """
    import tensorflow as tf

    from keras_preact.data import imagenet_preprocessing as ipp
    from keras_preact.data import tfdata

    counter = tfdata.SkipCounter()
    spec = tfdata.InputSpec(source=source, data_dir=data_dir, deterministic=True,
                            label_offset=label_offset, num_classes=num_classes)  # fmt: skip
    records = tfdata.encoded_records(spec, split, counter=counter)
    if max_batches:
        records = records.take(max_batches * batch_size)
    view = ipp.ten_crop if ten_crop else ipp.preprocess_eval

    def pixels(image_bytes):
        images = view(image_bytes, resize=resize, crop=size)
        return tf.cast(tf.round(images), tf.uint8) if raw else ipp.normalize(images)

    ds = records.map(counter.wrap(pixels), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator(), counter
