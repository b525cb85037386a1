r"""Prepares a TFDS dataset offline from files you downloaded yourself.

TFDS downloads and checks each file against the checksums in its registry. The
Debian package `dataset-fashion-mnist` ships the four Fashion-MNIST IDX files
re-gzipped: the decompressed data is identical to upstream, but the `.gz` bytes
and so their checksums differ, and TFDS would refuse them. This script reads the
files itself and writes them in TFDS's prepared format, under the same name,
version and features as the registered builder, so that afterwards

    tfds.load("fashion_mnist", data_dir=DATA_DIR)

(and `training/cifar.py --source=tfds --data_dir=DATA_DIR`) load them with no
network access:

    python training/prepare_tfds.py --dataset=fashion_mnist \
        --files_dir=/usr/share/datasets/fashion-mnist --data_dir=~/tensorflow_datasets

CIFAR-10 works the same from the python-version archive (`--dataset=cifar10
--files_dir=FOLDER` holding `cifar-10-python.tar.gz`). CIFAR-100 is not offered:
its TFDS features include the coarse labels, which the numpy reader does not load;
train on its files directly (`training/cifar.py --dataset=cifar100 --source=files
--data_dir=FOLDER`). For ImageNet use TFDS's own manual-directory build
(`tfds build imagenet2012 --manual_dir=...`), see docs/training.md.

Needs tensorflow-datasets (`pip install 'keras-preact[train]'`); without it the
script says so in one line and exits with status 1.
"""

import os

from absl import app, flags

flags.DEFINE_enum("dataset", "fashion_mnist", ["fashion_mnist", "cifar10"], "Dataset to prepare.")
flags.DEFINE_string("files_dir", None, "Folder with the downloaded files.", required=True)
flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir to write into.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from keras_preact._optional import MissingDependency, require

    try:
        tfds = require("tensorflow_datasets")
    except MissingDependency as e:  # one line naming the package, not a traceback
        raise SystemExit(f"prepare_tfds.py: {e}") from None
    import tensorflow as tf

    if FLAGS.dataset == "fashion_mnist":
        from keras_preact.data import idx

        train, test = idx.load_fashion_mnist(FLAGS.files_dir)
    else:
        from keras_preact.data import cifar_files

        train, test = cifar_files.load_cifar(FLAGS.dataset, FLAGS.files_dir)
    # Name, version and features of the registered builder, so tfds.load finds it.
    builder_cls = tfds.builder_cls(FLAGS.dataset)
    info = builder_cls(data_dir=os.path.expanduser(FLAGS.data_dir)).info
    features = info.features

    def split(name, arrays):
        x, y = arrays
        data = {"image": x, "label": y}
        if "id" in features:  # cifar10 has an example id
            data["id"] = [f"{name}_{i:05d}" for i in range(len(x))]
        return tf.data.Dataset.from_tensor_slices(data)

    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=FLAGS.dataset,
        version=str(info.version),
        features=features,
        split_datasets={"train": split("train", train), "test": split("test", test)},
        data_dir=os.path.expanduser(FLAGS.data_dir),
        description=f"{FLAGS.dataset} prepared offline from {FLAGS.files_dir}.",
    )
    print(builder.data_dir)


if __name__ == "__main__":
    app.run(main)
