r"""Trains a pre-activation ResNet on CIFAR-10, CIFAR-100 or Fashion-MNIST.

The paper's CIFAR recipe (Sec. 4 and Appendix of He et al. 2016): SGD with momentum 0.9,
weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and 48k iterations (epochs 80
and 120 of 400 steps), stop at 64k, lr 0.01 for the first 400 iterations; 4-pixel
padding, random crop, horizontal flip, per-channel normalization:

    python training/cifar.py --preset=paper --dataset=cifar10 \
        --model=PreActResNet110 --model_dir=runs/c10_r110

From an installed wheel, the same trainer is `python -m keras_preact.train.cifar ...`.
The preset fills the flags not given; an explicit flag wins (`--preset=paper --epochs=1`
runs one epoch). An ablation of the paper's Fig. 4(c) unit with Fig. 2(c) shortcuts:

    python training/cifar.py --preset=paper --unit=relu_before_add \
        --shortcut=exclusive_gating --gate_bias=-6 --model_dir=runs/c10_ablation

A short real run on the Debian copy of Fashion-MNIST (docs/training.md has the result):

    python training/cifar.py --dataset=fashion_mnist --source=files \
        --data_dir=/usr/share/datasets/fashion-mnist --model=PreActResNet20 \
        --epochs=6 --lr_schedule=cosine --warmup_steps=200 --model_dir=runs/fmnist_r20

Data stays in memory. `--pipeline=numpy` augments in numpy and needs no TensorFlow, so it
runs under KERAS_BACKEND=jax or torch on machines without TF; `--pipeline=tfdata` uses
`keras_preact.data.tfdata`. `--loop=jax` trains with a jitted JAX step (KERAS_BACKEND=jax).
"""

import time
import types

import keras
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

train_flags.define_train_flags(config.CifarConfig)
flags.adopt_module_key_flags(train_flags)  # `--help` lists the shared flags too
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
    "auto: tfdata under the TensorFlow backend with --loop=fit or custom, numpy otherwise.",
)
flags.DEFINE_bool("flip", True, "Random horizontal flips (also used for Fashion-MNIST).")
flags.DEFINE_integer(
    "padding", 4, "Padding of the random crop; 0 disables cropping.", lower_bound=0
)
flags.DEFINE_float(
    "erasing", 0.0, "Random-erasing probability per training image (numpy pipeline; 0: off)."
)
flags.register_validator("erasing", lambda v: 0.0 <= v <= 1.0, message="must be in [0, 1].")
flags.DEFINE_integer(
    "eval_examples", None, "Evaluate on the first N test images only (smoke runs).", lower_bound=1
)
flags.DEFINE_integer(
    "eval_batch_size",
    None,
    "Evaluation batch size (default: 500, rounded down to a multiple of the replicas).",
    lower_bound=1,
)


@flags.multi_flags_validator(
    ["source", "data_dir", "dataset"], message="--source=files needs --data_dir."
)
def _files_need_a_folder(values):
    if values["source"] != "files":
        return True
    if values["data_dir"]:
        problem = sources.files_problem(values["dataset"], values["data_dir"])
        if problem:
            raise flags.ValidationError(problem)
    return bool(values["data_dir"])


@flags.multi_flags_validator(["source", "data_dir", "dataset"])
def _tfds_can_load(values):
    if values["source"] == "tfds":
        problem = sources.tfds_problem(values["dataset"], values["data_dir"])
        if problem:
            raise flags.ValidationError(problem)
    return True


@flags.multi_flags_validator(["pipeline", "loop", "strategy", "erasing"])
def _pipeline_fits_backend_and_loop(values):
    pipeline = resolve_pipeline(values["pipeline"], values["loop"])
    if pipeline == "tfdata" and keras.backend.backend() != "tensorflow":
        raise flags.ValidationError(
            "--pipeline=tfdata feeds tf.data batches: use KERAS_BACKEND=tensorflow or "
            "--pipeline=numpy (or auto)."
        )
    custom = values["loop"] == "custom" or (
        values["loop"] == "auto" and values["strategy"] == "multi_worker_mirrored"
    )
    if custom and pipeline == "numpy":
        raise flags.ValidationError(
            "--loop=custom distributes a tf.data dataset: use --pipeline=tfdata (or auto)."
        )
    if values["loop"] == "jax" and pipeline != "numpy":
        raise flags.ValidationError("--loop=jax reads the numpy pipeline: use --pipeline=numpy.")
    if values["erasing"] and pipeline != "numpy":
        raise flags.ValidationError("--erasing is an augmentation of --pipeline=numpy.")
    return True


FLAGS = flags.FLAGS


def resolve_pipeline(pipeline, loop):
    """`--pipeline=auto`: tf.data under TensorFlow (not for `--loop=jax`), numpy otherwise."""
    if pipeline != "auto":
        return pipeline
    tf_backend = keras.backend.backend() == "tensorflow"
    return "tfdata" if tf_backend and loop != "jax" else "numpy"


def datasets(cfg, run, arrays):
    """`(train_data, val_data_fn, position)` of the run's pipeline, loop and strategy.

    Both pipelines deliver the examples in the order of `numpy_pipeline.example_order`;
    `position` (its `epoch`, set when the run resumes) is where the training stream starts.
    """
    from keras_preact.data import numpy_pipeline

    (x_train, y_train), (x_test, y_test) = arrays
    normalize = not cfg.normalize_on_device
    common = dict(mean=cfg.mean, std=cfg.std, normalize=normalize)
    augment = dict(padding=cfg.padding, flip=cfg.flip, seed=cfg.seed)
    if cfg.pipeline == "numpy":
        train = numpy_pipeline.ArrayDataset(
            x_train,
            y_train,
            cfg.batch_size,
            training=True,
            steps_per_epoch=cfg.steps_per_epoch,
            erasing=cfg.erasing,
            **augment,
            **common,
        )
        val = numpy_pipeline.ArrayDataset(
            x_test, y_test, cfg.eval_batch_size, training=False, **common
        )
        return train, lambda: val, train
    from keras_preact.data import tfdata

    position = types.SimpleNamespace(
        seed=cfg.seed, epoch=0, offset=0, steps_per_epoch=cfg.steps_per_epoch
    )

    def train_fn(input_context=None):
        return tfdata.array_dataset(
            x_train,
            y_train,
            batch_size=cfg.batch_size,
            training=True,
            input_context=input_context,
            deterministic=cfg.deterministic,
            start_batch=lambda: position.epoch * cfg.steps_per_epoch + position.offset,
            **augment,
            **common,
        )

    def val_fn(input_context=None):
        return tfdata.array_dataset(
            x_test,
            y_test,
            batch_size=cfg.eval_batch_size,
            training=False,
            input_context=input_context,
            **common,
        )

    if run.loop == "custom":
        distribute = run.strategy.distribute_datasets_from_function
        return distribute(train_fn), lambda: distribute(val_fn), position
    val = val_fn()
    return train_fn(), lambda: val, position


def main(argv):
    del argv
    start = time.time()

    # 1. Configuration: the flags, once, as a frozen config (values checked at parsing).
    cfg = config.CifarConfig.from_flags(FLAGS)
    cfg = cfg.derive(base_lr=cfg.base_lr or 0.1, pipeline=resolve_pipeline(cfg.pipeline, cfg.loop))

    # 2. Seeds, strategy and precision: variables are created under them. One trainer
    # per run folder.
    run = distribution.setup(cfg)
    lock = resume.lock(run.write_dir)  # noqa: F841 - held until the process ends

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
        steps_per_epoch=cfg.steps_per_epoch or len(x_train) // cfg.batch_size,
        eval_batch_size=distribution.eval_batch_size(cfg.eval_batch_size, run.replicas),
        num_train=len(x_train),
        num_test=len(x_test),
    )
    train_data, val_data_fn, position = datasets(cfg, run, ((x_train, y_train), (x_test, y_test)))

    # 4. Model and optimizer.
    schedule = optimization.lr_schedule(cfg)
    classes = sources.MEMORY_DATASETS[cfg.dataset]
    built = modeling.build(cfg, run, schedule, input_shape=x_train.shape[1:], classes=classes)
    cfg = cfg.derive(decayed_weights=built.decayed)

    # 5. Resume from the last checkpoint, if the run was interrupted and its options are
    # the recorded ones (checked before anything is written). The input order depends only
    # on (seed, batch): the stream continues where it stopped.
    changed = resume.check(cfg, cfg.model_dir)
    checkpoints.write_config(cfg, run, resume.history(cfg.model_dir, changed))
    checkpointer = checkpoints.Checkpointer(
        cfg.model_dir, run.write_dir, data=position, export=built.export
    )
    restored = checkpointer.restore(built.model)
    initial_epoch = restored.epoch

    # 6. Train, within --time_budget when one is given.
    budget = loops.time_budget(cfg, start)
    history = loops.train(
        cfg,
        run,
        built,
        train_data,
        val_data_fn,
        checkpointer=checkpointer,
        initial_epoch=initial_epoch,
        initial_step=restored.step,
        budget=budget,
        position=position,
    )
    if loops.stopped_by_budget(cfg, budget, history):
        return

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


def run_main():
    """The console entry point: `python -m keras_preact.train.cifar` or `training/cifar.py`."""
    loops.run(main)


if __name__ == "__main__":
    run_main()
