"""Image-classification data in class folders: the listing, checked before anything trains.

    DATA_DIR/train/CLASS/*.jpg   DATA_DIR/val/CLASS/*.jpg    (or validation/)
    DATA_DIR/CLASS/*.jpg         with `validation_split`: a seeded fraction of each class

A class is a sub-folder name; classes are sorted, so class `i` is the i-th name in
alphabetical order, as in `keras.utils.image_dataset_from_directory` and torchvision's
`ImageFolder`. Files are found recursively inside each class folder.

What the listing does with what it meets (each case has a test):

* a file whose extension is not an image's (`IMAGE_SUFFIXES`: README.txt, .DS_Store):
  ignored, counted, the first few named;
* an image whose header cannot be read (a truncated or mislabelled file, an HTML page saved
  as .jpg), or whose pixel count exceeds `max_pixels` (a decompression bomb, or a scan that
  would take gigabytes decoded): skipped, counted by cause, the first few named; with
  `on_bad="stop"` the first one stops the listing with its name;
* an empty class folder, a validation folder whose classes differ from the training
  folder's, or no class folders at all: `FolderError`, naming the folders;
* grayscale, RGBA, palette, 16-bit and CMYK images: accepted; the pipeline decodes every
  image to the run's channels (alpha dropped, 16-bit scaled to 8, CMYK converted), 1 when
  every image checked is grayscale, else 3.

An image whose header reads but whose pixels do not decode is only found by decoding it:
the input pipeline skips and counts it (`tfdata.SkipCounter`, cause `undecodable`).

The header check opens every file (PIL reads only the header), in threads; a folder on a
`scheme://` URL is listed through `tf.io.gfile` and checked only by extension.
"""

import concurrent.futures
import dataclasses
import os
import random

#: Extensions of the images the pipeline decodes (TensorFlow's JPEG, PNG, GIF and BMP).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
#: Folder names of the validation split, in the order they are looked for.
VALIDATION_FOLDERS = ("val", "validation")
#: More pixels than this and an image is skipped (PIL's decompression-bomb error limit).
MAX_PIXELS = 2 * 89_478_485
#: File names listed per cause in the report.
NAMED = 5
#: Image sizes kept in a `Listing` (enough for a median).
SAMPLE = 10_000


class FolderError(ValueError):
    """A data folder whose layout cannot give a training set."""


@dataclasses.dataclass(frozen=True)
class Split:
    """The image files of one split and their labels (indices into the class names)."""

    paths: tuple
    labels: tuple

    def __len__(self):
        return len(self.paths)


@dataclasses.dataclass(frozen=True)
class Listing:
    """A class-folder dataset: its classes, its splits, and what the listing left out.

    `skipped` maps a cause (`"not_an_image"`, `"unreadable"`, `"too_large"`) to
    `(count, first names)`; `channels` is 1 when every image checked is grayscale, else 3;
    `sizes` is the `(height, width)` of the images checked (up to `SAMPLE`).
    """

    data_dir: str
    class_names: tuple
    train: Split
    validation: Split
    layout: str  # "folders" (train/ and val/) or "split" (--validation_split)
    skipped: dict
    channels: int = 3
    sizes: tuple = ()

    def split(self, name):
        """The `Split` of `"train"` or `"validation"`."""
        if name not in ("train", "validation"):
            raise ValueError(f"split={name!r}; allowed: 'train', 'validation'.")
        return self.train if name == "train" else self.validation

    def shorter_side(self):
        """The median shorter side of the images checked, or None."""
        sides = sorted(min(s) for s in self.sizes)
        return sides[len(sides) // 2] if sides else None

    def report(self):
        """Lines that say what was found and what was left out, for the console."""
        lines = [
            f"{self.data_dir}: {len(self.class_names)} classes, {len(self.train)} training "
            f"and {len(self.validation)} validation images"
            + (" (a seeded --validation_split of each class)" if self.layout == "split" else "")
        ]
        for cause, (count, names) in self.skipped.items():
            if count:
                more = f", and {count - len(names)} more" if count > len(names) else ""
                lines.append(
                    f"  left out, {cause.replace('_', ' ')}: {count} ({', '.join(names)}{more})"
                )
        return lines


def _remote(path):
    return "://" in path


def _listdir(path):
    if _remote(path):
        import tensorflow as tf

        return [n.rstrip("/") for n in tf.io.gfile.listdir(path)]
    return os.listdir(path)


def _isdir(path):
    if _remote(path):
        import tensorflow as tf

        return tf.io.gfile.isdir(path)
    return os.path.isdir(path)


def _walk(folder):
    """Every file under `folder`, sorted."""
    if _remote(folder):
        import tensorflow as tf

        return sorted(
            f"{root.rstrip('/')}/{name}"
            for root, _, names in tf.io.gfile.walk(folder)
            for name in names
        )
    return sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder, followlinks=True)
        for name in names
    )


def _join(folder, name):
    return f"{folder.rstrip('/')}/{name}" if _remote(folder) else os.path.join(folder, name)


def _classes(folder):
    """`{class name: sorted files}` of the class sub-folders of `folder` (hidden ones left out)."""
    names = sorted(
        n for n in _listdir(folder) if not n.startswith(".") and _isdir(_join(folder, n))
    )
    return {name: _walk(_join(folder, name)) for name in names}


class _Skips:
    def __init__(self):
        self.found = {"not_an_image": [0, []], "unreadable": [0, []], "too_large": [0, []]}

    def add(self, cause, path, why=""):
        entry = self.found[cause]
        entry[0] += 1
        if len(entry[1]) < NAMED:
            entry[1].append(f"{path}{f': {why}' if why else ''}")

    def frozen(self):
        return {c: (n, tuple(names)) for c, (n, names) in self.found.items()}


def _header(path, max_pixels):
    """`(ok, (height, width), mode, why)` from the image's header alone."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            mode = image.mode
    except Exception as e:  # PIL raises many kinds for a file it cannot read
        return "unreadable", None, None, type(e).__name__
    if width * height > max_pixels:
        return "too_large", (height, width), mode, f"{width}x{height} pixels"
    return None, (height, width), mode, ""


#: PIL modes of one-channel images.
_GRAY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F", "LA")


def list_folder(
    data_dir, *, validation_split=None, seed=0, check=True, max_pixels=MAX_PIXELS, on_bad="skip",
    threads=16,
):  # fmt: skip
    """The `Listing` of the class folders in `data_dir` (see the module).

    Args:
        data_dir: a folder with `train/` and `val/` (or `validation/`) class folders, or
            class folders itself (then `validation_split` is needed).
        validation_split: the fraction of each class held out for validation, drawn with
            `seed`; only for a folder without `train/`.
        seed: seed of the validation draw.
        check: read every image's header (local folders): unreadable and too-large images
            are left out, and the channels and sizes are known.
        max_pixels: images with more pixels are left out.
        on_bad: `"skip"` (count and name what is left out) or `"stop"` (`FolderError` at
            the first unreadable or too-large image).
        threads: header reads in parallel.

    Raises:
        FolderError: no class folders, an empty class, train and validation classes that
            differ, a split without validation images, or (`on_bad="stop"`) a bad image.
        FileNotFoundError: `data_dir` is not a folder.
    """
    if on_bad not in ("skip", "stop"):
        raise ValueError(f"on_bad={on_bad!r}; allowed: 'skip', 'stop'.")
    if not _isdir(data_dir):
        raise FileNotFoundError(f"--data_dir={data_dir} is not a folder.")
    train_dir = _join(data_dir, "train")
    val_dir = next(
        (_join(data_dir, v) for v in VALIDATION_FOLDERS if _isdir(_join(data_dir, v))), None
    )
    if _isdir(train_dir):
        if validation_split:
            raise FolderError(
                f"--validation_split={validation_split} with {train_dir}: the validation images "
                f"are {val_dir or 'val/'}; leave --validation_split out."
            )
        if val_dir is None:
            raise FolderError(
                f"{data_dir} has train/ but no val/ or validation/ folder: add one, or put the "
                f"class folders directly in {data_dir} and pass --validation_split=0.1."
            )
        train, val, layout = _classes(train_dir), _classes(val_dir), "folders"
        if list(train) != list(val):
            only_train = sorted(set(train) - set(val))
            only_val = sorted(set(val) - set(train))
            raise FolderError(
                f"{train_dir} and {val_dir} have different classes: only in train/: "
                f"{only_train or 'none'}; only in {os.path.basename(val_dir)}/: {only_val or 'none'}."
            )
    else:
        if not validation_split:
            raise FolderError(
                f"{data_dir} has no train/ folder: with class folders directly inside it, pass "
                "--validation_split (e.g. 0.1) to hold out a fraction of each class, or arrange "
                f"it as {data_dir}/train/CLASS/... and {data_dir}/val/CLASS/..."
            )
        if not 0 < validation_split < 1:
            raise FolderError(f"--validation_split={validation_split}; allowed: (0, 1).")
        train, val, layout = _classes(data_dir), None, "split"
    if not train:
        raise FolderError(
            f"{train_dir if layout == 'folders' else data_dir} has no class folders "
            "(one sub-folder of images per class)."
        )
    skips = _Skips()
    files = {"train": train, "validation": val}
    for classes in files.values():
        for name, paths in (classes or {}).items():
            images = [p for p in paths if p.lower().endswith(IMAGE_SUFFIXES)]
            for p in paths:
                if not p.lower().endswith(IMAGE_SUFFIXES) and not os.path.basename(p).startswith(
                    "."
                ):
                    skips.add("not_an_image", p)
            classes[name] = images
    empty = [
        f"{split}/{name}" if layout == "folders" else name
        for split, classes in files.items()
        for name, paths in (classes or {}).items()
        if not paths
    ]
    if empty:
        raise FolderError(
            f"{data_dir}: class folders without images ({', '.join(IMAGE_SUFFIXES)}): "
            f"{', '.join(empty)}; add images or remove the folders."
        )
    sizes, modes = [], set()
    if check and not _remote(data_dir):
        everything = [
            p for classes in files.values() for ps in (classes or {}).values() for p in ps
        ]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            headers = dict(zip(everything, pool.map(lambda p: _header(p, max_pixels), everything)))
        for path in everything:
            bad, size, mode, why = headers[path]
            if bad and on_bad == "stop":
                raise FolderError(f"{path}: {bad.replace('_', ' ')} image ({why}); "
                                  "--bad_images=skip leaves such images out.")  # fmt: skip
            if bad:
                skips.add(bad, path, why)
            else:
                sizes.append(size)
                modes.add(mode)
        for classes in files.values():
            for name in classes or {}:
                classes[name] = [p for p in classes[name] if headers[p][0] is None]
    class_names = tuple(train)
    if layout == "split":
        rng = random.Random(seed)
        held, kept = {}, {}
        for name, paths in train.items():
            order = list(paths)
            rng.shuffle(order)
            n = max(1, round(len(order) * validation_split)) if len(order) > 1 else 0
            held[name], kept[name] = sorted(order[:n]), sorted(order[n:])
        train, val = kept, held

    def split_of(classes):
        pairs = [(p, i) for i, name in enumerate(class_names) for p in classes.get(name, [])]
        return Split(tuple(p for p, _ in pairs), tuple(i for _, i in pairs))

    listing = Listing(
        data_dir=data_dir, class_names=class_names, train=split_of(train),
        validation=split_of(val), layout=layout, skipped=skips.frozen(),
        channels=1 if modes and modes <= set(_GRAY_MODES) else 3, sizes=tuple(sizes[:SAMPLE]),
    )  # fmt: skip
    if not len(listing.train) or not len(listing.validation):
        raise FolderError(f"{data_dir}: no {'training' if not len(listing.train) else 'validation'} "
                          "images are left once the unreadable ones are out.")  # fmt: skip
    return listing
