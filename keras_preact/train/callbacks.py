"""Callbacks of the `model.fit` loop; `NaNGuard` is also called by the custom loop."""

import logging
import math
import os
import time

import keras

from keras_preact.train import metrics

log = logging.getLogger(__name__)


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
    """Stops `fit` once the optimizer has made `max_steps` steps in total."""

    def __init__(self, max_steps):
        super().__init__()
        self.max_steps = max_steps

    def on_train_batch_end(self, batch, logs=None):
        if metrics.scalar(self.model.optimizer.iterations) >= self.max_steps:
            self.model.stop_training = True


class LearningRate(keras.callbacks.Callback):
    """Adds `lr`, the learning rate at the end of the epoch, to the epoch's logs.

    Listed before the checkpoint and TensorBoard so `log.csv` and TensorBoard see it (the custom loop logs
    the same value).
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = metrics.learning_rate(self.model.optimizer)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the run's state through a `checkpoints.Checkpointer` at every epoch end.

    The checkpointer also writes `log.csv` (from the checkpoint, so a kill can neither lose
    nor repeat a row).
    """

    def __init__(self, checkpointer):
        super().__init__()
        self.checkpointer = checkpointer

    def on_epoch_end(self, epoch, logs=None):
        self.checkpointer.save(self.model, epoch=epoch + 1, logs=logs or {})


class InputEpoch(keras.callbacks.Callback):
    """Sets the training input's `epoch` as each epoch begins, so the batches of epoch `e`
    are those of the stream's epoch `e` (`numpy_pipeline.ArrayDataset`), in every loop."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def on_epoch_begin(self, epoch, logs=None):
        self.data.epoch = epoch


class TimeBudget(keras.callbacks.Callback):
    """Stops training at an epoch end when the next epoch would overrun a wall-clock budget.

    The epoch just finished is checkpointed first (list this callback after the
    checkpoint's), so the run stops at a step boundary with nothing lost, and
    `stopped` tells the trainer to exit 0 with a resume hint instead of its final
    evaluation. The next epoch's cost is the longest epoch so far, with a 10 % margin.

    Args:
        budget_s: seconds, counted from `start`.
        start: the process's start time (`time.time()`), default now.
    """

    def __init__(self, budget_s, *, start=None):
        super().__init__()
        self.budget_s = float(budget_s)
        self.start = time.time() if start is None else start
        self.longest = 0.0
        self.stopped = False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        self.longest = max(self.longest, now - self._epoch_start)
        if now - self.start + 1.1 * self.longest > self.budget_s:
            self.stopped = True
            if self.model is not None:
                self.model.stop_training = True


def epoch_callbacks(checkpointer):
    """What every loop does at an epoch end: log the learning rate, then save the checkpoint
    (which writes `log.csv`)."""
    return [LearningRate(), EpochCheckpoint(checkpointer)]


def fit_callbacks(run, checkpointer, *, model_dir, max_steps=None, budget=None, data=None):
    """The input's epoch, NaN guard, learning rate, checkpoint (with `log.csv`), the time
    budget, TensorBoard logs in `model_dir`, max steps."""
    cbs = [NaNGuard(), *epoch_callbacks(checkpointer)]
    if hasattr(data, "epoch"):
        cbs.insert(0, InputEpoch(data))
    if budget is not None:
        cbs.append(budget)
    if run.chief and _has_tensorboard():
        cbs.append(
            keras.callbacks.TensorBoard(os.path.join(model_dir, "tensorboard"), update_freq="epoch")
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
        log.warning("tensorflow or tensorboard not installed: no TensorBoard logs.")
        return False
    return True
