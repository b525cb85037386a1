r"""Trains a pre-activation ResNet on ImageNet (or Imagenette) with tf.distribute.

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

From an installed wheel: `python -m keras_preact.train.imagenet ...`. The input pipeline
needs TensorFlow; under KERAS_BACKEND=jax the model trains with
keras.distribution.DataParallel (`--loop=fit`) or the jitted step (`--loop=jax`) over the
local devices. An epoch is a fresh pass over the shards; a checkpoint inside one records the
records consumed, which the resume skips undecoded. This module is the trainer's flags and
data; the run is `trainer.train`'s.
"""

import warnings

from absl import flags

from keras_preact.train import config, modeling, sources, trainer
from keras_preact.train import flags as train_flags

FLAGS = flags.FLAGS
#: (classes, training images, validation images) of the known sources; ImageNet otherwise.
_SIZES = {"imagenette": (10, 9469, 3925)}


@train_flags.program
def define_flags():
    """The trainer's flags: its own, and the shared ones with `ImagenetConfig`'s defaults."""
    train_flags.define_train_flags(config.ImagenetConfig)
    positive = dict(lower_bound=1)
    # fmt: off
    flags.DEFINE_string("source", "tfrecord", "tfrecord (ImageNet-format shards train-*, "
                        "validation-* in --data_dir), or a TFDS name: imagenet2012, imagenette.")
    flags.DEFINE_string("data_dir", None, "Shard folder, or the TFDS data_dir.")
    flags.DEFINE_string("train_split", "train", "TFDS split for training.")
    flags.DEFINE_string("eval_split", "validation", "TFDS split for evaluation.")
    flags.DEFINE_integer("num_classes", None, "Default: 1000 (10 for imagenette).", **positive)
    flags.DEFINE_integer("num_train_examples", None, "Default: 1281167 (9469 for imagenette).",
                         **positive)
    flags.DEFINE_integer("num_eval_examples", None, "Evaluate on the first N validation images "
                         "only (default: all of them).", **positive)
    flags.DEFINE_enum("train_crop", "scale", ["scale", "inception"], "scale: shorter side in "
                      "[256, 480], random 224 crop ([1]); inception: 8%-100% area, 3/4-4/3 "
                      "aspect ([19, 20], the paper's ResNet-200).")
    flags.DEFINE_bool("color_augmentation", False, "Colour jitter and PCA lighting noise.")
    flags.DEFINE_bool("fused_decode", True, "Decode only the crop window of each JPEG.")
    flags.DEFINE_integer("image_size", 224, "Training crop size.", **positive)
    flags.DEFINE_integer("eval_resize", 256, "Shorter side before the centre crop.", **positive)
    flags.DEFINE_integer("eval_size", 224, "Evaluation centre crop (320 with --eval_resize=320).",
                         **positive)
    flags.DEFINE_integer("shuffle_buffer", 10_000, "Encoded records in the shuffle buffer.",
                         **positive)
    flags.DEFINE_integer("label_offset", 1, "Subtracted from TFRecord labels (TF scripts write "
                         "1..1000). Ignored for TFDS sources.")
    flags.register_multi_flags_validator(["source", "data_dir", "train_split", "eval_split"],
                                         _source_is_readable)
    flags.register_multi_flags_validator(
        ["eval_resize", "eval_size"], lambda v: v["eval_resize"] >= v["eval_size"],
        message="--eval_resize must be >= --eval_size (the centre crop is taken from the resize).")
    flags.register_multi_flags_validator(
        ["batch_size", "num_train_examples", "steps_per_epoch", "source"], _an_epoch_has_a_step)
    # fmt: on


def _source_is_readable(values):
    if values["source"] == "tfrecord":
        if not values["data_dir"]:
            raise flags.ValidationError(
                "--source=tfrecord needs --data_dir, the folder of train-* and validation-* "
                "shards (or pass a TFDS name: --source=imagenet2012 or imagenette)."
            )
        splits = [values["train_split"], values["eval_split"]]
        prefixes = sorted({"train" if s.startswith("train") else "validation" for s in splits})
        problem = sources.tfrecord_problem(values["data_dir"], prefixes)
    else:
        problem = sources.tfds_problem(values["source"], values["data_dir"])
    if problem:
        raise flags.ValidationError(problem)
    return True


def _an_epoch_has_a_step(values):
    images = values["num_train_examples"] or _sizes(values["source"])[1]
    if values["steps_per_epoch"] is None and values["batch_size"] > images:
        raise flags.ValidationError(
            f"--batch_size={values['batch_size']} exceeds the {images} training images "
            "(--num_train_examples): an epoch would have no step; pass a smaller --batch_size "
            "or --steps_per_epoch."
        )
    return True


def _sizes(source):
    return _SIZES.get(source, (1000, 1_281_167, 50_000))


def derive(cfg):
    """The values an ImageNet run computes from its flags (steps, lr, normalization)."""
    classes, n_train, _ = _sizes(cfg.source)
    cfg = cfg.derive(
        num_classes=cfg.num_classes or classes,
        num_train_examples=cfg.num_train_examples or n_train,
    )
    cfg = cfg.derive(
        steps_per_epoch=cfg.steps_per_epoch or cfg.num_train_examples // cfg.batch_size
    )
    # ImageNet's statistics normalize the inputs, unless the start weights carry their own.
    from keras_preact.data import imagenet_preprocessing as ipp

    return cfg.derive(
        base_lr=cfg.base_lr or 0.1 * cfg.batch_size / 256,  # the linear scaling rule
        **modeling.resolved_options(cfg, model=cfg.model, mean=ipp.MEAN_RGB, std=ipp.STDDEV_RGB),
    )


class ImagenetData(trainer.Data):
    """ImageNet-format data through tf.data: per-replica batches, one file-level shard per
    input pipeline, uint8 unless `--nonormalize_on_device`. Skipped records are counted
    apart for training and for each evaluation pass."""

    def __init__(self, cfg, run):
        from keras_preact.data import tfdata

        self.cfg, self.run = cfg, run
        size = None if cfg.eval_size != cfg.image_size else cfg.image_size
        self.input_shape, self.classes = (size, size, 3), cfg.num_classes
        self.counter, self.eval_counter = tfdata.SkipCounter(), tfdata.SkipCounter()
        self.cursor, self.resume_at = tfdata.StreamPosition(), None
        # Per-replica batches under tf.distribute: a step takes one of each local replica.
        self.per_replica = run.strategy is not None and (run.replicas > 1 or run.loop == "custom")
        self.both = dict(  # the same records, batches and labels for training and eval
            source=cfg.source, data_dir=cfg.data_dir, batch_size=cfg.batch_size,
            normalize=False, label_offset=cfg.label_offset,
            num_classes=cfg.num_classes,  # other labels are skipped and counted
        )  # fmt: skip

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

        cfg = self.cfg
        skip = self.resume_at[1] if self.resume_at and self.resume_at[0] == epoch else 0
        self.resume_at = None

        def fn(context):
            return self._on_host(tfdata.imagenet_dataset(
                split=cfg.train_split, training=True, input_context=context,
                crop=cfg.train_crop, image_size=cfg.image_size, color=cfg.color_augmentation,
                fused=cfg.fused_decode, seed=cfg.seed, deterministic=cfg.deterministic,
                shuffle_buffer=cfg.shuffle_buffer, counter=self.counter, epoch=epoch,
                skip_records=skip, position=self.cursor, **self.both,
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
                split=cfg.eval_split, training=False, input_context=context,
                image_size=cfg.eval_size, eval_resize=cfg.eval_resize,
                counter=self.eval_counter, **self.both,
            )  # fmt: skip
            if cfg.num_eval_examples:
                pipelines = context.num_input_pipelines if context else 1
                batch = tfdata.per_replica_batch(cfg.batch_size, context)
                ds = ds.unbatch().take(cfg.num_eval_examples // pipelines).batch(batch)
            return self.eval_counter.per_pass(self._on_host(ds))

        return self._distributed(fn)

    def summary(self, final, gather=lambda value: [value]):
        from keras_preact.data import tfdata

        def every_process(counts):  # each process counted the records it read
            counts = {c: int(counts[c]) for c in tfdata.SKIP_CAUSES}
            return {c: sum(p[c] for p in gather(counts)) for c in counts}

        evaluated, trained = (
            every_process(self.eval_counter.counts()),
            every_process(self.counter.counts()),
        )
        return {
            "source": self.cfg.source,
            "eval_top1": float(final["top1"]),
            "eval_top5": float(final["top5"]),
            "eval_loss": float(final["loss"]),
            "eval_size": self.cfg.eval_size,
            "eval_resize": self.cfg.eval_resize,
            "eval_images_scored": int(final["examples"]),
            "eval_skipped_by_cause": {c: evaluated[c] for c in tfdata.SKIP_CAUSES},
            "train_skipped_images": sum(trained.values()),
            "train_skipped_by_cause": {c: trained[c] for c in tfdata.SKIP_CAUSES},
        }


def main(argv):
    del argv
    cfg = derive(config.ImagenetConfig.from_flags(FLAGS))
    # The evaluation set ends where its records end; its length is unknown to Keras (bad
    # records are dropped on the way), and Keras takes the end of such a finite dataset for
    # a training set that ran short ("Your input ran out of data"). The training input
    # never ends early, so only the evaluation can: that warning is for it alone.
    warnings.filterwarnings("ignore", "Your input ran out of data", UserWarning)
    trainer.train(cfg, lambda cfg, run: (cfg, ImagenetData(cfg, run)))


def run_main():
    """The console entry point: `python -m keras_preact.train.imagenet` or `training/imagenet.py`."""
    trainer.run_program(main, define_flags())


if __name__ == "__main__":
    run_main()
