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
keras.distribution.DataParallel over the local devices.
"""

import time
import warnings

from absl import app, flags

from keras_preact.train import (
    checkpoints,
    config,
    distribution,
    loops,
    modeling,
    optimization,
    resume,
    sources,
)
from keras_preact.train import flags as train_flags

train_flags.define_train_flags(config.ImagenetConfig)
flags.adopt_module_key_flags(train_flags)  # `--help` lists the shared flags too
flags.DEFINE_string(
    "source",
    "tfrecord",
    "tfrecord (ImageNet-format shards train-*, "
    "validation-* in --data_dir), or a TFDS name: imagenet2012, imagenette.",
)
flags.DEFINE_string("data_dir", None, "Shard folder, or the TFDS data_dir.")
flags.DEFINE_string("train_split", "train", "TFDS split for training.")
flags.DEFINE_string("eval_split", "validation", "TFDS split for evaluation.")
flags.DEFINE_integer("num_classes", None, "Default: 1000 (10 for imagenette).", lower_bound=1)
flags.DEFINE_integer(
    "num_train_examples", None, "Default: 1281167 (9469 for imagenette).", lower_bound=1
)
flags.DEFINE_integer(
    "num_eval_examples",
    None,
    "Evaluate on the first N validation images only (default: all of them).",
    lower_bound=1,
)
flags.DEFINE_enum(
    "train_crop",
    "scale",
    ["scale", "inception"],
    "scale: shorter side in [256, 480], random 224 crop ([1]); inception: "
    "8%-100% area, 3/4-4/3 aspect ([19, 20], the paper's ResNet-200).",
)
flags.DEFINE_bool("color_augmentation", False, "Colour jitter and PCA lighting noise.")
flags.DEFINE_bool("fused_decode", True, "Decode only the crop window of each JPEG.")
flags.DEFINE_integer("image_size", 224, "Training crop size.", lower_bound=1)
flags.DEFINE_integer("eval_resize", 256, "Shorter side before the centre crop.", lower_bound=1)
flags.DEFINE_integer(
    "eval_size", 224, "Evaluation centre crop (320 with --eval_resize=320).", lower_bound=1
)
flags.DEFINE_integer(
    "shuffle_buffer", 10_000, "Encoded records in the shuffle buffer.", lower_bound=1
)
flags.DEFINE_integer(
    "label_offset",
    1,
    "Subtracted from TFRecord labels (TF scripts write 1..1000). Ignored for TFDS sources.",
)


@flags.multi_flags_validator(["source", "data_dir", "train_split", "eval_split"])
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
        if problem:
            raise flags.ValidationError(problem)
        return True
    problem = sources.tfds_problem(values["source"], values["data_dir"])
    if problem:
        raise flags.ValidationError(problem)
    return True


@flags.multi_flags_validator(
    ["eval_resize", "eval_size"],
    message="--eval_resize must be >= --eval_size (the centre crop is taken from the resize).",
)
def _crop_fits(values):
    return values["eval_resize"] >= values["eval_size"]


@flags.multi_flags_validator(["batch_size", "num_train_examples", "steps_per_epoch", "source"])
def _an_epoch_has_a_step(values):
    images = values["num_train_examples"] or _sizes(values["source"])[1]
    if values["steps_per_epoch"] is None and values["batch_size"] > images:
        raise flags.ValidationError(
            f"--batch_size={values['batch_size']} exceeds the {images} training images "
            "(--num_train_examples): an epoch would have no step; pass a smaller --batch_size "
            "or --steps_per_epoch."
        )
    return True


FLAGS = flags.FLAGS
#: (classes, training images, validation images) of the known sources; ImageNet otherwise.
_SIZES = {"imagenette": (10, 9469, 3925)}


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
    if cfg.steps_per_epoch < 1:
        raise app.UsageError(
            f"--batch_size={cfg.batch_size} exceeds --num_train_examples="
            f"{cfg.num_train_examples}: an epoch would have no step."
        )
    # ImageNet's statistics normalize the inputs, unless the start weights carry their own.
    from keras_preact.data import imagenet_preprocessing as ipp

    return cfg.derive(
        base_lr=cfg.base_lr or 0.1 * cfg.batch_size / 256,  # the linear scaling rule
        **modeling.resolved_options(cfg, model=cfg.model, mean=ipp.MEAN_RGB, std=ipp.STDDEV_RGB),
    )


def datasets(cfg, run, counter, eval_counter, scored):
    """`(train_data, eval_data_fn)`: per-replica batches, one file-level shard per input
    pipeline; uint8 batches when the model normalizes on the device. `counter` and
    `eval_counter` count skipped records; `scored` the images the evaluation sees."""
    import tensorflow as tf

    from keras_preact.data import tfdata

    both = dict(  # the same records, batches and labels for training and eval
        source=cfg.source,
        data_dir=cfg.data_dir,
        batch_size=cfg.batch_size,
        normalize=False,
        label_offset=cfg.label_offset,
        num_classes=cfg.num_classes,  # other labels are skipped and counted
    )

    def on_host(ds):
        """With --nonormalize_on_device: float32 batches, normalized with the run's statistics."""
        if cfg.normalize_on_device:
            return ds
        offset = tf.constant([255.0 * m for m in cfg.mean])
        scale = tf.constant([1.0 / (255.0 * s) for s in cfg.std])
        return ds.map(
            lambda x, y: ((tf.cast(x, tf.float32) - offset) * scale, y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    def train_fn(input_context=None):
        ds = tfdata.imagenet_dataset(
            split=cfg.train_split,
            training=True,
            input_context=input_context,
            crop=cfg.train_crop,
            image_size=cfg.image_size,
            color=cfg.color_augmentation,
            fused=cfg.fused_decode,
            seed=cfg.seed,
            deterministic=cfg.deterministic,
            shuffle_buffer=cfg.shuffle_buffer,
            counter=counter,
            **both,
        )
        return on_host(ds)

    def eval_fn(input_context=None):
        ds = tfdata.imagenet_dataset(
            split=cfg.eval_split,
            training=False,
            input_context=input_context,
            image_size=cfg.eval_size,
            eval_resize=cfg.eval_resize,
            counter=eval_counter,
            **both,
        )
        if cfg.num_eval_examples:
            pipelines = input_context.num_input_pipelines if input_context else 1
            batch = tfdata.per_replica_batch(cfg.batch_size, input_context)
            ds = ds.unbatch().take(cfg.num_eval_examples // pipelines).batch(batch)

        def count(x, y):  # the images the evaluation sees, after any --num_eval_examples cut
            with tf.control_dependencies([scored.assign_add(tf.cast(tf.shape(y)[0], tf.int64))]):
                return tf.identity(x), tf.identity(y)

        return on_host(ds.map(count))

    distributed = run.strategy is not None and (run.replicas > 1 or run.loop == "custom")
    if distributed:
        distribute = run.strategy.distribute_datasets_from_function
        return distribute(train_fn), lambda: distribute(eval_fn)
    return train_fn(), eval_fn


def main(argv):
    del argv
    start = time.time()

    # 1. Configuration: the flags, once, as a frozen config (values checked at parsing).
    cfg = derive(config.ImagenetConfig.from_flags(FLAGS))

    # 2. Seeds, strategy and precision: variables are created under them. One trainer
    # per run folder.
    run = distribution.setup(cfg)
    lock = resume.lock(run.write_dir)  # noqa: F841 - held until the process ends

    # 3. Data. Skips are counted apart: the training pipeline meets a bad record once per
    # epoch; the final evaluation's counts are taken from one pass (reset before it).
    import tensorflow as tf

    from keras_preact.data import tfdata

    # The evaluation set ends where its records end; its length is unknown to Keras (bad
    # records are dropped on the way), and Keras takes the end of such a finite dataset for
    # a training set that ran short ("Your input ran out of data"). The training set
    # repeats, so only the evaluation can end; that warning is for it alone.
    warnings.filterwarnings("ignore", "Your input ran out of data", UserWarning)
    counter, eval_counter = tfdata.SkipCounter(), tfdata.SkipCounter()
    with tf.device("/CPU:0"):  # a host variable, like the counters'
        scored = tf.Variable(0, dtype=tf.int64, trainable=False, name="eval_images_scored")
    train_data, eval_data_fn = datasets(cfg, run, counter, eval_counter, scored)

    # 4. Model and optimizer.
    schedule = optimization.lr_schedule(cfg)
    built = modeling.build(
        cfg, run, schedule, input_shape=(cfg.image_size, cfg.image_size, 3), classes=cfg.num_classes
    )
    cfg = cfg.derive(decayed_weights=built.decayed)

    # 5. Resume from the last checkpoint, if the run was interrupted and its options are
    # the recorded ones (checked before anything is written).
    changed = resume.check(cfg, cfg.model_dir)
    checkpoints.write_config(cfg, run, resume.history(cfg.model_dir, changed))
    checkpointer = checkpoints.Checkpointer(cfg.model_dir, run.write_dir, export=built.export)
    restored = checkpointer.restore(built.model)
    initial_epoch = restored.epoch

    # 6. Train, within --time_budget when one is given.
    budget = loops.time_budget(cfg, start)
    history = loops.train(
        cfg,
        run,
        built,
        train_data,
        eval_data_fn,
        checkpointer=checkpointer,
        initial_epoch=initial_epoch,
        initial_step=restored.step,
        budget=budget,
    )
    if loops.stopped_by_budget(cfg, budget, history):
        return

    # 7. Final evaluation (one counted pass), and the run's summary.
    eval_counter.reset()
    scored.assign(0)
    final = loops.evaluate(cfg, run, built, eval_data_fn)
    evaluated = eval_counter.counts()
    loops.finish(
        cfg,
        run,
        built,
        history=history,
        initial_epoch=initial_epoch,
        start=start,
        source=cfg.source,
        eval_top1=float(final["top1"]),
        eval_top5=float(final["top5"]),
        eval_loss=float(final["loss"]),
        eval_size=cfg.eval_size,
        eval_resize=cfg.eval_resize,
        eval_images_scored=int(scored.numpy()),
        eval_skipped_by_cause={c: evaluated[c] for c in tfdata.SKIP_CAUSES},
        train_skipped_images=counter.skipped(),
        train_skipped_by_cause={
            c: n for c, n in counter.counts().items() if c in tfdata.SKIP_CAUSES
        },
    )


def run_main():
    """The console entry point: `python -m keras_preact.train.imagenet` or `training/imagenet.py`."""
    loops.run(main)


if __name__ == "__main__":
    run_main()
