"""Everything a run writes to disk and reads back to resume, behind one small API.

`Checkpointer` is the only reader and writer of a run's resumable state; both training
loops (`model.fit` through `callbacks.EpochCheckpoint`, and `custom_loop.fit`) call its
`save` at the end of every epoch, and the trainers call its `restore` once before training.
A checkpoint holds the model's variables **and its optimizer's** (iteration counter,
which drives the learning-rate schedule, and momentum): the trainers compile the model
with its optimizer in both loops, so `model.save_weights` writes both.

Files under `model_dir` (see docs/training.md):

    checkpoints/latest.weights.h5   model + optimizer variables after the last epoch
    checkpoints/latest.json         {"epoch", "steps", "best", "logs", "time"}
    best.weights.h5                 the model alone, when the monitored metric improves
    final.weights.h5                the model alone, at the end (`save_model_weights_atomic`)
    config.json                     the run's options and their origins (`write_config`)
    summary.json                    the run's results (`write_summary`)
"""

import json
import os
import sys
import time
from typing import NamedTuple

import keras
import numpy as np
from absl import logging

from training import metrics


def write_json_atomic(path, obj):
    """Writes `obj` as JSON to a temporary file, then renames it into place."""
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


class Restored(NamedTuple):
    """The state a run resumes from (all zero / empty for a fresh run)."""

    epoch: int  # epochs completed
    steps: int  # optimizer iterations after them
    best: float  # best value of the monitored metric so far


class Checkpointer:
    """Reads and writes a run's resumable state; one instance per run, used by both loops.

    Args:
        model_dir: the run's folder; `restore` reads the chief's checkpoint from here.
        write_dir: where `save` writes (`model_dir` on the chief, a scratch folder on
            other workers, which must save too because reading variables may be
            collective). Default: `model_dir`.
        monitor: the log key whose improvement writes `best.weights.h5`.

    Example (resume, train, save after each epoch):

        checkpointer = Checkpointer(model_dir)
        start = checkpointer.restore(model).epoch
        for epoch in range(start, epochs):
            logs = train_one_epoch()
            checkpointer.save(model, epoch=epoch + 1, logs=logs)
    """

    def __init__(self, model_dir, write_dir=None, *, monitor="val_top1"):
        self.model_dir, self.write_dir = model_dir, write_dir or model_dir
        self.monitor = monitor
        self.best = -np.inf

    def _paths(self, root):
        folder = os.path.join(root, "checkpoints")
        return os.path.join(folder, "latest.weights.h5"), os.path.join(folder, "latest.json")

    @staticmethod
    def _optimizer(model):
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError(
                f"model {model.name!r} has no optimizer: compile it with its optimizer so "
                "the checkpoint holds the optimizer's iterations and momentum."
            )
        return optimizer

    def restore(self, model):
        """Loads the last epoch checkpoint into `model` and its optimizer, if there is one.

        Returns:
            `Restored(epoch, steps, best)`; epoch 0 when there is no checkpoint.
        """
        optimizer = self._optimizer(model)
        weights, state_path = self._paths(self.model_dir)
        if not (os.path.exists(weights) and os.path.exists(state_path)):
            return Restored(0, 0, -np.inf)
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        model.load_weights(weights)
        with open(state_path) as f:
            state = json.load(f)
        self.best = state.get("best", -np.inf)
        steps = int(metrics.scalar(optimizer.iterations))
        if "steps" in state and state["steps"] != steps:
            logging.warning(
                "%s holds optimizer step %d but %s says %d: the run was stopped between "
                "the two writes; resuming from the weights' step.",
                weights,
                steps,
                state_path,
                state["steps"],
            )
        message = (
            f"Resuming from {weights}: {state['epoch']} epoch(s) done, optimizer step "
            f"{steps}, learning rate {metrics.learning_rate(optimizer):.6g}."
        )
        logging.info(message)
        print(message, flush=True)
        return Restored(int(state["epoch"]), steps, self.best)

    def save(self, model, *, epoch, logs):
        """Writes the state after `epoch` completed epochs (and the best weights).

        Args:
            model: the model that trains, compiled with its optimizer.
            epoch: the number of completed epochs.
            logs: the epoch's metrics (floats).
        """
        optimizer = self._optimizer(model)
        weights, state_path = self._paths(self.write_dir)
        os.makedirs(os.path.dirname(weights), exist_ok=True)
        value = logs.get(self.monitor)
        if value is not None and value > self.best:
            self.best = float(value)
            save_model_weights_atomic(model, os.path.join(self.write_dir, "best.weights.h5"))
        # Weights first, then the state that points at them: a kill in between
        # replays one epoch at most from the previous state.
        save_weights_atomic(model, weights)
        write_json_atomic(
            state_path,
            {
                "epoch": int(epoch),
                "steps": int(metrics.scalar(optimizer.iterations)),
                "best": self.best,
                "logs": {k: float(v) for k, v in logs.items()},
                "time": time.time(),
            },
        )


def write_summary(model_dir, summary):
    """Writes `summary.json` and prints it."""
    write_json_atomic(os.path.join(model_dir, "summary.json"), summary)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str), flush=True)


def write_config(cfg, run):
    """`config.json` (chief only): every option and its origin, the run's set-up, versions."""
    if not run.chief:
        return
    record = {
        **cfg.record(),
        "replicas": run.replicas,
        "precision_policy": run.policy,
        "loop": run.loop,
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "argv": sys.argv,
    }
    if cfg.loop == "auto":
        record["origins"]["loop"] = "derived"
    os.makedirs(cfg.model_dir, exist_ok=True)
    write_json_atomic(os.path.join(cfg.model_dir, "config.json"), record)
