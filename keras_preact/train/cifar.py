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
This module is the trainer's flags and data; the run itself is `trainer.train`'s.
"""

import keras
from absl import app, flags

from keras_preact.train import config, distribution, modeling, sources, trainer
from keras_preact.train import flags as train_flags

FLAGS = flags.FLAGS


@train_flags.program
def define_flags():
    """The trainer's flags: its own, and the shared ones with `CifarConfig`'s defaults."""
    train_flags.define_train_flags(config.CifarConfig)
    # fmt: off
    flags.DEFINE_enum("dataset", "cifar10", list(sources.MEMORY_DATASETS), "Dataset.")
    flags.DEFINE_enum("source", "tfds", ["tfds", "files"], "tfds: tensorflow-datasets; files: "
                      "the IDX files (Fashion-MNIST) or the CIFAR python-version archive in "
                      "--data_dir, no TensorFlow needed.")
    train_flags.DEFINE_path("data_dir", None, "Directory of the files, or the TFDS data_dir.")
    flags.DEFINE_enum("pipeline", "auto", ["auto", "numpy", "tfdata"], "auto: tfdata under the "
                      "TensorFlow backend with --loop=fit or custom, numpy otherwise.")
    flags.DEFINE_bool("flip", True, "Random horizontal flips (also used for Fashion-MNIST).")
    flags.DEFINE_integer("padding", 4, "Padding of the random crop; 0 disables cropping.",
                         lower_bound=0)
    flags.DEFINE_float("erasing", 0.0, "Random-erasing probability per training image (numpy "
                       "pipeline; 0: off).")
    flags.register_validator("erasing", lambda v: 0.0 <= v <= 1.0, message="must be in [0, 1].")
    flags.DEFINE_integer("eval_examples", None, "Evaluate on the first N test images only (smoke "
                         "runs).", lower_bound=1)
    flags.DEFINE_integer("eval_batch_size", None, "Evaluation batch size (default: 500, rounded "
                         "down to a multiple of the replicas).", lower_bound=1)
    flags.register_multi_flags_validator(["source", "data_dir", "dataset"], _source_is_readable)
    flags.register_multi_flags_validator(["pipeline", "loop", "strategy", "erasing"],
                                         _pipeline_fits_backend_and_loop)
    # fmt: on


def _source_is_readable(values):
    if values["source"] == "files":
        if not values["data_dir"]:
            raise flags.ValidationError("--source=files needs --data_dir.")
        problem = sources.files_problem(values["dataset"], values["data_dir"])
    else:
        problem = sources.tfds_problem(values["dataset"], values["data_dir"])
    if problem:
        raise flags.ValidationError(problem)
    return True


def _pipeline_fits_backend_and_loop(values):
    loop = distribution.resolve_loop(values["loop"], values["strategy"])
    pipeline = resolve_pipeline(values["pipeline"], loop)
    if pipeline == "tfdata" and keras.backend.backend() != "tensorflow":
        raise flags.ValidationError(
            "--pipeline=tfdata feeds tf.data batches: use KERAS_BACKEND=tensorflow or "
            "--pipeline=numpy (or auto)."
        )
    if loop == "custom" and pipeline == "numpy":
        raise flags.ValidationError(
            "--loop=custom distributes a tf.data dataset: use --pipeline=tfdata (or auto)."
        )
    if values["erasing"] and pipeline != "numpy":
        raise flags.ValidationError("--erasing is an augmentation of --pipeline=numpy.")
    return True


def resolve_pipeline(pipeline, loop):
    """`--pipeline=auto`: tf.data under TensorFlow (not for `--loop=jax`), numpy otherwise."""
    if pipeline != "auto":
        return pipeline
    tf_backend = keras.backend.backend() == "tensorflow"
    return "tfdata" if tf_backend and loop != "jax" else "numpy"


class MemoryData(trainer.Data):
    """CIFAR-10/100 or Fashion-MNIST in memory, through the numpy or the tf.data pipeline.

    Both deliver the examples of global batch `b` in the order of
    `numpy_pipeline.example_order`, so the training input at `(epoch, step)` is global batch
    `epoch * steps_per_epoch + step` on: a resume needs no other position.
    """

    def __init__(self, cfg, run, arrays):
        (self.x, self.y), (self.xt, self.yt) = arrays
        self.cfg, self.run = cfg, run
        self.input_shape, self.classes = self.x.shape[1:], sources.MEMORY_DATASETS[cfg.dataset]
        self.common = dict(mean=cfg.mean, std=cfg.std, normalize=not cfg.normalize_on_device)
        self.shard = dict(shard=(run.index, run.processes)) if run.strategy is None else {}
        self.augment = dict(padding=cfg.padding, flip=cfg.flip, seed=cfg.seed)

    def train(self, epoch, step, steps):
        from keras_preact.data import numpy_pipeline

        cfg, start = self.cfg, epoch * self.cfg.steps_per_epoch + step
        if cfg.pipeline == "numpy":
            data = numpy_pipeline.ArrayDataset(
                self.x, self.y, cfg.batch_size, training=True,
                steps_per_epoch=cfg.steps_per_epoch, erasing=cfg.erasing, **self.augment,
                **self.common, **self.shard,
            )  # fmt: skip
            data.epoch, data.offset = epoch, step  # global batch `start + i` is item i
            return data
        return self._tfdata(lambda context: dict(
            images=self.x, labels=self.y, batch_size=cfg.batch_size, training=True,
            input_context=context, deterministic=cfg.deterministic, start_batch=start,
            num_batches=steps, **self.augment, **self.common,
        ))  # fmt: skip

    def evaluate(self):
        from keras_preact.data import numpy_pipeline

        cfg = self.cfg
        if cfg.pipeline == "numpy":
            return numpy_pipeline.ArrayDataset(
                self.xt, self.yt, cfg.eval_batch_size, training=False, **self.common, **self.shard
            )
        return self._tfdata(lambda context: dict(
            images=self.xt, labels=self.yt, batch_size=cfg.eval_batch_size, training=False,
            input_context=context, **self.common,
        ))  # fmt: skip

    def _tfdata(self, kwargs):
        """A `tfdata.array_dataset` of `kwargs(input_context)`, distributed for the custom
        loop."""
        from keras_preact.data import tfdata

        if self.run.loop == "custom":
            return self.run.strategy.distribute_datasets_from_function(
                lambda context: tfdata.array_dataset(**kwargs(context))
            )
        return tfdata.array_dataset(**kwargs(None))

    def summary(self, final, gather=None):
        return {"dataset": self.cfg.dataset, "test_top1": float(final["top1"]),
                "test_top5": float(final["top5"]), "test_loss": float(final["loss"]),
                "test_images_scored": int(final.get("examples", len(self.xt)))}  # fmt: skip


def prepare(cfg, run, arrays=None):
    """The data in memory (`arrays`, else loaded from `--source`), and the values that follow
    from it: steps per epoch, the normalization (the data set's statistics, unless the start
    weights carry their own)."""
    from keras_preact.data import numpy_pipeline

    arrays = arrays or sources.load_arrays(cfg.dataset, cfg.source, cfg.data_dir)
    (x_train, y_train), (x_test, y_test) = arrays
    if cfg.batch_size > len(x_train):
        raise app.UsageError(
            f"--batch_size={cfg.batch_size} exceeds the {len(x_train)} training images."
        )
    if cfg.eval_examples:
        x_test, y_test = x_test[: cfg.eval_examples], y_test[: cfg.eval_examples]
    mean, std = numpy_pipeline.channel_stats(x_train)
    cfg = cfg.derive(
        **modeling.resolved_options(cfg, model=cfg.model, mean=mean, std=std),
        steps_per_epoch=cfg.steps_per_epoch or len(x_train) // cfg.batch_size,
        eval_batch_size=distribution.eval_batch_size(cfg.eval_batch_size, run.replicas),
        num_train=len(x_train),
        num_test=len(x_test),
    )
    return cfg, MemoryData(cfg, run, ((x_train, y_train), (x_test, y_test)))


def main(argv):
    del argv
    cfg = config.CifarConfig.from_flags(FLAGS)
    cfg = cfg.derive(
        base_lr=cfg.base_lr or 0.1,
        pipeline=resolve_pipeline(cfg.pipeline, distribution.resolve_loop(cfg.loop, cfg.strategy)),
    )
    trainer.train(cfg, prepare)


def run_main():
    """The console entry point: `python -m keras_preact.train.cifar` or `training/cifar.py`."""
    trainer.run_program(main, define_flags())


if __name__ == "__main__":
    run_main()
