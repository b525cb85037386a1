"""The one epoch controller: the outer loop of every run, over any engine.

`Controller.run` owns what a run does between steps: the epochs and the position inside
one, the checkpoints (at every epoch end, and at a stop inside an epoch), `--max_steps`,
`--time_budget`, signals, the finite checks, the progress bar and the epoch logs, and the
evaluation at each epoch end. The engine is a runner (`runners.FitRunner`,
`custom_loop.TFRunner`, `jax_loop.JaxRunner`) that only trains a given number of steps of a
given input and evaluates, as in Orbit's `Controller` over a `StandardTrainer`.

Positions: `epoch` is the number of whole epochs done (0-based; shown 1-based), `step` the
steps of that epoch done. A checkpoint at `(epoch, step)` resumes there: the input, the
learning rate (a function of the optimizer's step) and the epoch's running sums continue.
"""

import math
import shlex
import signal
import sys
import threading
import time

import keras
import numpy as np

from keras_preact.train import fs, metrics

#: The epoch's running sums (`loss` over steps; `top1`, `top5` over `examples`).
SUMS = ("loss", "top1", "top5", "examples", "steps", "time_s")
#: Why a run stops, as the processes of a run agree on it (the largest wins).
MAX_STEPS, BUDGET, SIGNAL = -1, 1, 2


def resume_command():
    """This process's command line, to resume the run with."""
    return " ".join(map(shlex.quote, getattr(sys, "orig_argv", sys.argv)))


class Diverged(FloatingPointError):
    """Training produced non-finite values; nothing of them was saved."""


_ADVICE = (
    "Resume from the last checkpoint with a lower learning rate (--base_lr=... "
    "--allow_changes=base_lr) or more --warmup_steps, or check the input data."
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


class Interrupted(Exception):
    """A signal stopped training; `saved` tells whether its state was checkpointed."""

    def __init__(self, signum, *, saved, where="", by=""):
        self.signum, self.saved = signum, saved
        name = signal.Signals(signum).name
        state = f"saved a checkpoint {where}" if saved else "nothing new was saved"
        super().__init__(f"Stopped by {name}{by}: {state}.")


class StopRequest:
    """SIGTERM and SIGINT (Ctrl-C) while training: noted (`signum`), then acted on by the
    controller at the next step boundary. A second Ctrl-C stops at once.

    A context manager around the training loop; outside it the handlers before it apply.
    In threads other than the main one it installs nothing.
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


class TimeBudget:
    """`--time_budget`: the run stops at the step after which one more step, and the work
    that must follow it before a stop (a checkpoint; at an epoch's last step also the
    evaluation), would end past `start + seconds`, with a 10 % margin.
    """

    def __init__(self, seconds, *, start=None):
        self.seconds = float(seconds)
        self.start = time.time() if start is None else start
        self.costs = {"step": 0.0, "save": 0.0, "evaluate": 0.0}
        self.stopped = False

    def note(self, kind, seconds):
        # A step's cost is the latest mean (the first includes compiling); the others the
        # longest seen.
        self.costs[kind] = seconds if kind == "step" else max(self.costs[kind], seconds)

    def exhausted(self, *, last_step):
        """Whether one more step (the epoch's last if `last_step`) would overrun."""
        need = self.costs["step"] + self.costs["save"]
        if last_step:
            need += self.costs["evaluate"]
        self.stopped = time.time() - self.start + 1.1 * need > self.seconds
        return self.stopped


def add_sums(a, b):
    """The sums of two stretches of one epoch (`SUMS` keys; missing ones are 0)."""
    return {k: float(a.get(k, 0)) + float(b.get(k, 0)) for k in SUMS}


def means(sums):
    """An epoch's logs from its sums: the mean loss per step, top-1 and top-5 per example."""
    examples, steps = max(sums.get("examples", 0), 1), max(sums.get("steps", 0), 1)
    return {"loss": sums["loss"] / steps, "top1": sums["top1"] / examples,
            "top5": sums["top5"] / examples}  # fmt: skip


def _tensorboard(folder):
    """`(epoch, logs) -> None` writing TensorBoard scalars under `folder`, or None without
    TensorFlow and TensorBoard."""
    try:
        import tensorboard  # noqa: F401
        import tensorflow as tf
    except ImportError:
        return None
    writer = tf.summary.create_file_writer(folder)

    def write(epoch, logs):
        with writer.as_default(step=epoch):
            for key, value in logs.items():
                tf.summary.scalar(key, value)
        writer.flush()

    return write


class Controller:
    """Runs a run's epochs over a runner; one per process.

    Args:
        cfg: the run's derived config (`epochs`, `steps_per_epoch`, `max_steps`, `verbose`).
        runner: the engine (`runners.Runner`: `train`, `evaluate`, `sync`, `gather`,
            `agree`, `model`).
        data: the run's data (`trainer.Data`: the input from a position, the evaluation
            input, where a stopped stream stands).
        store: the run's `checkpoints.Store`.
        log: the run's `runlog.RunLog` (`log.csv`, the best model, the history).
        chief: whether this process prints and writes TensorBoard logs.
        budget: a `TimeBudget`, or None.
    """

    def __init__(self, cfg, runner, data, *, store, log, chief=True, budget=None):
        self.cfg, self.runner, self.data = cfg, runner, data
        self.store, self.log, self.chief, self.budget = store, log, chief, budget
        self.signals, self.trained = None, 0  # steps this process trained
        self.tensorboard = _tensorboard(fs.join(log.folder, "tensorboard")) if chief else None

    def run(self, start):
        """Trains from `start` (a `checkpoints.Restored`) to `cfg.epochs`.

        Returns:
            Why it ended: `"done"`, `"max_steps"` or `"budget"` (at a step boundary, with a
            checkpoint there; a process trains at least one step, so every resume makes
            progress). A signal raises `Interrupted` after its checkpoint.
        """
        cfg = self.cfg
        epoch, step, iterations = start.epoch, start.step, start.iterations
        sums = add_sums(start.state.get("partial") or {}, {})
        with StopRequest() as self.signals:
            while epoch < cfg.epochs:
                # A resume whose --steps_per_epoch shrank below its step goes to the epoch end.
                if step < cfg.steps_per_epoch:
                    todo = cfg.steps_per_epoch - step
                    if cfg.max_steps:
                        todo = min(todo, cfg.max_steps - iterations)
                    if todo <= 0:
                        return "max_steps"
                    # At an epoch start, after its checkpoint: nothing more to save.
                    wish = self.runner.agree(self._wish(last_step=todo == 1)) if self.trained else 0
                    if wish:
                        return self._stopped(wish, epoch, step)
                    trained = self._train(epoch, step, todo, sums)
                    self.trained += trained.steps
                    step, iterations = step + trained.steps, iterations + trained.steps
                    sums = add_sums(sums, trained.sums)
                    if step < cfg.steps_per_epoch:
                        self.save(epoch, step, iterations, partial=sums, batches=trained.steps)
                        return self._stopped(trained.stop or MAX_STEPS, epoch, step)
                self._end_epoch(epoch, iterations, sums)
                epoch, step, sums = epoch + 1, 0, add_sums({}, {})
        return "done"

    def _wish(self, *, last_step):
        """The stop this process wants: `SIGNAL`, `BUDGET` or 0 (the runner agrees it with
        the other processes: the largest wins)."""
        if self.signals.signum is not None:
            return SIGNAL
        exhausted = self.budget is not None and self.budget.exhausted(last_step=last_step)
        return BUDGET if exhausted else 0

    def _train(self, epoch, step, steps, sums):
        """Trains `steps` steps from `(epoch, step)`; returns the runner's `Trained`."""
        cfg, chief = self.cfg, self.chief
        if cfg.verbose and chief:
            within = f" (resumed at step {step})" if step else ""
            print(f"Epoch {epoch + 1}/{cfg.epochs}{within}", flush=True)
        bar = keras.utils.Progbar(
            cfg.steps_per_epoch, verbose=int(cfg.verbose == 1 and chief),
            stateful_metrics=["loss", "top1", "top5"],
        )  # fmt: skip
        begun = time.time()

        def stop(done):
            if self.budget is not None:
                self.budget.note("step", (time.time() - begun) / done)
            return self._wish(last_step=step + done + 1 == cfg.steps_per_epoch)

        def progress(done, running):
            logs = means(add_sums(sums, running))
            if not math.isfinite(logs["loss"]):
                raise Diverged(
                    f"The loss became {logs['loss']} by step {step + done} of epoch "
                    f"{epoch + 1}; stopped before saving anything of it. {_ADVICE}"
                )
            bar.update(step + done, list(logs.items()))

        inputs, every = self.data.train(epoch, step, steps), 10 if cfg.verbose == 1 else steps
        trained = self.runner.train(inputs, steps, stop=stop, progress=progress, every=every)
        trained.sums["time_s"] = time.time() - begun
        return trained

    def _end_epoch(self, epoch, iterations, sums):
        """The epoch end: logs, evaluation, finite checks, the checkpoint, TensorBoard."""
        self.runner.sync()
        logs = {**means(sums), "epoch_time_s": sums["time_s"]}
        logs["lr"] = metrics.learning_rate(self.runner.model.optimizer)
        begun = time.time()
        val = self.runner.evaluate(self.data.evaluate())
        if self.budget is not None:
            self.budget.note("evaluate", time.time() - begun)
        logs.update({f"val_{k}": v for k, v in val.items() if k != "examples"})
        if self.cfg.verbose and self.chief:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), flush=True)
            for line in self.data.notes():
                print(line, flush=True)
        check_finite(self.runner.model, logs, epoch + 1)
        self.save(epoch + 1, 0, iterations, logs=logs)
        if self.tensorboard is not None:
            self.tensorboard(epoch, logs)

    def save(self, epoch, step, iterations, *, logs=None, partial=None, batches=0):
        """The checkpoint at `(epoch, step)`: after a whole epoch with its `logs`, or inside
        one with its running sums `partial` and the input's position after `batches`."""
        self.runner.sync()
        if partial is not None:
            check_finite(self.runner.model, means(partial), epoch + 1)
        begun = time.time()
        rows = self.log.rows_after(epoch, logs)
        position = self.data.position(epoch, step, batches) if step else None
        if position is not None:
            position = self.runner.gather(position)
        if logs is not None:
            self.log.consider_best(self.runner.model, epoch, logs)
        state = {"iterations": iterations, "rows": rows, "best": self.log.best,
                 "partial": partial, "input": position}  # fmt: skip
        self.store.save(self.runner.model, epoch=epoch, step=step, state=state)
        self.log.commit(rows)
        if self.budget is not None:
            self.budget.note("save", time.time() - begun)

    def _stopped(self, reason, epoch, step):
        """The end of a run stopped at `(epoch, step)` (its checkpoint saved): a signal, here
        or in another process, raises `Interrupted`; the other reasons are returned."""
        where = f"at step {step} of epoch {epoch + 1}" if step else f"after epoch {epoch}"
        if reason == SIGNAL:
            signum = self.signals.signum
            by = "" if signum else " of another process of the run"
            raise Interrupted(signum or signal.SIGTERM, saved=True, where=where, by=by)
        if reason == BUDGET and self.chief:
            print(
                f"Stopped by --time_budget={self.budget.seconds:g} s {where} "
                f"({time.time() - self.budget.start:.0f} s); checkpoint saved in "
                f"{self.cfg.model_dir}. Resume with the same command: {resume_command()}",
                flush=True,
            )
        return {BUDGET: "budget", MAX_STEPS: "max_steps"}[reason]
