r"""Trains a pre-activation ResNet on ImageNet, or on your own images, with tf.distribute.

The paper's ImageNet recipe (Sec. 4 of He et al. 2016, following He et al.
2015): SGD with momentum 0.9, weight decay 1e-4, batch 256, lr 0.1 (scaled
linearly with the global batch) divided by 10 at epochs 30 and 60, 90 epochs;
224x224 crops with scale augmentation, evaluated on the 224 centre crop of the
image resized to 256 (and 320 from 320 for Table 5):

    python training/imagenet.py --preset=paper --strategy=mirrored \
        --source=tfrecord --data_dir=/data/imagenet-tfrecords \
        --model=PreActResNet200 --train_crop=inception --model_dir=runs/r200

Multi-worker (set TF_CONFIG on every machine, same command everywhere) and TPU:

    python training/imagenet.py --strategy=multi_worker_mirrored ...
    python training/imagenet.py --strategy=tpu --tpu=grpc://10.0.0.2:8470 ...

Fine-tuning from a weights record, with another number of classes (every layer but the
classifier is loaded):

    python training/imagenet.py --source=imagenette --weights=imagenet \
        --model=PreActResNet50 --epochs=5 --base_lr=0.01 --model_dir=runs/r50_nette

Your own images, in class folders (`train/` and `val/`), or any TFDS dataset; classes,
their names, the number of images, the channels and the crop come from the data
(docs/your_data.md):

    python training/imagenet.py --dataset=folder --data_dir=~/photos \
        --weights=imagenet --model=PreActResNet50 --backbone_lr_scale=0.1 ...
    python training/imagenet.py --dataset=tfds:oxford_flowers102 --eval_split=test ...

From an installed wheel: `python -m keras_preact.train.imagenet ...`. The input pipeline
needs TensorFlow; under KERAS_BACKEND=jax the model trains with
keras.distribution.DataParallel (`--loop=fit`) or the jitted step (`--loop=jax`) over the
local devices. An epoch is a fresh pass over the shards; a checkpoint inside one records the
records consumed, which the resume skips undecoded. This module is the trainer's flags and
data; the run is `trainer.train`'s.
"""

import os
import sys
import warnings

from absl import app, flags

from keras_preact.train import config, modeling, sources, trainer
from keras_preact.train import flags as train_flags

FLAGS = flags.FLAGS
#: `--dataset` values besides `tfds:NAME`.
DATASETS = ("imagenet", "folder")
#: TFDS datasets whose images take ImageNet's statistics and crops (the others' come
#: from the data).
IMAGENET_LIKE = ("imagenet2012", "imagenette", "imagenet_v2", "imagenet_a", "imagenet_r")
#: Images whose shorter side is at most this are small (CIFAR-style pad-and-crop, trained at
#: their own size) unless `--image_size` says otherwise.
SMALL_SIDE = 128
#: Training images sampled for the normalization statistics of data that is not ImageNet.
STATS_SAMPLE = 2000


@train_flags.program
def define_flags():
    """The trainer's flags: its own, and the shared ones with `ImagenetConfig`'s defaults."""
    train_flags.define_train_flags(config.ImagenetConfig)
    positive = dict(lower_bound=1)
    # fmt: off
    flags.DEFINE_string("dataset", "imagenet", "imagenet (read as --source says); folder: class "
                        "folders in --data_dir (train/ and val/ inside it, or "
                        "--validation_split); tfds:NAME: any TFDS image-classification dataset "
                        "(--train_split, --eval_split).")
    flags.register_validator("dataset", _known_dataset, message="must be imagenet, folder or "
                             "tfds:NAME (e.g. tfds:oxford_flowers102).")
    flags.DEFINE_string("source", "tfrecord", "--dataset=imagenet: tfrecord (ImageNet-format "
                        "shards train-*, validation-* in --data_dir), or a TFDS name: "
                        "imagenet2012, imagenette.")
    train_flags.DEFINE_path("data_dir", None, "The shard folder, the class-folder root, or the "
                            "TFDS data_dir.")
    flags.DEFINE_float("validation_split", None, "--dataset=folder without train/ and val/: the "
                       "fraction of each class held out for validation (seeded by --seed).")
    flags.register_validator("validation_split", lambda v: v is None or 0 < v < 1,
                             message="must be in (0, 1).")
    flags.DEFINE_enum("bad_images", "skip", ["skip", "stop"], "Unreadable, corrupt or too-large "
                      "images: skip and count them (naming the first few), or stop.")
    flags.DEFINE_enum("bad_labels", "stop", ["stop", "skip"], "TFRecord labels outside "
                      "[0, --num_classes) after --label_offset: stop before training (the "
                      "first 2,048 records are checked), or skip and count them.")
    flags.DEFINE_string("train_split", "train", "TFDS split for training.")
    flags.DEFINE_string("eval_split", "validation", "TFDS split for evaluation (e.g. test).")
    flags.DEFINE_integer("num_classes", None, "Default: the data's (1000 for ImageNet shards).",
                         **positive)
    flags.DEFINE_integer("num_train_examples", None, "Default: counted (the shards' records, the "
                         "folder's images, the TFDS split's size).", **positive)
    flags.DEFINE_integer("num_eval_examples", None, "Evaluate on the first N validation images "
                         "only (default: all of them).", **positive)
    flags.DEFINE_enum("train_crop", "auto", ["auto", "scale", "inception", "pad"], "scale: "
                      "shorter side in [256, 480] x --image_size/224, random crop ([1]); "
                      "inception: 8%-100% area, 3/4-4/3 aspect ([19, 20], the paper's "
                      "ResNet-200); pad: small images, resized to --image_size, padded by 1/8 "
                      "and randomly cropped (CIFAR's); auto: pad for images no larger than "
                      "--image_size, else scale.")
    flags.DEFINE_bool("color_augmentation", False, "Colour jitter and PCA lighting noise.")
    flags.DEFINE_bool("fused_decode", True, "Decode only the crop window of each JPEG.")
    flags.DEFINE_integer("image_size", None, "Training crop size. Default: 224, or the images' "
                         f"own size when their shorter side is at most {SMALL_SIDE}.", **positive)
    flags.DEFINE_integer("eval_resize", None, "Shorter side before the centre crop (default: "
                         "--eval_size x 256/224).", **positive)
    flags.DEFINE_integer("eval_size", None, "Evaluation centre crop (default: --image_size; "
                         "320 with --eval_resize=320).", **positive)
    flags.DEFINE_integer("shuffle_buffer", 10_000, "Encoded records in the shuffle buffer.",
                         **positive)
    flags.DEFINE_integer("label_offset", 1, "Subtracted from TFRecord labels (TF scripts write "
                         "1..1000). Ignored for TFDS sources and folders.")
    flags.register_multi_flags_validator(
        ["dataset", "source", "data_dir", "train_split", "eval_split"], _source_is_readable)
    flags.register_multi_flags_validator(
        ["eval_resize", "eval_size"],
        lambda v: None in (v["eval_resize"], v["eval_size"]) or v["eval_resize"] >= v["eval_size"],
        message="--eval_resize must be >= --eval_size (the centre crop is taken from the resize).")
    flags.register_multi_flags_validator(["dataset", "validation_split"], _split_fits_dataset)
    flags.register_multi_flags_validator(
        ["batch_size", "num_train_examples", "steps_per_epoch"], _an_epoch_has_a_step)
    # fmt: on


def _an_epoch_has_a_step(values):
    """A given `--num_train_examples` below the batch fails at once (a counted one, once it is
    counted)."""
    images = values["num_train_examples"]
    if images and values["steps_per_epoch"] is None and values["batch_size"] > images:
        raise flags.ValidationError(_no_step(values["batch_size"], images))
    return True


def _no_step(batch_size, images):
    return (
        f"--batch_size={batch_size} exceeds the {images} training images: an epoch would have "
        "no step; pass a smaller --batch_size or --steps_per_epoch."
    )


def _known_dataset(value):
    return value in DATASETS or (value.startswith("tfds:") and len(value) > len("tfds:"))


def resolve_source(dataset, source):
    """The pipeline's source of `--dataset` and `--source`: `"tfrecord"`, `"folder"` or a TFDS
    name."""
    if dataset == "folder":
        return "folder"
    if dataset.startswith("tfds:"):
        return dataset[len("tfds:") :]
    return source


def _split_fits_dataset(values):
    if values["validation_split"] is not None and values["dataset"] != "folder":
        raise flags.ValidationError(
            f"--validation_split holds out part of a --dataset=folder; --dataset="
            f"{values['dataset']} has its own splits (--train_split, --eval_split)."
        )
    return True


def _source_is_readable(values):
    source = resolve_source(values["dataset"], values["source"])
    if values["dataset"] != "imagenet" and values["source"] != "tfrecord":
        raise flags.ValidationError(
            f"--source={values['source']} reads --dataset=imagenet; --dataset="
            f"{values['dataset']} says where the data is: leave --source out."
        )
    if source == "folder":
        if not values["data_dir"]:
            raise flags.ValidationError(
                "--dataset=folder needs --data_dir, the folder of class folders "
                "(DATA_DIR/train/CLASS/*.jpg and DATA_DIR/val/CLASS/*.jpg, or DATA_DIR/CLASS/"
                "*.jpg with --validation_split)."
            )
        if "://" not in values["data_dir"] and not os.path.isdir(values["data_dir"]):
            raise flags.ValidationError(f"--data_dir={values['data_dir']} is not a folder.")
        return True
    if source == "tfrecord":
        if not values["data_dir"]:
            raise flags.ValidationError(
                "--source=tfrecord needs --data_dir, the folder of train-* and validation-* "
                "shards (or pass a TFDS name: --source=imagenet2012 or imagenette; or "
                "--dataset=folder for class folders of images)."
            )
        splits = [values["train_split"], values["eval_split"]]
        prefixes = sorted({"train" if s.startswith("train") else "validation" for s in splits})
        problem = sources.tfrecord_problem(values["data_dir"], prefixes)
    else:
        problem = sources.tfds_problem(source, values["data_dir"])
    if problem:
        raise flags.ValidationError(problem)
    return True


class Found:
    """What the data says of itself, before a model is built: its classes and their names,
    the training examples, the channels and whether its images are small."""

    def __init__(self, cfg):
        from keras_preact.data import folders, tfdata

        self.source = resolve_source(cfg.dataset, cfg.source)
        self.listing, self.lines = None, []
        if self.source == "folder":
            try:
                self.listing = folders.list_folder(
                    cfg.data_dir, validation_split=cfg.validation_split, seed=cfg.seed,
                    on_bad=cfg.bad_images,
                )  # fmt: skip
            except (folders.FolderError, FileNotFoundError) as e:
                raise app.UsageError(str(e)) from None
            self.lines = self.listing.report()
        spec = tfdata.InputSpec(
            source=self.source, data_dir=cfg.data_dir, listing=self.listing,
            num_classes=cfg.num_classes, label_offset=cfg.label_offset,
        )  # fmt: skip
        self.names = tfdata.class_names(spec)
        self.classes = cfg.num_classes or (len(self.names) if self.names else spec.num_classes)
        self.train = cfg.num_train_examples or tfdata.count_examples(spec, cfg.train_split)
        self.channels, self.side = 3, None
        if self.listing is not None:
            self.channels, self.side = self.listing.channels, self.listing.shorter_side()
        elif self.source not in ("tfrecord", *IMAGENET_LIKE):
            info = tfdata.tfds_builder(spec).info
            shape = info.features[tfdata.tfds_keys(info)[0]].shape
            self.channels = 1 if shape[-1] == 1 else 3
            self.side = min(shape[:2]) if None not in shape[:2] else None
        self.imagenet = self.source == "tfrecord" or self.source in IMAGENET_LIKE

    def sizes(self, cfg):
        """`(image_size, eval_size, eval_resize, train_crop)` of the run."""
        small = self.side is not None and self.side <= (cfg.image_size or SMALL_SIDE)
        image_size = cfg.image_size or (self.side if small else 224)
        crop = cfg.train_crop
        if crop == "auto":
            crop = "pad" if small else "scale"
        eval_size = cfg.eval_size or image_size
        if crop == "pad":
            eval_resize = cfg.eval_resize or eval_size  # a small image is seen whole
        else:
            eval_resize = cfg.eval_resize or round(eval_size * 256 / 224)
        return image_size, eval_size, eval_resize, crop


def _check_labels(cfg, source, classes):
    """Stops a run whose TFRecord labels fall outside `[0, classes)` after `--label_offset`
    (the first records of the training shards), saying which flag to change."""
    from keras_preact.data import tfdata

    if source != "tfrecord":
        return
    spec = tfdata.InputSpec(source=source, data_dir=cfg.data_dir, label_offset=cfg.label_offset,
                            num_classes=classes)  # fmt: skip
    low, high, read = tfdata.label_range(spec, cfg.train_split)
    if read == 0 or (low >= 0 and high < classes):
        return
    fix = []
    if low < 0:
        fix.append(f"--label_offset={cfg.label_offset + low} (the shards' labels start at "
                   f"{low + cfg.label_offset})")  # fmt: skip
    if high >= classes:
        fix.append(f"--num_classes={high + 1 - min(low, 0)}")
    problem = (
        f"The labels of the first {read} training records run from {low} to {high} after "
        f"--label_offset={cfg.label_offset}, outside [0, {classes}) of --num_classes={classes}: "
        f"they would be skipped, and the classes shifted. Pass {' and '.join(fix)}"
    )
    if cfg.bad_labels == "stop":
        raise app.UsageError(f"{problem}, or --bad_labels=skip to train without them.")
    print(f"Warning: {problem}. --bad_labels=skip: skipping them.", file=sys.stderr, flush=True)


def derive(cfg, found=None):
    """The values an image run computes from its flags and its data (classes and their names,
    steps, sizes, lr, normalization)."""
    found = found or Found(cfg)
    image_size, eval_size, eval_resize, crop = found.sizes(cfg)
    cfg = cfg.derive(
        num_classes=found.classes,
        class_names=found.names and tuple(found.names),
        channels=found.channels,
        num_train_examples=found.train,
        image_size=image_size,
        eval_size=eval_size,
        eval_resize=eval_resize,
        train_crop=crop,
    )
    if cfg.steps_per_epoch is None and cfg.batch_size > cfg.num_train_examples:
        raise app.UsageError(_no_step(cfg.batch_size, cfg.num_train_examples))
    cfg = cfg.derive(
        steps_per_epoch=cfg.steps_per_epoch or cfg.num_train_examples // cfg.batch_size
    )
    # ImageNet's statistics normalize ImageNet's images; other data's are measured on a sample
    # of its training images. Start weights that carry their own win over both.
    from keras_preact.data import imagenet_preprocessing as ipp

    mean, std = (ipp.MEAN_RGB, ipp.STDDEV_RGB) if found.imagenet else (None, None)
    record = modeling.start_record(cfg, cfg.model)
    if mean is None and (record is None or record.preprocessing is None):
        mean, std = sample_statistics(cfg, found)
    elif mean is None:  # not measured: the start weights' own replace them
        mean, std = (0.5,) * cfg.channels, (0.25,) * cfg.channels
    return cfg.derive(
        base_lr=cfg.base_lr or 0.1 * cfg.batch_size / 256,  # the linear scaling rule
        **modeling.resolved_options(cfg, model=cfg.model, mean=mean, std=std),
    )


def sample_statistics(cfg, found):
    """Per-channel mean and std, in [0, 1] units, of up to `STATS_SAMPLE` training images as
    the evaluation sees them (a seeded sample of a folder; a TFDS split's first images)."""
    import numpy as np

    from keras_preact.data import tfdata

    listing = found.listing
    if listing is not None:
        import dataclasses
        import random

        from keras_preact.data import folders

        pick = sorted(
            random.Random(cfg.seed).sample(
                range(len(listing.train)), min(STATS_SAMPLE, len(listing.train))
            )
        )
        sample = folders.Split(tuple(listing.train.paths[i] for i in pick),
                               tuple(listing.train.labels[i] for i in pick))  # fmt: skip
        listing = dataclasses.replace(listing, train=sample)
    spec = tfdata.InputSpec(
        source=found.source, data_dir=cfg.data_dir, listing=listing, batch_size=100,
        crop=cfg.train_crop, image_size=cfg.eval_size, eval_resize=cfg.eval_resize,
        channels=cfg.channels, normalize=False, num_classes=cfg.num_classes,
        label_offset=cfg.label_offset,
    )  # fmt: skip
    ds = tfdata.imagenet_dataset(spec, cfg.train_split, training=False).unbatch()
    total = count = squares = 0.0
    for image, _ in ds.take(STATS_SAMPLE).batch(100).as_numpy_iterator():
        x = image.astype(np.float64) / 255.0
        total = total + x.sum((0, 1, 2))
        squares = squares + (x * x).sum((0, 1, 2))
        count += x.shape[0] * x.shape[1] * x.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 1e-12))
    return [float(m) for m in mean], [float(s) for s in std]


class ImagenetData(trainer.Data):
    """Image data through tf.data (ImageNet-format shards, class folders, TFDS): per-replica
    batches, one shard per input pipeline, uint8 unless `--nonormalize_on_device`. Skipped
    records are counted apart for training and for each evaluation pass, and reported on the
    console as they grow."""

    def __init__(self, cfg, run, found):
        from keras_preact.data import tfdata

        self.cfg, self.run, self.found = cfg, run, found
        size = None if cfg.eval_size != cfg.image_size else cfg.image_size
        self.input_shape, self.classes = (size, size, cfg.channels), cfg.num_classes
        self.counter, self.eval_counter = tfdata.SkipCounter(), tfdata.SkipCounter()
        self.cursor, self.resume_at = tfdata.StreamPosition(), None
        self.reported = 0
        # Per-replica batches under tf.distribute: a step takes one of each local replica.
        self.per_replica = run.strategy is not None and (run.replicas > 1 or run.loop == "custom")
        # The same records, batches and labels for training and evaluation (other labels
        # are skipped and counted).
        self.spec = tfdata.InputSpec(
            source=found.source, data_dir=cfg.data_dir, listing=found.listing,
            batch_size=cfg.batch_size, num_classes=cfg.num_classes, label_offset=cfg.label_offset,
            crop=cfg.train_crop, image_size=cfg.image_size, channels=cfg.channels,
            color=cfg.color_augmentation, fused=cfg.fused_decode, normalize=False, seed=cfg.seed,
            deterministic=cfg.deterministic, shuffle_buffer=cfg.shuffle_buffer,
        )  # fmt: skip
        self.eval_spec = self.spec.replace(image_size=cfg.eval_size, eval_resize=cfg.eval_resize)

    def _on_host(self, ds):
        """With --nonormalize_on_device: float32 batches, normalized with the run's statistics."""
        import tensorflow as tf

        if self.cfg.normalize_on_device:
            return ds
        offset = tf.constant([255.0 * m for m in self.cfg.mean])
        scale = tf.constant([1.0 / (255.0 * s) for s in self.cfg.std])
        return ds.map(lambda x, y: ((tf.cast(x, tf.float32) - offset) * scale, y),
                      num_parallel_calls=tf.data.AUTOTUNE)  # fmt: skip

    def _distributed(self, fn):
        if self.per_replica:
            return self.run.strategy.distribute_datasets_from_function(fn)
        if self.run.processes > 1:  # the JAX loop: each process reads its own shard
            import tensorflow as tf

            processes, index = self.run.processes, self.run.index
            return fn(tf.distribute.InputContext(processes, index, processes))
        return fn(None)

    def train(self, epoch, step, steps):
        from keras_preact.data import tfdata

        skip = self.resume_at[1] if self.resume_at and self.resume_at[0] == epoch else 0
        self.resume_at = None

        def fn(context):
            return self._on_host(tfdata.imagenet_dataset(
                self.spec, self.cfg.train_split, training=True, input_context=context,
                counter=self.counter, epoch=epoch, skip_records=skip, position=self.cursor,
            ))  # fmt: skip

        return self._distributed(fn)

    def position(self, epoch, step, batches):
        local = self.run.replicas // self.run.processes if self.per_replica else 1
        return {"epoch": epoch, "records": self.cursor.records(batches * local)}

    def restore(self, restored):
        saved = restored.state.get("input") if restored.step else None
        if isinstance(saved, list):  # one position per process, in process order
            mine = saved[self.run.index]
            self.resume_at = (mine["epoch"], mine["records"])

    def evaluate(self):
        from keras_preact.data import tfdata

        cfg = self.cfg

        def fn(context):
            ds = tfdata.imagenet_dataset(
                self.eval_spec,
                cfg.eval_split,
                training=False,
                input_context=context,
                counter=self.eval_counter,
            )
            if cfg.num_eval_examples:
                pipelines = context.num_input_pipelines if context else 1
                batch = tfdata.per_replica_batch(cfg.batch_size, context)
                ds = ds.unbatch().take(cfg.num_eval_examples // pipelines).batch(batch)
            return self.eval_counter.per_pass(self._on_host(ds))

        return self._distributed(fn)

    def notes(self):
        """A console line when this process's training input has skipped more records since
        the last one (per cause), else nothing."""
        from keras_preact.data import tfdata

        counts = self.counter.counts()
        skipped = sum(counts[c] for c in tfdata.SKIP_CAUSES)
        if skipped <= self.reported:
            return []
        self.reported = skipped
        causes = ", ".join(f"{c} {counts[c]}" for c in tfdata.SKIP_CAUSES if counts[c])
        hint = ""
        if counts["bad_label"]:
            hint = (f" (labels outside [0, {self.cfg.num_classes}) after --label_offset="
                    f"{self.cfg.label_offset}: check --num_classes and --label_offset)")  # fmt: skip
        return [f"Training records skipped so far: {causes}{hint}; summary.json gets the counts."]

    def summary(self, final, gather=lambda value: [value]):
        from keras_preact.data import tfdata

        def every_process(counts):  # each process counted the records it read
            counts = {c: int(counts[c]) for c in tfdata.SKIP_CAUSES}
            return {c: sum(p[c] for p in gather(counts)) for c in counts}

        evaluated, trained = (
            every_process(self.eval_counter.counts()),
            every_process(self.counter.counts()),
        )
        listing = self.found.listing
        return {
            "dataset": self.cfg.dataset,
            "source": self.found.source,
            "eval_top1": float(final["top1"]),
            "eval_top5": float(final["top5"]),
            "eval_loss": float(final["loss"]),
            "eval_size": self.cfg.eval_size,
            "eval_resize": self.cfg.eval_resize,
            "eval_images_scored": int(final["examples"]),
            "eval_skipped_by_cause": {c: evaluated[c] for c in tfdata.SKIP_CAUSES},
            "train_skipped_images": sum(trained.values()),
            "train_skipped_by_cause": {c: trained[c] for c in tfdata.SKIP_CAUSES},
            **({"listing_left_out": {c: {"count": n, "first": list(names)}
                                     for c, (n, names) in listing.skipped.items()}}
               if listing is not None else {}),
        }  # fmt: skip


def prepare(cfg, run):
    """The data's classes, sizes and counts (`derive`), and the run's `ImagenetData`."""
    found = Found(cfg)
    cfg = derive(cfg, found)
    _check_labels(cfg, found.source, cfg.num_classes)
    if run.chief and cfg.verbose:
        for line in found.lines:
            print(line, flush=True)
        print(f"{cfg.num_train_examples} training examples, {cfg.num_classes} classes: "
              f"{cfg.steps_per_epoch} steps of {cfg.batch_size} per epoch; images "
              f"{cfg.image_size} px ({cfg.train_crop} crop), evaluated at {cfg.eval_size} px.",
              flush=True)  # fmt: skip
    return cfg, ImagenetData(cfg, run, found)


def main(argv):
    del argv
    cfg = config.ImagenetConfig.from_flags(FLAGS)
    # The evaluation set ends where its records end; its length is unknown to Keras (bad
    # records are dropped on the way), and Keras takes the end of such a finite dataset for
    # a training set that ran short ("Your input ran out of data"). The training input
    # never ends early, so only the evaluation can: that warning is for it alone.
    warnings.filterwarnings("ignore", "Your input ran out of data", UserWarning)
    trainer.train(cfg, prepare)


def run_main():
    """The console entry point: `python -m keras_preact.train.imagenet` or `training/imagenet.py`."""
    trainer.run_program(main, define_flags())


if __name__ == "__main__":
    run_main()
