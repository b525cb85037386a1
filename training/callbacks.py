"""Callbacks of the `model.fit` loop; `NaNGuard` is also called by the custom loop."""

import math
import os

import keras
from absl import logging

from training import metrics


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


def fit_callbacks(run, checkpointer, *, model_dir, max_steps=None):
    """NaN guard, learning rate, checkpoint (with `log.csv`), TensorBoard logs in `model_dir`."""
    cbs = [NaNGuard(), LearningRate(), EpochCheckpoint(checkpointer)]
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
        logging.warning("tensorflow or tensorboard not installed: no TensorBoard logs.")
        return False
    return True
