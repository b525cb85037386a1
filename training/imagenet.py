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

The input pipeline needs TensorFlow; under KERAS_BACKEND=jax the model trains
with keras.distribution.DataParallel over the local devices.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

from training import common  # noqa: E402

common.define_common_flags(model="PreActResNet50", batch_size=256, epochs=90, lr_schedule="step")
flags.DEFINE_string(
    "source",
    "tfrecord",
    "tfrecord (ImageNet-format shards train-*, "
    "validation-* in --data_dir), or a TFDS name: imagenet2012, imagenette.",
)
flags.DEFINE_string("data_dir", None, "Shard folder, or the TFDS data_dir.")
flags.DEFINE_string("train_split", "train", "TFDS split for training.")
flags.DEFINE_string("eval_split", "validation", "TFDS split for evaluation.")
flags.DEFINE_integer("num_classes", None, "Default: 1000 (10 for imagenette).")
flags.DEFINE_integer("num_train_examples", None, "Default: 1281167 (9469 for imagenette).")
flags.DEFINE_integer("num_eval_examples", None, "Default: 50000 (3925 for imagenette).")
flags.DEFINE_enum(
    "train_crop",
    "scale",
    ["scale", "inception"],
    "scale: shorter side in [256, 480], random 224 crop ([1]); inception: "
    "8%-100% area, 3/4-4/3 aspect ([19, 20], the paper's ResNet-200).",
)
flags.DEFINE_bool("color_augmentation", False, "Colour jitter and PCA lighting noise.")
flags.DEFINE_bool("fused_decode", True, "Decode only the crop window of each JPEG.")
flags.DEFINE_integer("image_size", 224, "Training crop size.")
flags.DEFINE_integer("eval_resize", 256, "Shorter side before the centre crop.")
flags.DEFINE_integer("eval_size", 224, "Evaluation centre crop (320 with --eval_resize=320).")
flags.DEFINE_bool(
    "normalize_on_device",
    True,
    "Ship uint8 batches and normalize on the accelerator (4x less host-to-device traffic).",
)
flags.DEFINE_integer("shuffle_buffer", 10_000, "Encoded records in the shuffle buffer.")
flags.DEFINE_integer(
    "label_offset",
    1,
    "Subtracted from TFRecord labels (TF scripts write 1..1000). Ignored for TFDS sources.",
)
flags.DEFINE_enum("preset", None, ["paper"], "paper: the paper's ImageNet schedule.")

FLAGS = flags.FLAGS
_SIZES = {"imagenette": (10, 9469, 3925)}


def with_input_normalization(model, size):
    """uint8 images -> ImageNet mean/std normalization -> `model`, on the device."""
    from keras_preact.data.imagenet_preprocessing import MEAN_RGB, STDDEV_RGB

    inputs = keras.Input((size, size, 3), dtype="uint8", name="image_uint8")
    x = keras.layers.Normalization(
        mean=[255.0 * m for m in MEAN_RGB],
        variance=[(255.0 * s) ** 2 for s in STDDEV_RGB],
        name="input_normalization",
    )(keras.ops.cast(inputs, "float32"))
    return keras.Model(inputs, model(x), name=model.name + "_uint8")


def main(argv):
    del argv
    start = time.time()
    classes, n_train, n_eval = _SIZES.get(FLAGS.source, (1000, 1_281_167, 50_000))
    classes = FLAGS.num_classes or classes
    n_train = FLAGS.num_train_examples or n_train
    n_eval = FLAGS.num_eval_examples or n_eval
    if FLAGS.preset == "paper":
        FLAGS.batch_size, FLAGS.epochs, FLAGS.lr_schedule = 256, 90, "step"
        FLAGS.lr_boundaries, FLAGS.momentum, FLAGS.weight_decay = ["30", "60"], 0.9, 1e-4
    # Seeds, strategy and precision first: variables are created under them.
    run = common.setup_run()

    # Data: per-replica batches, one file-level shard per input pipeline.
    from keras_preact.data import tfdata

    counter = tfdata.SkipCounter()
    both = dict(  # the same records, batches, labels and normalization for training and eval
        source=FLAGS.source,
        data_dir=FLAGS.data_dir,
        batch_size=FLAGS.batch_size,
        normalize=not FLAGS.normalize_on_device,
        label_offset=FLAGS.label_offset,
        one_hot_classes=classes if FLAGS.label_smoothing else None,
    )

    def train_fn(input_context=None):
        return tfdata.imagenet_dataset(
            split=FLAGS.train_split,
            training=True,
            input_context=input_context,
            crop=FLAGS.train_crop,
            image_size=FLAGS.image_size,
            color=FLAGS.color_augmentation,
            fused=FLAGS.fused_decode,
            seed=FLAGS.seed,
            deterministic=FLAGS.deterministic,
            shuffle_buffer=FLAGS.shuffle_buffer,
            counter=counter,
            **both,
        )

    def eval_fn(input_context=None):
        return tfdata.imagenet_dataset(
            split=FLAGS.eval_split,
            training=False,
            input_context=input_context,
            image_size=FLAGS.eval_size,
            eval_resize=FLAGS.eval_resize,
            **both,
        )

    distributed = run.strategy is not None and (run.replicas > 1 or run.loop == "custom")
    if distributed:
        train_data = run.strategy.distribute_datasets_from_function(train_fn)
        eval_data_fn = lambda: run.strategy.distribute_datasets_from_function(eval_fn)  # noqa: E731
    else:
        train_data, eval_data_fn = train_fn(), eval_fn
    steps_per_epoch = FLAGS.steps_per_epoch or n_train // FLAGS.batch_size
    total_steps = steps_per_epoch * FLAGS.epochs

    # Model and optimizer; lr 0.1 per 256 images (linear scaling rule).
    base_lr = FLAGS.base_lr if FLAGS.base_lr is not None else 0.1 * FLAGS.batch_size / 256
    schedule = common.lr_schedule(
        base_lr, total_steps, [int(float(e) * steps_per_epoch) for e in FLAGS.lr_boundaries]
    )
    size = FLAGS.image_size
    base, model, optimizer, decayed = common.build_model(
        run,
        schedule,
        input_shape=(size, size, 3),
        classes=classes,
        label_smoothing=FLAGS.label_smoothing,
        wrap=(lambda m: with_input_normalization(m, size)) if FLAGS.normalize_on_device else None,
    )

    common.write_run_config(
        run,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        base_lr=base_lr,
        decayed_variables=decayed,
        num_classes=classes,
        num_train_examples=n_train,
    )

    # Resume from the last completed epoch, if the run was interrupted.
    initial_epoch = common.restore(model, optimizer, FLAGS.model_dir)

    # Train.
    history = common.fit(
        run,
        model,
        optimizer,
        train_data,
        eval_data_fn,
        steps_per_epoch=steps_per_epoch,
        initial_epoch=initial_epoch,
        label_smoothing=FLAGS.label_smoothing,
    )

    # Final evaluation. The base model's weights are the deliverable: they load
    # into keras_preact.get_model(...) without the uint8 wrapper.
    final = common.final_evaluation(run, model, eval_data_fn)
    common.write_final(
        run,
        base,
        optimizer,
        history=history,
        initial_epoch=initial_epoch,
        start=start,
        source=FLAGS.source,
        eval_top1=float(final["top1"]),
        eval_top5=float(final["top5"]),
        eval_loss=float(final["loss"]),
        eval_size=FLAGS.eval_size,
        eval_resize=FLAGS.eval_resize,
        skipped_images=counter.skipped(),
    )


if __name__ == "__main__":
    app.run(main)
