"""Where the data comes from: the in-memory datasets, and whether a TFDS source can load.

`check_tfds` runs while the flags are parsed: a TFDS dataset that is not prepared in
`--data_dir` and cannot be downloaded fails at once with what to do instead, not after
TFDS's ten download retries (about three and a half minutes offline).
"""

import socket

#: The in-memory datasets of `cifar.py` and `evaluate.py`, with their number of classes.
MEMORY_DATASETS = {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10}
#: The host each TFDS builder downloads from (tensorflow_datasets' builders' URLs).
TFDS_HOSTS = {
    "cifar10": "www.cs.toronto.edu",
    "cifar100": "www.cs.toronto.edu",
    "fashion_mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    "imagenette": "s3.amazonaws.com",
}
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
        import tensorflow_datasets as tfds
    except ImportError:
        return (
            "tensorflow_datasets is not installed (pip install tensorflow-datasets); "
            "or read the files directly with --source=files."
        )
    builder = tfds.builder(name, data_dir=data_dir)
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
        }.get(name, "--source=tfrecord with ImageNet-format shards")
        return (
            f"TFDS dataset {name!r} is not prepared in {where} and its download host "
            f"{host} cannot be reached (offline?). Read the files directly with {hint}, "
            f"or prepare the TFDS copy from them: python training/prepare_tfds.py "
            f"--dataset={name} --files_dir=FOLDER --data_dir=DIR (docs/training.md)."
        )
    return None


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
