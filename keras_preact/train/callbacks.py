"""Callbacks of the `model.fit` loop, and the checks and stops every loop shares."""

import logging
import math
import os
import signal
import sys
import threading
import time

import keras
import numpy as np

from keras_preact.train import metrics

log = logging.getLogger(__name__)


class Diverged(FloatingPointError):
    """Training produced non-finite values; nothing of them was saved."""


_ADVICE = (
    "Resume from the last checkpoint with a lower learning rate (--base_lr=... "
    "--allow_changes=base_lr) or more --warmup_steps, or check the input data."
)


class NaNGuard(keras.callbacks.Callback):
    """Stops training with an error the moment the loss stops being finite."""

    epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise Diverged(
                f"The loss became {loss} at batch {batch + 1} of epoch {self.epoch + 1}; "
                f"stopped before saving anything of it. {_ADVICE}"
            )


def check_finite(model, logs, epoch):
    """Raises `Diverged` if a value of `logs` or a weight of `model` is not finite.

    Args:
        model: the model whose weights are checked.
        logs: the epoch's metrics.
        epoch: the epoch (1-based) the message names.
    """
    bad = [
        f"{k}={v}"
        for k, v in (logs or {}).items()
        if isinstance(v, (int, float, np.number)) and not math.isfinite(float(v))
    ]
    weights = [
        w.path for w in model.weights if not np.isfinite(keras.ops.convert_to_numpy(w)).all()
    ]
    if bad or weights:
        found = ", ".join(bad)
        if weights:
            found += (", and " if bad else "") + (
                f"{len(weights)} of {len(model.weights)} weight tensors (first: {weights[0]})"
            )
        raise Diverged(
            f"Training diverged in epoch {epoch}: {found} not finite. Stopped without "
            f"saving this epoch: the checkpoints of the epochs before are kept. {_ADVICE}"
        )


class FiniteCheck(keras.callbacks.Callback):
    """At each epoch end, before the checkpoint: `check_finite` of the logs and weights (a
    run can diverge with every batch loss finite: weights overflow, `val_loss` is NaN)."""

    def on_epoch_end(self, epoch, logs=None):
        check_finite(self.model, logs, epoch + 1)


class Interrupted(Exception):
    """A signal stopped training; `saved` tells whether its state was checkpointed."""

    def __init__(self, signum, *, saved, where=""):
        self.signum, self.saved = signum, saved
        name = signal.Signals(signum).name
        state = f"saved a checkpoint {where}" if saved else "nothing new was saved"
        super().__init__(f"Stopped by {name}: {state}.")


class StopRequest:
    """SIGTERM and SIGINT (Ctrl-C) while training: noted, then acted on by the loop at the
    next step boundary (`signum` is set). A second Ctrl-C stops at once.

    Use as a context manager around the training loop; outside it the handlers before it
    apply. In threads other than the main one it installs nothing.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, "
            "then stopping (Ctrl-C again stops at once, without saving).",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class SaveOnSignal(keras.callbacks.Callback):
    """`model.fit`'s part of a `StopRequest`: at the batch end after a signal, saves a
    mid-epoch checkpoint and raises `Interrupted`; a signal in an epoch's last step is
    handled after that epoch's own checkpoint (list this callback after it).

    Args:
        request: the `StopRequest`.
        checkpointer: the run's `checkpoints.Checkpointer`.
        steps_per_epoch: steps of a whole epoch.
        offset: steps of the first epoch already done (a run resumed mid-epoch).
    """

    def __init__(self, request, checkpointer, *, steps_per_epoch, offset=0):
        super().__init__()
        self.request, self.checkpointer = request, checkpointer
        self.steps_per_epoch, self.offset = steps_per_epoch, offset
        self.first = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.first = epoch if self.first is None else self.first

    def on_train_batch_end(self, batch, logs=None):
        step = batch + 1 + (self.offset if self.epoch == self.first else 0)
        if self.request.signum is not None and step < self.steps_per_epoch:
            self.checkpointer.save(self.model, epoch=self.epoch, logs={}, step=step)
            raise Interrupted(
                self.request.signum, saved=True, where=f"at step {step} of epoch {self.epoch + 1}"
            )

    def on_epoch_end(self, epoch, logs=None):
        if self.request.signum is not None:
            raise Interrupted(self.request.signum, saved=True, where=f"after epoch {epoch + 1}")


class MaxSteps(keras.callbacks.Callback):
    """Stops `fit` once the optimizer has made `max_steps` steps in total."""

    def __init__(self, max_steps):
        super().__init__()
        self.max_steps = max_steps

    def on_train_batch_end(self, batch, logs=None):
        if metrics.scalar(self.model.optimizer.iterations) >= self.max_steps:
            self.model.stop_training = True


class EpochLogs(keras.callbacks.Callback):
    """Adds `lr`, the learning rate at the end of the epoch, and `epoch_time_s`, the epoch's
    training time (up to its validation, as the JAX and custom loops time it; a loop that
    timed the epoch itself keeps its value), to the epoch's logs.

    Listed before the checkpoint and TensorBoard so `log.csv` and TensorBoard see them: every
    loop's `log.csv` has the same columns.
    """

    def __init__(self):
        super().__init__()
        self.began = self.trained = None

    def on_epoch_begin(self, epoch, logs=None):
        self.began, self.trained = time.time(), None

    def on_test_begin(self, logs=None):  # fit's validation: the epoch's training has ended
        if self.began is not None and self.trained is None:
            self.trained = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = metrics.learning_rate(self.model.optimizer)
            if self.began is not None:
                logs.setdefault("epoch_time_s", (self.trained or time.time()) - self.began)


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
    are those of the stream's epoch `e` (`numpy_pipeline.ArrayDataset`), in every loop.

    The input's `offset` (steps of its epoch already done, set by a mid-epoch resume) holds
    for that epoch only.
    """

    def __init__(self, data):
        super().__init__()
        self.data = data
        self.resumed = (data.epoch, getattr(data, "offset", 0))

    def on_epoch_begin(self, epoch, logs=None):
        self.data.epoch = epoch
        self.data.offset = self.resumed[1] if epoch == self.resumed[0] else 0


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
    """What every loop does at an epoch end: log the learning rate and the epoch's time, check
    that the logs and weights are finite, then save the checkpoint (which writes `log.csv`)."""
    return [EpochLogs(), FiniteCheck(), EpochCheckpoint(checkpointer)]


def fit_callbacks(
    run, checkpointer, *, model_dir, max_steps=None, budget=None, data=None, stop=None
):
    """The input's epoch, NaN guard, learning rate, checks, checkpoint (with `log.csv`), the
    signal stop (`stop`: a `SaveOnSignal`), the time budget, TensorBoard logs in
    `model_dir`, max steps."""
    cbs = [NaNGuard(), *epoch_callbacks(checkpointer)]
    if hasattr(data, "epoch"):
        cbs.insert(0, InputEpoch(data))
    if stop is not None:
        cbs.append(stop)
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
