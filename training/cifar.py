r"""Trains a pre-activation ResNet on CIFAR-10, CIFAR-100 or Fashion-MNIST.

The paper's CIFAR recipe (Sec. 4 and Appendix of He et al. 2016): SGD with
momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and
48k iterations, stop at 64k, lr 0.01 for the first 400 iterations; 4-pixel
padding, random crop, horizontal flip, per-channel normalization:

    python training/cifar.py --preset=paper --dataset=cifar10 \
        --model=PreActResNet110 --model_dir=runs/c10_r110

The preset fills the flags not given; an explicit flag wins (`--preset=paper --epochs=1`
runs one epoch). An ablation of the paper's Fig. 4(c) unit with Fig. 2(c) shortcuts:

    python training/cifar.py --preset=paper --unit=relu_before_add \
        --shortcut=exclusive_gating --gate_bias=-6 --model_dir=runs/c10_ablation

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

from training import (  # noqa: E402
    checkpoints,
    config,
    distribution,
    loops,
    modeling,
    optimization,
    sources,
)

#: `--preset=paper`: 64k iterations = 160 epochs of 400 steps at batch 128.
PRESETS = {
    "paper": {
        "batch_size": 128,
        "steps_per_epoch": 400,
        "epochs": 160,
        "lr_schedule": "step",
        "lr_boundaries": ["32000", "48000"],
        "warmup_steps": 400,
        "warmup": "constant",
        "warmup_lr": 0.01,
        "base_lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
    }
}

config.define_train_flags(
    model="PreActResNet20", batch_size=128, epochs=160, lr_schedule="step", presets=PRESETS
)
flags.adopt_module_key_flags(config)
flags.DEFINE_enum("dataset", "cifar10", list(sources.MEMORY_DATASETS), "Dataset.")
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
flags.DEFINE_bool("flip", True, "Random horizontal flips (also used for Fashion-MNIST).")
flags.DEFINE_integer(
    "padding", 4, "Padding of the random crop; 0 disables cropping.", lower_bound=0
)
flags.DEFINE_integer(
    "eval_examples", None, "Evaluate on the first N test images only (smoke runs).", lower_bound=1
)


@flags.multi_flags_validator(
    ["source", "data_dir", "dataset"], message="--source=files needs --data_dir."
)
def _files_need_a_folder(values):
    return values["source"] != "files" or bool(values["data_dir"])


@flags.multi_flags_validator(["source", "data_dir", "dataset"])
def _tfds_can_load(values):
    if values["source"] == "tfds":
        problem = sources.tfds_problem(values["dataset"], values["data_dir"])
        if problem:
            raise flags.ValidationError(problem)
    return True


@flags.multi_flags_validator(["pipeline", "loop", "strategy"])
def _pipeline_fits_backend_and_loop(values):
    if values["pipeline"] == "tfdata" and keras.backend.backend() != "tensorflow":
        raise flags.ValidationError(
            "--pipeline=tfdata feeds tf.data batches: use KERAS_BACKEND=tensorflow or "
            "--pipeline=numpy (or auto)."
        )
    custom = values["loop"] == "custom" or (
        values["loop"] == "auto" and values["strategy"] == "multi_worker_mirrored"
    )
    if custom and values["pipeline"] == "numpy":
        raise flags.ValidationError(
            "--loop=custom distributes a tf.data dataset: use --pipeline=tfdata (or auto)."
        )
    return True


FLAGS = flags.FLAGS


def main(argv):
    del argv
    start = time.time()

    # 1. Configuration: the flags, once, as a frozen Config (values checked at parsing).
    cfg = config.from_flags(FLAGS, PRESETS)
    cfg = cfg.derive(base_lr=cfg.base_lr or 0.1)

    # 2. Seeds, strategy and precision: variables are created under them.
    run = distribution.setup(cfg)
    pipeline = cfg.pipeline
    if pipeline == "auto":
        pipeline = "tfdata" if keras.backend.backend() == "tensorflow" else "numpy"

    # 3. Data, in memory; uint8 batches when the model normalizes on the device.
    from keras_preact.data import numpy_pipeline

    (x_train, y_train), (x_test, y_test) = sources.load_arrays(
        cfg.dataset, cfg.source, cfg.data_dir
    )
    if cfg.batch_size > len(x_train):
        raise app.UsageError(
            f"--batch_size={cfg.batch_size} exceeds the {len(x_train)} training images."
        )
    if cfg.eval_examples:
        x_test, y_test = x_test[: cfg.eval_examples], y_test[: cfg.eval_examples]
    # The data set's statistics normalize the inputs, unless the start weights carry their own.
    mean, std = numpy_pipeline.channel_stats(x_train)
    cfg = cfg.derive(
        **modeling.resolved_options(cfg, model=cfg.model, mean=mean, std=std),
        pipeline=pipeline,
        steps_per_epoch=cfg.steps_per_epoch or len(x_train) // cfg.batch_size,
        num_train=len(x_train),
        num_test=len(x_test),
    )
    cfg = cfg.derive(total_steps=cfg.steps_per_epoch * cfg.epochs)
    mean, std = cfg.mean, cfg.std
    on_host = not cfg.normalize_on_device
    if pipeline == "numpy":
        train_data = numpy_pipeline.ArrayDataset(
            x_train,
            y_train,
            cfg.batch_size,
            mean,
            std,
            training=True,
            steps_per_epoch=cfg.steps_per_epoch,
            padding=cfg.padding,
            flip=cfg.flip,
            seed=cfg.seed,
            normalize=on_host,
        )
        val_data = numpy_pipeline.ArrayDataset(
            x_test, y_test, 500, mean, std, training=False, normalize=on_host
        )
        val_data_fn = lambda: val_data  # noqa: E731
    else:
        from keras_preact.data import tfdata

        def train_fn(input_context=None):
            return tfdata.array_dataset(
                x_train,
                y_train,
                batch_size=cfg.batch_size,
                training=True,
                mean=mean,
                std=std,
                input_context=input_context,
                padding=cfg.padding,
                flip=cfg.flip,
                seed=cfg.seed,
                deterministic=cfg.deterministic,
                normalize=on_host,
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
                normalize=on_host,
            )

        if run.loop == "custom":
            train_data = run.strategy.distribute_datasets_from_function(train_fn)
            val_data_fn = lambda: run.strategy.distribute_datasets_from_function(val_fn)  # noqa: E731
        else:
            train_data, val_data = train_fn(), val_fn()
            val_data_fn = lambda: val_data  # noqa: E731

    # 4. Model and optimizer.
    schedule = optimization.lr_schedule(
        cfg,
        base_lr=cfg.base_lr,
        total_steps=cfg.total_steps,
        boundaries=[int(b) for b in config.lr_boundaries(cfg)],
    )
    built = modeling.build(
        cfg,
        run,
        schedule,
        input_shape=x_train.shape[1:],
        classes=sources.MEMORY_DATASETS[cfg.dataset],
    )
    cfg = cfg.derive(decayed_variables=built.decayed)
    checkpoints.write_config(cfg, run)

    # 5. Resume from the last completed epoch, if the run was interrupted.
    # The numpy pipeline's order depends only on (seed, batch): it continues where it stopped.
    checkpointer = checkpoints.Checkpointer(
        cfg.model_dir, run.write_dir, data=train_data if pipeline == "numpy" else None
    )
    initial_epoch = checkpointer.restore(built.model).epoch

    # 6. Train.
    history = loops.train(
        cfg,
        run,
        built,
        train_data,
        val_data_fn,
        checkpointer=checkpointer,
        steps_per_epoch=cfg.steps_per_epoch,
        initial_epoch=initial_epoch,
    )

    # 7. Final evaluation on the test set, and the run's summary.
    final = loops.evaluate(cfg, run, built, val_data_fn)
    loops.finish(
        cfg,
        run,
        built,
        history=history,
        initial_epoch=initial_epoch,
        start=start,
        dataset=cfg.dataset,
        test_top1=float(final["top1"]),
        test_top5=float(final["top5"]),
        test_loss=float(final["loss"]),
        train_loss_per_epoch=[float(v) for v in history.get("loss", [])],
    )


if __name__ == "__main__":
    app.run(main)
