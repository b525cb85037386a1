r"""Trains a pre-activation ResNet on CIFAR-10, CIFAR-100 or Fashion-MNIST.

The paper's CIFAR recipe (Sec. 4 and Appendix of He et al. 2016): SGD with
momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and
48k iterations, stop at 64k, lr 0.01 for the first 400 iterations; 4-pixel
padding, random crop, horizontal flip, per-channel normalization:

    python training/cifar.py --preset=paper --dataset=cifar10 \
        --model=PreActResNet110 --model_dir=runs/c10_r110

A short real run on the Debian copy of Fashion-MNIST (see docs/training.md for
the measured result):

    python training/cifar.py --dataset=fashion_mnist --source=files \
        --data_dir=/usr/share/datasets/fashion-mnist --model=PreActResNet20 \
        --epochs=6 --lr_schedule=cosine --warmup_steps=200 \
        --model_dir=runs/fmnist_r20

Data stays in memory. `--pipeline=numpy` augments in numpy and needs no
TensorFlow, so it runs under KERAS_BACKEND=jax or torch on machines without TF;
`--pipeline=tfdata` uses `keras_preact.data.tfdata`.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

from training import common  # noqa: E402

common.define_common_flags(model="PreActResNet20", batch_size=128, epochs=160, lr_schedule="step")
flags.DEFINE_enum("dataset", "cifar10", ["cifar10", "cifar100", "fashion_mnist"], "Dataset.")
flags.DEFINE_enum(
    "source",
    "tfds",
    ["tfds", "files"],
    "tfds: tensorflow-datasets; files: the IDX files (Fashion-MNIST) or "
    "the CIFAR python-version archive in --data_dir, no TensorFlow needed.",
)
flags.DEFINE_string("data_dir", None, "Directory of the files, or the TFDS data_dir.")
flags.DEFINE_enum(
    "pipeline",
    "auto",
    ["auto", "numpy", "tfdata"],
    "auto: tfdata under the TensorFlow backend, numpy otherwise.",
)
flags.DEFINE_enum("preset", None, ["paper"], "paper: the paper's CIFAR schedule (64k steps).")
flags.DEFINE_bool("flip", True, "Random horizontal flips (also used for Fashion-MNIST).")
flags.DEFINE_integer("padding", 4, "Padding of the random crop; 0 disables cropping.")
flags.DEFINE_integer(
    "eval_examples", None, "Evaluate on the first N test images only (smoke runs)."
)

FLAGS = flags.FLAGS
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10}


def load_arrays():
    if FLAGS.source == "files":
        if not FLAGS.data_dir:
            raise app.UsageError("--source=files needs --data_dir.")
        if FLAGS.dataset == "fashion_mnist":
            from keras_preact.data import idx

            return idx.load_fashion_mnist(FLAGS.data_dir)
        from keras_preact.data import cifar_files

        return cifar_files.load_cifar(FLAGS.dataset, FLAGS.data_dir)
    from keras_preact.data import tfdata

    return tfdata.load_tfds_arrays(FLAGS.dataset, data_dir=FLAGS.data_dir)


def main(argv):
    del argv
    start = time.time()
    if FLAGS.label_smoothing:
        # The in-memory pipelines yield sparse labels; smoothing needs one-hot ones.
        raise app.UsageError(
            f"--label_smoothing={FLAGS.label_smoothing} is supported by training/imagenet.py "
            "only; training/cifar.py allows 0."
        )
    if FLAGS.preset == "paper":
        # 64k iterations = 160 epochs of 400 steps at batch 128.
        FLAGS.batch_size, FLAGS.steps_per_epoch, FLAGS.epochs = 128, 400, 160
        FLAGS.lr_schedule, FLAGS.lr_boundaries = "step", ["32000", "48000"]
        FLAGS.warmup_steps, FLAGS.warmup, FLAGS.warmup_lr = 400, "constant", 0.01
        FLAGS.base_lr, FLAGS.momentum, FLAGS.weight_decay = 0.1, 0.9, 1e-4
    # Seeds, strategy and precision come first: variables are created under them.
    run = common.setup_run()
    pipeline = FLAGS.pipeline
    if pipeline == "auto" or run.loop == "custom":
        pipeline = "tfdata" if keras.backend.backend() == "tensorflow" else "numpy"

    # Data.
    from keras_preact.data import numpy_pipeline

    (x_train, y_train), (x_test, y_test) = load_arrays()
    if FLAGS.eval_examples:
        x_test, y_test = x_test[: FLAGS.eval_examples], y_test[: FLAGS.eval_examples]
    mean, std = numpy_pipeline.channel_stats(x_train)
    steps_per_epoch = FLAGS.steps_per_epoch or len(x_train) // FLAGS.batch_size
    total_steps = steps_per_epoch * FLAGS.epochs
    if pipeline == "numpy":
        train_data = numpy_pipeline.ArrayDataset(
            x_train,
            y_train,
            FLAGS.batch_size,
            mean,
            std,
            training=True,
            steps_per_epoch=steps_per_epoch,
            padding=FLAGS.padding,
            flip=FLAGS.flip,
            seed=FLAGS.seed,
        )
        val_data = numpy_pipeline.ArrayDataset(x_test, y_test, 500, mean, std, training=False)
        val_data_fn = lambda: val_data  # noqa: E731
    else:
        from keras_preact.data import tfdata

        def train_fn(input_context=None):
            return tfdata.array_dataset(
                x_train,
                y_train,
                batch_size=FLAGS.batch_size,
                training=True,
                mean=mean,
                std=std,
                input_context=input_context,
                padding=FLAGS.padding,
                flip=FLAGS.flip,
                seed=FLAGS.seed,
                deterministic=FLAGS.deterministic,
            )

        def val_fn(input_context=None):
            return tfdata.array_dataset(
                x_test,
                y_test,
                batch_size=500,
                training=False,
                mean=mean,
                std=std,
                input_context=input_context,
            )

        if run.loop == "custom":
            train_data = run.strategy.distribute_datasets_from_function(train_fn)
            val_data_fn = lambda: run.strategy.distribute_datasets_from_function(val_fn)  # noqa: E731
        else:
            train_data, val_data = train_fn(), val_fn()
            val_data_fn = lambda: val_data  # noqa: E731

    # Model and optimizer.
    base_lr = FLAGS.base_lr if FLAGS.base_lr is not None else 0.1
    schedule = common.lr_schedule(base_lr, total_steps, [int(b) for b in FLAGS.lr_boundaries])
    model, _, optimizer, decayed = common.build_model(
        run, schedule, input_shape=x_train.shape[1:], classes=NUM_CLASSES[FLAGS.dataset]
    )

    os.makedirs(FLAGS.model_dir, exist_ok=True)
    common.write_run_config(
        run,
        pipeline=pipeline,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        base_lr=base_lr,
        decayed_variables=decayed,
        mean=mean.tolist(),
        std=std.tolist(),
        num_train=len(x_train),
        num_test=len(x_test),
    )

    # Resume from the last completed epoch, if the run was interrupted.
    initial_epoch = common.restore(model, optimizer, FLAGS.model_dir)
    if pipeline == "numpy":
        train_data.epoch = initial_epoch

    # Train.
    history = common.fit(
        run,
        model,
        optimizer,
        train_data,
        val_data_fn,
        steps_per_epoch=steps_per_epoch,
        initial_epoch=initial_epoch,
    )

    # Final evaluation on the test set, and the run's summary.
    final = common.final_evaluation(run, model, val_data_fn)
    common.write_final(
        run,
        model,
        optimizer,
        history=history,
        initial_epoch=initial_epoch,
        start=start,
        dataset=FLAGS.dataset,
        test_top1=float(final.get("top1")),
        test_top5=float(final.get("top5")),
        test_loss=float(final.get("loss")),
        train_loss_per_epoch=[float(v) for v in history.get("loss", [])],
    )


if __name__ == "__main__":
    app.run(main)
