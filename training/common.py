"""Pieces shared by `training/cifar.py`, `training/imagenet.py` and `evaluate.py`.

Flags common to both trainers, strategy creation for every backend, the
learning-rate schedules of the paper, weight decay, the callbacks that make a
run resumable and loud about NaNs, and the steps of the trainers' `main()`
that do not depend on the data set (at the end of this file, in the order the
trainers call them).
"""

import contextlib
import json
import math
import os
import sys
import time
from typing import NamedTuple

import keras
import numpy as np
from absl import flags, logging

# Keep the trainers runnable from a checkout without `pip install -e .`.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
FLAGS = flags.FLAGS


def define_common_flags(*, model, batch_size, epochs, lr_schedule):
    """Defines the flags both trainers share, with per-script defaults."""
    flags.DEFINE_string("model", model, "Builder name from keras_preact.list_models().")
    flags.DEFINE_string("model_dir", None, "Where the run writes everything.", required=True)
    flags.DEFINE_enum("strategy", "default", STRATEGIES, "Distribution strategy.")
    flags.DEFINE_string("tpu", "", "TPU name or grpc:// address for --strategy=tpu.")
    flags.DEFINE_integer("batch_size", batch_size, "Global batch size (all replicas).")
    flags.DEFINE_integer("epochs", epochs, "Number of Keras epochs.")
    flags.DEFINE_integer(
        "steps_per_epoch", None, "Steps per Keras epoch (default: one pass over the data)."
    )
    flags.DEFINE_enum(
        "lr_schedule",
        lr_schedule,
        ["step", "cosine", "constant"],
        "step: divide by 10 at --lr_boundaries; cosine: cosine decay to 0.",
    )
    flags.DEFINE_float(
        "base_lr",
        None,
        "Peak learning rate (default: 0.1 * batch / 256 for ImageNet, 0.1 for CIFAR).",
    )
    flags.DEFINE_list(
        "lr_boundaries",
        [],
        "Steps (CIFAR) or epochs (ImageNet) at which "
        "the step schedule divides the learning rate by 10.",
    )
    flags.DEFINE_integer("warmup_steps", 0, "Warm-up steps.")
    flags.DEFINE_enum(
        "warmup",
        "linear",
        ["linear", "constant"],
        "linear: ramp from 0 to base_lr; constant: hold --warmup_lr "
        "(the paper's 0.01 for the first 400 iterations).",
    )
    flags.DEFINE_float("warmup_lr", 0.01, "Learning rate of a constant warm-up.")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.DEFINE_bool("nesterov", False, "Nesterov momentum.")
    flags.DEFINE_float("weight_decay", 1e-4, "L2 coefficient (gradient += wd * w).")
    flags.DEFINE_enum(
        "weight_decay_on",
        "kernels",
        ["kernels", "all"],
        "kernels: conv and dense kernels only; all: every trainable "
        "weight, as the paper's Torch code does.",
    )
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing (0 in the paper).")
    flags.DEFINE_bool("mixed_precision", False, "float16 compute on GPU, bfloat16 on TPU/CPU.")
    flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step.")
    flags.DEFINE_integer("seed", 0, "Seed for initialization and the input pipeline.")
    flags.DEFINE_bool("deterministic", False, "Deterministic input order and ops (slower).")
    flags.DEFINE_enum(
        "loop",
        "auto",
        ["auto", "fit", "custom"],
        "auto: model.fit, except a strategy.run loop under "
        "multi_worker_mirrored (Keras 3 fit fails there).",
    )
    flags.DEFINE_float("drop_path_rate", 0.0, "Stochastic depth rate (0 in the paper).")
    flags.DEFINE_integer("verbose", 1, "Keras progress bar: 0 silent, 1 bar, 2 line per epoch.")
    flags.DEFINE_integer("max_steps", None, "Stop after this many steps in total (smoke tests).")


# ----------------------------------------------------------------------------
# Strategy.


def make_strategy(name, tpu=""):
    """Returns the distribution strategy for `--strategy`, or None outside TF.

    Under TensorFlow this is a `tf.distribute.Strategy`. Under JAX,
    `mirrored` (and `default` with several devices) installs
    `keras.distribution.DataParallel` over all local devices and returns None.
    Under PyTorch only `default` and `one_device` exist.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if name in ("multi_worker_mirrored", "tpu"):
            raise ValueError(f"--strategy={name} needs KERAS_BACKEND=tensorflow; got jax.")
        devices = jax.devices()
        if name in ("default", "mirrored") and len(devices) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
            logging.info("JAX DataParallel over %d devices.", len(devices))
        return None
    if backend != "tensorflow":
        if name not in ("default", "one_device"):
            raise ValueError(
                f"--strategy={name} needs KERAS_BACKEND=tensorflow (or jax for "
                f"mirrored); got {backend}."
            )
        return None
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy must be one of {STRATEGIES}; got {name!r}.")


def scope(strategy):
    """`strategy.scope()`, or a no-op context outside TensorFlow."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def num_replicas(strategy):
    if strategy is not None:
        return strategy.num_replicas_in_sync
    dist = keras.distribution.distribution()
    return len(dist.device_mesh.devices.flatten()) if dist is not None else 1


def is_chief(strategy):
    """True on the worker that writes checkpoints and logs (always, outside MWMS)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )


def scalar(value):
    """A Python float from a Keras/TF variable or tensor (also a MirroredVariable)."""
    value = getattr(value, "value", value)
    if hasattr(value, "numpy"):
        return float(value.numpy())
    return float(keras.ops.convert_to_numpy(value))


def write_dir(strategy, model_dir):
    """`model_dir` on the chief; a scratch folder under it on other workers.

    Every worker saves (reading variables may involve collectives), but only the
    chief's files are the run's.
    """
    if is_chief(strategy):
        return model_dir
    resolver = strategy.cluster_resolver
    path = os.path.join(model_dir, "workers", f"{resolver.task_type}_{resolver.task_id}")
    os.makedirs(path, exist_ok=True)
    return path


def set_precision(mixed, strategy_name):
    if not mixed:
        return "float32"
    gpu = False
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    elif keras.backend.backend() == "jax":
        import jax

        gpu = jax.default_backend() == "gpu"
    elif keras.backend.backend() == "torch":
        import torch

        gpu = torch.cuda.is_available()
    policy = "mixed_float16" if gpu and strategy_name != "tpu" else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


# ----------------------------------------------------------------------------
# Learning rate and weight decay.


@keras.saving.register_keras_serializable(package="keras_preact_training")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Step or cosine decay after a linear or constant warm-up.

    Args:
        base_lr: the learning rate after warm-up.
        total_steps: length of the run; cosine decays to 0 at this step.
        decay: `"step"`, `"cosine"` or `"constant"`.
        boundaries: for `"step"`, the steps at which the rate is divided by 10.
        warmup_steps: length of the warm-up.
        warmup: `"linear"` (0 to `base_lr`) or `"constant"` (`warmup_lr`).
        warmup_lr: the rate during a constant warm-up.

    Example:

    >>> s = WarmupSchedule(0.1, 64000, decay="step", boundaries=[32000, 48000],
    ...                    warmup_steps=400, warmup="constant", warmup_lr=0.01)
    >>> [round(float(s(i)), 4) for i in (0, 400, 32000, 48000)]
    [0.01, 0.1, 0.01, 0.001]
    """

    def __init__(
        self,
        base_lr,
        total_steps,
        *,
        decay="step",
        boundaries=(),
        warmup_steps=0,
        warmup="linear",
        warmup_lr=0.0,
    ):
        if decay not in ("step", "cosine", "constant"):
            raise ValueError(f"decay must be step, cosine or constant; got {decay!r}.")
        if warmup not in ("linear", "constant"):
            raise ValueError(f"warmup must be linear or constant; got {warmup!r}.")
        self.base_lr, self.total_steps = float(base_lr), int(total_steps)
        self.decay, self.boundaries = decay, [int(b) for b in boundaries]
        self.warmup_steps, self.warmup, self.warmup_lr = int(warmup_steps), warmup, float(warmup_lr)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        if self.decay == "step":
            lr = keras.ops.convert_to_tensor(self.base_lr, "float32")
            for b in self.boundaries:
                lr = keras.ops.where(step >= b, lr * 0.1, lr)
        elif self.decay == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            frac = keras.ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            lr = 0.5 * self.base_lr * (1.0 + keras.ops.cos(math.pi * frac))
        else:
            lr = keras.ops.convert_to_tensor(self.base_lr, "float32")
        if self.warmup_steps > 0:
            if self.warmup == "linear":
                warm = self.base_lr * (step + 1.0) / self.warmup_steps
            else:
                warm = keras.ops.convert_to_tensor(self.warmup_lr, "float32")
            lr = keras.ops.where(step < self.warmup_steps, warm, lr)
        return lr

    def get_config(self):
        return dict(
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            decay=self.decay,
            boundaries=self.boundaries,
            warmup_steps=self.warmup_steps,
            warmup=self.warmup,
            warmup_lr=self.warmup_lr,
        )


def add_weight_decay(model, weight_decay, on="kernels"):
    """Adds an L2 penalty `wd / 2 * ||w||^2` to the loss (gradient `+= wd * w`).

    This is the coupled L2 decay of SGD in the paper's Torch code (its
    `weightDecay` passes through momentum). By default only conv and dense
    kernels are decayed, not BatchNormalization gamma/beta nor biases; `on="all"`
    decays every trainable weight as the Torch code does.

    Returns:
        The number of decayed variables.
    """
    if on not in ("kernels", "all"):
        raise ValueError(f"on must be 'kernels' or 'all'; got {on!r}.")
    if weight_decay <= 0:
        return 0
    count = 0
    for layer in model._flatten_layers(include_self=False):
        if on == "kernels":
            variables = (
                [getattr(layer, "kernel", None)]
                if isinstance(
                    layer, (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D)
                )
                else []
            )
        else:
            variables = layer._trainable_variables
        for v in variables:
            if v is not None and v.trainable:
                v.regularizer = keras.regularizers.L2(weight_decay / 2.0)
                count += 1
    return count


def make_optimizer(schedule):
    return keras.optimizers.SGD(
        learning_rate=schedule, momentum=FLAGS.momentum, nesterov=FLAGS.nesterov
    )


# ----------------------------------------------------------------------------
# Run directory, checkpoints and resume.


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_weights_atomic(model, path):
    """`model.save_weights`, written to a temporary file and renamed into place."""
    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    model.save_weights(tmp, overwrite=True)
    os.replace(tmp, path)


def save_model_weights_atomic(model, path):
    """Like `save_weights_atomic`, without the optimizer variables (the shippable file)."""
    if getattr(model, "optimizer", None) is None:
        return save_weights_atomic(model, path)
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    save_weights_atomic(clone, path)


def write_config(model_dir, extra):
    """Writes the trainer's flag values and derived settings to `model_dir/config.json`."""
    config = {}
    for module, module_flags in FLAGS.flags_by_module_dict().items():
        if "absl" in module:
            continue
        config.update({f.name: f.value for f in module_flags})
    config.update(extra)
    config["keras_backend"] = keras.backend.backend()
    config["keras_version"] = keras.__version__
    config["argv"] = sys.argv
    os.makedirs(model_dir, exist_ok=True)
    write_json_atomic(os.path.join(model_dir, "config.json"), config)
    return config


def checkpoint_paths(model_dir):
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    return (
        os.path.join(ckpt_dir, "latest.weights.h5"),
        os.path.join(ckpt_dir, "latest.json"),
    )


def restore(model, optimizer, model_dir):
    """Loads the last epoch checkpoint, if any, and returns the epoch to start at.

    The checkpoint holds the model and optimizer variables (momentum and the
    iteration counter that drives the schedule), so training continues exactly
    where the last completed epoch ended.
    """
    weights, state = checkpoint_paths(model_dir)
    if not (os.path.exists(weights) and os.path.exists(state)):
        return 0
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    model.load_weights(weights)
    with open(state) as f:
        epoch = json.load(f)["epoch"]
    logging.info("Resumed from %s at epoch %d.", weights, epoch)
    print(f"Resuming from {weights}: {epoch} epoch(s) done.", flush=True)
    return epoch


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves model + optimizer at every epoch end, atomically, and the best weights."""

    def __init__(self, model_dir, *, monitor="val_top1", write=True):
        super().__init__()
        self.model_dir, self.monitor, self.write = model_dir, monitor, write
        self.weights, self.state = checkpoint_paths(model_dir)
        self.best = -np.inf
        os.makedirs(os.path.dirname(self.weights), exist_ok=True)
        if os.path.exists(self.state):
            with open(self.state) as f:
                self.best = json.load(f).get("best", -np.inf)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not self.write:
            return
        value = logs.get(self.monitor)
        if value is not None and value > self.best:
            self.best = float(value)
            save_model_weights_atomic(self.model, os.path.join(self.model_dir, "best.weights.h5"))
        # Weights first, then the state that points at them: a kill in between
        # replays one epoch at most from the previous state.
        save_weights_atomic(self.model, self.weights)
        write_json_atomic(
            self.state,
            {
                "epoch": epoch + 1,
                "best": self.best,
                "logs": {k: float(v) for k, v in logs.items()},
                "time": time.time(),
            },
        )


class NaNGuard(keras.callbacks.Callback):
    """Stops training with an error the moment the loss stops being finite."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"Loss became {loss} at batch {batch} of this epoch; stopping. "
                "Lower --base_lr, add --warmup_steps, or check the input data."
            )


class MaxSteps(keras.callbacks.Callback):
    def __init__(self, max_steps):
        super().__init__()
        self.max_steps = max_steps

    def on_train_batch_end(self, batch, logs=None):
        if scalar(self.model.optimizer.iterations) >= self.max_steps:
            self.model.stop_training = True


def callbacks(model_dir, *, chief=True, max_steps=None):
    """Checkpoint, NaN guard, CSV and TensorBoard logs under `model_dir`."""
    cbs = [NaNGuard(), EpochCheckpoint(model_dir, write=chief)]
    if chief:
        cbs.append(keras.callbacks.CSVLogger(os.path.join(model_dir, "log.csv"), append=True))
        if _has_tensorboard():
            cbs.append(
                keras.callbacks.TensorBoard(
                    os.path.join(model_dir, "tensorboard"), update_freq="epoch"
                )
            )
    if max_steps:
        cbs.append(MaxSteps(max_steps))
    return cbs


def _has_tensorboard():
    """Keras writes TensorBoard logs through tf.summary: it needs both packages."""
    try:
        import tensorboard  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError:
        logging.warning("tensorflow or tensorboard not installed: no TensorBoard logs.")
        return False
    return True


def top_k_metrics(one_hot=False, num_classes=1000):
    """top-1 and top-5 (top-k with k = classes when there are fewer than 5)."""
    k = min(5, num_classes)
    if one_hot:
        return [
            keras.metrics.CategoricalAccuracy(name="top1"),
            keras.metrics.TopKCategoricalAccuracy(k=k, name="top5"),
        ]
    return [
        keras.metrics.SparseCategoricalAccuracy(name="top1"),
        keras.metrics.SparseTopKCategoricalAccuracy(k=k, name="top5"),
    ]


def loss_fn(num_classes, label_smoothing):
    if label_smoothing:
        # Sparse labels are one-hot encoded by the pipeline in this case.
        return keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=label_smoothing
        )
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def write_summary(model_dir, summary):
    path = os.path.join(model_dir, "summary.json")
    write_json_atomic(path, summary)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str), flush=True)


# ----------------------------------------------------------------------------
# The trainers' main(): the steps both share, in the order they call them.


class Run(NamedTuple):
    """What `setup_run` decides before any variable exists."""

    strategy: object  # a tf.distribute.Strategy, or None outside TensorFlow
    policy: str  # the Keras precision policy
    replicas: int
    chief: bool  # this worker writes the run's files
    loop: str  # "fit" or "custom" (`--loop=auto` resolved)


def setup_run():
    """Seeds, determinism, strategy and precision from the flags; returns a `Run`."""
    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    # Strategy and precision come first: variables are created under them.
    strategy = make_strategy(FLAGS.strategy, FLAGS.tpu)
    policy = set_precision(FLAGS.mixed_precision, FLAGS.strategy)
    replicas = num_replicas(strategy)
    chief = is_chief(strategy)
    loop = FLAGS.loop
    if loop == "auto":
        loop = "custom" if FLAGS.strategy == "multi_worker_mirrored" else "fit"
    return Run(strategy, policy, replicas, chief, loop)


def lr_schedule(base_lr, total_steps, boundaries):
    """The `WarmupSchedule` of the flags; `boundaries` in steps."""
    return WarmupSchedule(
        base_lr,
        total_steps,
        decay=FLAGS.lr_schedule,
        boundaries=boundaries,
        warmup_steps=FLAGS.warmup_steps,
        warmup=FLAGS.warmup,
        warmup_lr=FLAGS.warmup_lr,
    )


def build_model(run, schedule, *, input_shape, classes, label_smoothing=0.0, wrap=None):
    """`--model` with weight decay and its SGD optimizer, under the run's strategy.

    Args:
        run: the `Run` from `setup_run`.
        schedule: the learning-rate schedule.
        input_shape: input shape of the keras_preact model.
        classes: number of classes (logits out, no softmax).
        label_smoothing: for the loss and metrics of `--loop=fit`.
        wrap: optional function of the keras_preact model that returns the model
            to train (e.g. with on-device input normalization).

    Returns:
        `(base, model, optimizer, decayed)`: the keras_preact model (the weights
        the run ships), the model that trains (`wrap(base)` or `base`), its
        built optimizer (compiled in when `run.loop == "fit"`) and the number of
        weight-decayed variables.
    """
    import keras_preact

    with scope(run.strategy):
        base = keras_preact.get_model(
            FLAGS.model,
            input_shape=input_shape,
            classes=classes,
            classifier_activation=None,
            weights=None,
            drop_path_rate=FLAGS.drop_path_rate,
        )
        decayed = add_weight_decay(base, FLAGS.weight_decay, FLAGS.weight_decay_on)
        model = wrap(base) if wrap is not None else base
        optimizer = make_optimizer(schedule)
        if run.loop == "custom" and run.policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        if run.loop == "fit":
            model.compile(
                optimizer=optimizer,
                loss=loss_fn(classes, label_smoothing),
                metrics=top_k_metrics(one_hot=bool(label_smoothing), num_classes=classes),
                jit_compile=FLAGS.jit_compile,
            )
        optimizer.build(model.trainable_variables)
    return base, model, optimizer, decayed


def write_run_config(run, **derived):
    """`config.json` (flags, the run's set-up and `derived` values), on the chief only."""
    if run.chief:
        write_config(
            FLAGS.model_dir,
            {"replicas": run.replicas, "precision_policy": run.policy, "loop": run.loop, **derived},
        )


def fit(
    run,
    model,
    optimizer,
    train_data,
    val_data_fn,
    *,
    steps_per_epoch,
    initial_epoch,
    label_smoothing=0.0,
):
    """Trains to `--epochs` with `model.fit` or the `strategy.run` loop; returns the history.

    `val_data_fn()` returns the validation data (distributed for the custom loop).
    """
    if run.loop == "fit":
        history = model.fit(
            train_data,
            epochs=FLAGS.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_data_fn(),
            callbacks=callbacks(FLAGS.model_dir, chief=run.chief, max_steps=FLAGS.max_steps),
            verbose=FLAGS.verbose,
        ).history
        return {k.replace("compile_metrics_", ""): v for k, v in history.items()}
    from training import custom_loop

    return custom_loop.fit(
        model,
        optimizer,
        run.strategy,
        train_data,
        epochs=FLAGS.epochs,
        steps_per_epoch=steps_per_epoch,
        global_batch_size=FLAGS.batch_size,
        model_dir=FLAGS.model_dir,
        initial_epoch=initial_epoch,
        val_dist_dataset_fn=val_data_fn,
        max_steps=FLAGS.max_steps,
        jit_compile=FLAGS.jit_compile,
        verbose=FLAGS.verbose,
        label_smoothing=label_smoothing,
    )


def final_evaluation(run, model, val_data_fn):
    """`{"loss", "top1", "top5", ...}` of `model` on `val_data_fn()`."""
    if run.loop == "fit":
        return model.evaluate(val_data_fn(), verbose=0, return_dict=True)
    from training import custom_loop

    return custom_loop.evaluate(model, run.strategy, val_data_fn())


def write_final(run, base, optimizer, *, history, initial_epoch, start, **results):
    """Saves `final.weights.h5` of `base` and writes `summary.json` (chief only).

    The summary holds `results` and what every run reports; it is returned.
    """
    save_model_weights_atomic(
        base, os.path.join(write_dir(run.strategy, FLAGS.model_dir), "final.weights.h5")
    )
    summary = {
        "model": FLAGS.model,
        **results,
        "epochs_run": len(history.get("loss", [])),
        "resumed_from_epoch": initial_epoch,
        "steps": int(scalar(optimizer.iterations)),
        "wall_time_s": round(time.time() - start, 1),
        "backend": keras.backend.backend(),
        "replicas": run.replicas,
        "model_dir": FLAGS.model_dir,
    }
    if run.chief:
        write_summary(FLAGS.model_dir, summary)
    return summary
