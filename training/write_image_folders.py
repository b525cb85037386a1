r"""Writes an in-memory dataset (Fashion-MNIST, CIFAR-10/100) as PNG files in class folders.

The layout `--dataset=folder` trains on, OUT/train/CLASS/NNNNN.png and OUT/val/CLASS/NNNNN.png
(the test set as val/), with the dataset's class names as folder names:

    python training/write_image_folders.py --dataset=fashion_mnist \
        --data_dir=/usr/share/datasets/fashion-mnist --out=~/data/fashion_mnist_png
    python training/imagenet.py --dataset=folder --data_dir=~/data/fashion_mnist_png \
        --model=PreActResNet20 ...

`--limit=N` writes the first N images of each split only. Names are made safe for a file
system ("T-shirt/top" is written as "T-shirt_top"); the folders sort in the dataset's
label order (a `NN_` prefix keeps it when the names alone would sort otherwise).
"""

import os
import sys

from absl import app, flags

from keras_preact.train import flags as train_flags
from keras_preact.train import sources

FLAGS = flags.FLAGS


def define_flags():
    # fmt: off
    flags.DEFINE_enum("dataset", "fashion_mnist", list(sources.MEMORY_DATASETS), "Dataset.")
    flags.DEFINE_enum("source", "files", ["files", "tfds"], "Where the dataset is read from "
                      "(as training/cifar.py's --source).")
    train_flags.DEFINE_path("data_dir", None, "The dataset's files (or the TFDS data_dir).")
    train_flags.DEFINE_path("out", None, "Folder to write train/ and val/ into.", required=True)
    flags.DEFINE_integer("limit", None, "Images per split at most.", lower_bound=1)
    # fmt: on


def folder_names(names):
    """File-system-safe folder names that sort in label order."""
    safe = [n.replace("/", "_").replace(os.sep, "_") for n in names]
    if sorted(safe) != safe:
        width = len(str(len(safe) - 1))
        safe = [f"{i:0{width}d}_{n}" for i, n in enumerate(safe)]
    return safe


def write(images, labels, folder, names):
    """Writes `images` (uint8 `(N, H, W)` or `(N, H, W, C)`) as `folder/NAME/NNNNN.png`."""
    from PIL import Image

    for name in names:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        Image.fromarray(image).save(os.path.join(folder, names[int(label)], f"{i:05d}.png"))


def main(argv):
    del argv
    (x, y), (xt, yt) = sources.load_arrays(FLAGS.dataset, FLAGS.source, FLAGS.data_dir)
    names = folder_names(sources.CLASS_NAMES[FLAGS.dataset])
    limit = FLAGS.limit or max(len(x), len(xt))
    for split, images, labels in (("train", x, y), ("val", xt, yt)):
        write(images[:limit], labels[:limit], os.path.join(FLAGS.out, split), names)
        print(f"{min(limit, len(images))} images in {os.path.join(FLAGS.out, split)}", flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
