r"""The top classes of a trained model on image files, with their names.

    # a weights record (the shipped Fashion-MNIST net) on PNG or JPEG files and folders:
    python -m keras_preact.train.predict --weights=fashion_mnist shirt.png photos/

    # a run folder (its final weights, its architecture and normalization, its classes):
    python -m keras_preact.train.predict --weights=runs/fmnist_r20 --top=3 --format=json img/

    # ImageNet weights: the image resized to 256 on its shorter side, the 224 centre crop
    python -m keras_preact.train.predict --weights=imagenet --model=PreActResNet50 cat.jpg

`--weights` is a weights record name, a run folder (its `final.weights.h5`, else its
`best.weights.h5`), a trainer's `.weights.h5` (its run's `config.json` is found next to
it, as `evaluate.py` does) or a whole `.keras` model. Images are read as the weights
expect them: converted to their channels (grayscale or RGB), resized to the network's
input for the small datasets (28x28 Fashion-MNIST, 32x32 CIFAR), or resized to
`--eval_resize` on the shorter side and centre-cropped to `--eval_size` for ImageNet-sized
nets; the normalization is the one the weights carry (the model applies it). Class names
are the run's (`class_names` in its `config.json`: the folder names of `--dataset=folder`,
a TFDS dataset's label names), else the weights' dataset's (ImageNet's 1,000, CIFAR-10/100's,
Fashion-MNIST's), else `class_N`. The output is a table, or JSON or CSV (`--format`), one row per image.
"""

import csv
import io
import json
import os
import sys

import keras
import numpy as np
from absl import app, flags

from keras_preact.train import config, fs, sources
from keras_preact.train import flags as train_flags

FLAGS = flags.FLAGS
#: The image files `predict` reads from a folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@train_flags.program
def define_flags():
    # fmt: off
    train_flags.DEFINE_path("weights", None, "A weights record name, a run folder, a trainer's "
                        ".weights.h5 file or a .keras model.", required=True)
    flags.DEFINE_string("model", None, "The network, for a record or a weights file that does "
                        "not name it (e.g. --weights=imagenet --model=PreActResNet50).")
    train_flags.DEFINE_path("config", None, "The run's config.json, when it is not next to "
                        "--weights.")
    flags.DEFINE_integer("top", 5, "Classes per image.", lower_bound=1)
    flags.DEFINE_enum("format", "table", ["table", "json", "csv"], "Output format.")
    flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", lower_bound=1)
    flags.DEFINE_integer("eval_resize", 256, "ImageNet-sized nets: the shorter side the image "
                         "is resized to before the centre crop.", lower_bound=1)
    flags.DEFINE_integer("eval_size", 224, "ImageNet-sized nets: the centre crop's side.",
                         lower_bound=1)
    # fmt: on


def image_files(paths):
    """The image files of `paths` (files, and folders searched recursively), sorted within
    each folder; FileNotFoundError names a path that does not exist, ValueError a folder
    without images."""
    found = []
    for path in paths:
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            inside = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.lower().endswith(IMAGE_SUFFIXES)
            )
            if not inside:
                raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            found += inside
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder.")
    return found


def read_image(path, shape, *, resize=None):
    """The image at `path` as uint8 `shape` (H, W, C): converted to C channels, resized to
    (H, W); with `resize`, first resized to `resize` on its shorter side, then the centre
    (H, W) crop. ValueError names a file that is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if shape[-1] == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}).") from None
    height, width = shape[:2]
    if resize is None:
        image = image.resize((width, height), Image.BILINEAR)
    else:
        scale = resize / min(image.size)
        size = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
        image = image.resize(size, Image.BILINEAR)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    return np.asarray(image, np.uint8).reshape(shape)


def class_names(dataset, classes, recorded=None):
    """The names of `classes` classes: `recorded` (a run's `class_names`, from its data), else
    `dataset`'s own, else `class_N`."""
    if recorded is not None and len(recorded) == classes:
        return tuple(recorded)
    if dataset == "imagenet" and classes == 1000:
        from keras_preact import imagenet_utils

        index = imagenet_utils.class_index()
        return tuple(index[str(i)][1] for i in range(1000))
    names = sources.CLASS_NAMES.get(dataset)
    if names is not None and len(names) == classes:
        return names
    return tuple(f"class_{i}" for i in range(classes))


def resolve_weights(weights):
    """A run folder's weights file (`final.weights.h5`, else `best.weights.h5`), or
    `weights` itself."""
    weights = os.path.expanduser(weights)
    if not fs.isdir(weights):
        return weights
    for name in ("final.weights.h5", "best.weights.h5"):
        if fs.isfile(fs.join(weights, name)):
            return fs.join(weights, name)
    raise app.UsageError(
        f"--weights={weights} is a folder without final.weights.h5 or best.weights.h5: pass a "
        f"run folder whose run ended (or wrote a best model), or a weights file."
    )


class Predictor:
    """A model from `weights` (see the module), with what its images need: `shape`, the
    ImageNet-style `resize` (None for the small datasets), `names` of its classes."""

    def __init__(self, weights, *, model=None, config_path=None, eval_resize=256, eval_size=224):
        from keras_preact.train import evaluate

        weights = resolve_weights(weights)
        given = {"weights": weights, **({"model": model} if model else {})}
        cfg = config.EvalConfig.from_values(given, explicit=set(given))
        run = evaluate.run_config(weights, config_path and os.path.expanduser(config_path))
        what = evaluate.plan(cfg, run)
        dataset, shape, self.resize = self._data(cfg, run, eval_resize, eval_size)
        if not weights.endswith(".keras") and what.normalization is None:
            raise app.UsageError(
                f"--weights={weights} does not say how its pixels are normalized (a bare "
                f".weights.h5 without its run's config.json): pass --config=RUN/config.json."
            )
        classes = what.classes or 1000
        self.model = evaluate.build_model(cfg, what, shape, classes)
        self.shape = tuple(self.model.input_shape[1:]) if shape is None else shape
        recorded = run.get("class_names") if run is not None else None
        self.names = class_names(dataset, int(self.model.output_shape[-1]), recorded)
        self.weights = weights

    @staticmethod
    def _data(cfg, run, eval_resize, eval_size):
        """`(dataset, input shape or None, ImageNet resize or None)` of the weights."""
        import keras_preact

        if run is not None:
            dataset = run.get("dataset") or "imagenet"
            if dataset in sources.MEMORY_SHAPES:
                return dataset, sources.MEMORY_SHAPES[dataset], None
            size = run.get("eval_size") or eval_size
            shape = (size, size, run.get("channels") or 3)
            if run.get("train_crop") == "pad":  # small images, evaluated whole
                return dataset, shape, None
            return dataset, shape, run.get("eval_resize") or eval_resize
        if cfg.weights.endswith((".keras", ".weights.h5")):
            return "local", None, None
        record = keras_preact.weights.get_record(cfg.weights)
        if record.dataset in sources.MEMORY_SHAPES:
            return record.dataset, sources.MEMORY_SHAPES[record.dataset], None
        size = record.eval_size or eval_size
        return record.dataset, (size, size, 3), eval_resize * size // 224

    def probabilities(self, images):
        """Softmax probabilities of uint8 images `(N, H, W, C)`."""
        logits = keras.ops.convert_to_numpy(self.model(images, training=False))
        logits = logits.astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        return probs / probs.sum(-1, keepdims=True)

    def predict(self, paths, *, top=5, batch_size=32):
        """`[(path, [(name, index, probability), ...])]`, the `top` classes of each image."""
        rows = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            images = np.stack([read_image(p, self.shape, resize=self.resize) for p in chunk])
            for path, probs in zip(chunk, self.probabilities(images)):
                best = np.argsort(-probs)[:top]
                rows.append((path, [(self.names[i], int(i), float(probs[i])) for i in best]))
        return rows


def render(rows, fmt):
    """The rows of `Predictor.predict` as a table, JSON or CSV text."""
    if fmt == "json":
        return json.dumps(
            [{"image": path, "top": [{"class": n, "index": i, "probability": round(p, 6)}
                                     for n, i, p in top]} for path, top in rows],
            indent=2,
        )  # fmt: skip
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["image", "rank", "class", "index", "probability"])
        for path, top in rows:
            for rank, (name, index, prob) in enumerate(top, 1):
                writer.writerow([path, rank, name, index, f"{prob:.6f}"])
        return out.getvalue().rstrip("\n")
    width = max([len("image")] + [len(path) for path, _ in rows])
    lines = [f"{'image':<{width}}  top classes (probability)"]
    for path, top in rows:
        lines.append(f"{path:<{width}}  " + ", ".join(f"{n} ({p:.3f})" for n, _, p in top))
    return "\n".join(lines)


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Name image files or folders after the flags.")
    try:
        files = image_files(paths)
        predictor = Predictor(FLAGS.weights, model=FLAGS.model, config_path=FLAGS.config,
                              eval_resize=FLAGS.eval_resize, eval_size=FLAGS.eval_size)  # fmt: skip
        rows = predictor.predict(files, top=FLAGS.top, batch_size=FLAGS.batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from None
    print(render(rows, FLAGS.format), flush=True)


def run_main():
    """The console entry point: `python -m keras_preact.train.predict` (`keras-preact-predict`)."""
    from keras_preact.train import trainer

    trainer.run_program(main, define_flags())


if __name__ == "__main__":
    sys.exit(run_main())
