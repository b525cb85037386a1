"""Everything a run writes to disk and reads back to resume (docs/training.md, "Run
directory, checkpoints and resume", lists the files and their guarantees).

`Checkpointer` is the only reader and writer of a run's resumable state and of `log.csv`:
every loop calls its `save` at the end of every epoch (`callbacks.EpochCheckpoint`), and
the trainers call its `restore` once before training. A checkpoint holds the model's
variables **and its optimizer's** (the iteration counter that drives the schedule, and
momentum): the trainers compile the model with its optimizer in every loop. One epoch's
checkpoint is one folder, `checkpoints/epoch-NNNN/` (`model.weights.h5`, `state.json`),
written into a temporary folder, flushed and renamed into place in one `os.rename`; the
newest and the one before it are kept, and a damaged newest one is skipped with a warning.
Every other file goes through the one atomic writer, `write_atomic`.
"""

import contextlib
import csv
import errno
import io
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import NamedTuple

import keras
import numpy as np

from keras_preact._optional import require
from keras_preact.train import metrics
from keras_preact.weights import file_digest

log = logging.getLogger(__name__)

FOLDER = "checkpoints"
WEIGHTS = "model.weights.h5"
STATE = "state.json"
#: `epoch-NNNN` after whole epochs; `epoch-NNNN-step-SSSSSS` after SSSSSS steps of the next
#: epoch (a run stopped by a signal).
_EPOCH = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?$")
#: The temporary names of this module's writers: `NAME.tmp-PID`, `NAME.tmp-PID.weights.h5`
#: and the checkpoint folders `.tmp-epoch-...-PID`.
_TEMP = re.compile(r"(\.tmp-\d+(\.weights\.h5)?|^\.tmp-epoch-[-\w]*\d+)$")
#: Version of `state.json`; the single-file checkpoints of earlier versions
#: (`checkpoints/latest.weights.h5` + `latest.json`) are still read.
FORMAT = 2


class WriteError(OSError):
    """A file of the run could not be written; nothing half-written was left behind."""


def _write_failed(e, path):
    """One error naming the file that could not be written and why (e.g. a full disk)."""
    code = errno.errorcode.get(e.errno, "") if isinstance(e.errno, int) else ""
    reason = os.strerror(e.errno) if code else str(e)
    hint = " Free some space and rerun the same command." if e.errno == errno.ENOSPC else ""
    return WriteError(
        e.errno,
        f"Could not write {path}: {reason} ({code or type(e).__name__}). Its temporary "
        f"file was removed and the previous file or checkpoint is unchanged.{hint}",
    )


def _fsync_folder(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _close_h5(path):
    """Closes HDF5 handles a failed write left open on `path`.

    Keras does not close its file when a write fails; h5py would flush it when the
    object is collected or at exit, fail again on a full disk, and crash the interpreter.
    Truncating the file first gives the final flush room to succeed.
    """
    h5py = require("h5py")

    target = os.path.abspath(path)
    for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        try:
            name = os.path.abspath(fid.name.decode())
        except Exception:  # noqa: BLE001 - an id already closed
            continue
        if name == target:
            with contextlib.suppress(OSError):
                os.truncate(path, 0)
            with contextlib.suppress(Exception):
                h5py.File(fid).close()  # closes its groups and datasets too


def write_atomic(path, write, mode="w"):
    """The one atomic writer: `write(file)` fills a temporary file, which is flushed to disk
    and renamed into place. On failure (a full disk, a read-only folder) the temporary file
    is removed and one `WriteError` names `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _write_failed(e, path) from None


def write_json_atomic(path, obj):
    """`obj` as JSON at `path`, atomically (`write_atomic`)."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str))


def write_text_atomic(path, text):
    """`text` at `path`, atomically (`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text))


def _save_weights(model, path, name=None, attrs=None):
    """`model.save_weights(path)` and fsync; on failure nothing is left at `path`.

    The error names `name` (default `path`): the file the temporary one stands for.
    `attrs` are stored as attributes of the file's root (Keras ignores them when loading).
    """
    try:
        model.save_weights(path, overwrite=True)
        if attrs:
            h5py = require("h5py")

            with h5py.File(path, "a") as f:
                f.attrs.update(attrs)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as e:
        _close_h5(path)
        _remove(path)
        if isinstance(e, OSError):
            raise _write_failed(e, name or path) from None
        raise


def save_weights_atomic(model, path, attrs=None):
    """`model.save_weights`, written to a temporary file and renamed into place.

    On failure (a full disk) the temporary file is removed and one `OSError` names `path`.
    `attrs`: attributes stored in the file's root.
    """
    tmp = path[: -len(".weights.h5")] + f".tmp-{os.getpid()}.weights.h5"
    _save_weights(model, tmp, path, attrs)
    try:
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _write_failed(e, path) from None


def save_model_weights_atomic(model, path, attrs=None):
    """Like `save_weights_atomic`, without the optimizer variables (the shippable file)."""
    if getattr(model, "optimizer", None) is None:
        return save_weights_atomic(model, path, attrs)
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    save_weights_atomic(clone, path, attrs)


def _csv_text(rows):
    """`log.csv` of `rows` (dicts with `epoch` first, 0-based as Keras' CSVLogger writes)."""
    keys = sorted({k for row in rows for k in row if k != "epoch"})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for row in rows:
        writer.writerow([row["epoch"], *(row.get(k, "") for k in keys)])
    return out.getvalue()


def _best_record(path):
    """The `{"monitor", "value", "epoch"}` stored in a `best.weights.h5`, or None."""
    h5py = require("h5py")

    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get("keras_preact_best")
    except OSError:
        return None
    return None if text is None else json.loads(text)


class Restored(NamedTuple):
    """The state a run resumes from (all zero / empty for a fresh run)."""

    epoch: int  # epochs completed
    steps: int  # optimizer iterations after them
    best: float  # best value of the monitored metric so far
    step: int = 0  # steps of the next epoch completed (a run stopped mid-epoch)


class Checkpointer:
    """Reads and writes a run's resumable state and `log.csv`; one per run, used by both loops.

    Args:
        model_dir: the run's folder; `restore` reads the chief's checkpoint from here.
        write_dir: where `save` writes (`model_dir` on the chief, a scratch folder on
            other workers, which must save too because reading variables may be
            collective). Default: `model_dir`.
        monitor: the log key whose improvement (higher is better) writes `best.weights.h5`.
        data: the training input if it can resume its order (an object with integer
            `seed` and `epoch` attributes, like `numpy_pipeline.ArrayDataset`): `restore`
            sets its `epoch`, so its batches continue where the run stopped.
        export: `model -> model` whose weights `best.weights.h5` holds (default: the model;
            a scanned net's written-out twin, `modeling.WrittenOut`).

    Example (resume, train, save after each epoch):

        checkpointer = Checkpointer(model_dir)
        start = checkpointer.restore(model).epoch
        for epoch in range(start, epochs):
            logs = train_one_epoch()
            checkpointer.save(model, epoch=epoch + 1, logs=logs)
        history = checkpointer.history()  # every epoch of the run, resumed or not
    """

    def __init__(self, model_dir, write_dir=None, *, monitor="val_top1", data=None, export=None):
        self.model_dir, self.write_dir = model_dir, write_dir or model_dir
        self.export = export or (lambda model: model)
        self.monitor = monitor
        self.data = data
        self.rows = []  # one dict per completed epoch: the CSV rows
        self.best = -np.inf
        self.resumed_from = 0
        self._best_unrecorded = False
        self._read_best()

    # -- paths -------------------------------------------------------------------------

    def _folder(self, root):
        return os.path.join(root, FOLDER)

    def _epoch_folders(self, root):
        """`[((epoch, step), path)]` of the complete checkpoint folders under `root`, newest
        first (`step`: steps into the next epoch, 0 for an epoch-end checkpoint)."""
        folder = self._folder(root)
        if not os.path.isdir(folder):
            return []
        found = []
        for name in os.listdir(folder):
            m = _EPOCH.match(name)
            if m and os.path.isdir(os.path.join(folder, name)):
                key = (int(m.group(1)), int(m.group(2) or 0))
                found.append((key, os.path.join(folder, name)))
        return sorted(found, reverse=True)

    @staticmethod
    def _optimizer(model):
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError(
                f"model {model.name!r} has no optimizer: compile it with its optimizer so "
                "the checkpoint holds the optimizer's iterations and momentum."
            )
        return optimizer

    def _read_best(self):
        """The best value recorded next to `best.weights.h5` by this or an earlier run.

        A rerun whose `checkpoints/` was deleted must not replace a better model there.
        """
        weights = os.path.join(self.write_dir, "best.weights.h5")
        record = os.path.join(self.write_dir, "best.json")
        if not os.path.exists(weights):
            return
        try:
            best = _best_record(weights)  # the file's own record: written with it, atomically
            if best is None:
                with open(record) as f:
                    best = json.load(f)
            if best.get("monitor", self.monitor) == self.monitor:
                self.best = max(self.best, float(best["value"]))
                return
            reason = f"it records {best.get('monitor')!r}, not {self.monitor!r}"
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = f"{record} is missing or unreadable ({type(e).__name__})"
        # Its value is unknown: keep it rather than replace it with a possibly worse model
        # (unless a restored checkpoint says which value it holds).
        self.best = np.inf
        self._best_unrecorded = True
        log.warning(
            "%s is kept and will not be replaced in this run: %s. Move or delete it to let "
            "this run write its best model there.",
            weights,
            reason,
        )

    # -- restore -----------------------------------------------------------------------

    def _remove_stale_temps(self):
        """Removes what a killed process's writers left in `write_dir` and `checkpoints/`.

        Called before this run writes anything there (one process writes a folder).
        """
        for folder in (self.write_dir, self._folder(self.write_dir)):
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                if _TEMP.search(name):
                    _remove(os.path.join(folder, name))

    def _load_folder(self, model, path):
        """Loads one epoch folder into `model`; returns its state. Raises on any defect."""
        state_path, weights = os.path.join(path, STATE), os.path.join(path, WEIGHTS)
        try:
            with open(state_path) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{state_path}: {type(e).__name__}: {e}") from None
        record = state.get("weights", {})
        if not os.path.exists(weights):
            raise ValueError(f"{weights} is missing")
        size = os.path.getsize(weights)
        if size != record.get("bytes"):
            raise ValueError(f"{weights} has {size} bytes, {state_path} says {record.get('bytes')}")
        if file_digest(weights) != record.get("sha256"):
            raise ValueError(f"{weights} does not match the SHA-256 in {state_path}")
        from keras_preact.weights import load_weights_file

        load_weights_file(model, weights)
        return state

    def _load_legacy(self, model):
        """The single-file checkpoint of earlier versions, or None if there is none."""
        folder = self._folder(self.model_dir)
        weights, state_path = (
            os.path.join(folder, n) for n in ("latest.weights.h5", "latest.json")
        )
        if not (os.path.exists(weights) and os.path.exists(state_path)):
            return None
        try:
            with open(state_path) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{state_path}: {type(e).__name__}: {e}") from None
        from keras_preact.weights import load_weights_file

        load_weights_file(model, weights)
        # Its log.csv rows up to the checkpoint are the run's history.
        rows = []
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(os.path.join(self.write_dir, "log.csv"), newline="") as f:
                for row in csv.DictReader(f):
                    if int(row["epoch"]) < int(state["epoch"]):
                        rows.append(
                            {"epoch": int(row["epoch"])}
                            | {k: float(v) for k, v in row.items() if k != "epoch" and v != ""}
                        )
        state["rows"] = rows
        return state

    def restore(self, model):
        """Loads the newest usable checkpoint into `model` and its optimizer, if any.

        A checkpoint that is truncated or corrupt is skipped with a warning naming the
        file; the one before it is used. `log.csv` is rewritten to the restored epochs (a
        row written after the restored checkpoint is dropped, a lost one restored).

        Returns:
            `Restored(epoch, steps, best)`; epoch 0 when there is no checkpoint.

        Raises:
            RuntimeError: checkpoints exist but none can be read (names each and why).
        """
        optimizer = self._optimizer(model)
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        self._remove_stale_temps()
        candidates = [(path, self._load_folder) for _, path in self._epoch_folders(self.model_dir)]
        candidates.append((os.path.join(self._folder(self.model_dir), "latest.*"), None))
        problems, state, source = [], None, None
        for path, load in candidates:
            try:
                state = load(model, path) if load else self._load_legacy(model)
            except ValueError as e:
                problems.append(str(e))
                log.warning("Skipping checkpoint %s: %s", path, e)
                state = None
                continue
            if state is not None:
                source = path
                break
        if state is None:
            if problems:
                raise RuntimeError(
                    "No usable checkpoint under "
                    f"{self._folder(self.model_dir)}: "
                    + "; ".join(problems)
                    + ". Delete that folder to start the run again from scratch."
                )
            self._set_aside_log()
            return Restored(0, 0, self.best)
        epoch, step = int(state["epoch"]), int(state.get("step_in_epoch", 0))
        steps = int(metrics.scalar(optimizer.iterations))
        if "steps" in state and state["steps"] != steps:
            log.warning(
                "%s holds optimizer step %d but its state says %d; resuming from the "
                "weights' step.",
                source,
                steps,
                state["steps"],
            )
        if self._best_unrecorded and "best" in state:
            self.best = float(state["best"])  # the value best.weights.h5 was written at
        else:
            self.best = max(self.best, float(state.get("best", -np.inf)))
        self.rows = list(state.get("rows", []))
        self.resumed_from = epoch
        self._restore_input(state.get("input"), epoch, step)
        self._write_log()
        within = f" and {step} step(s) of the next" if step else ""
        message = (
            f"Resuming from {source}: {epoch} epoch(s){within} done, optimizer step "
            f"{steps}, learning rate {metrics.learning_rate(optimizer):.6g}."
        )
        if problems:
            message += f" Skipped: {'; '.join(problems)}."
        print(message, flush=True)
        return Restored(epoch, steps, self.best, step)

    def _set_aside_log(self):
        """A fresh run keeps the `log.csv` of an earlier one (its checkpoints deleted)."""
        path = os.path.join(self.write_dir, "log.csv")
        if os.path.exists(path):
            stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
            kept = os.path.join(self.write_dir, f"log.replaced-{stamp}.csv")
            while os.path.exists(kept):
                n += 1
                kept = os.path.join(self.write_dir, f"log.replaced-{stamp}-{n}.csv")
            os.rename(path, kept)
            log.warning("No checkpoint to resume from: the earlier %s is kept as %s.", path, kept)

    def _restore_input(self, saved, epoch, step=0):
        if self.data is None:
            return
        self.data.epoch = epoch  # the batches continue where the run stopped
        self.data.offset = step
        if saved and saved.get("seed") != self.data.seed:
            log.warning(
                "The checkpoint's input order was drawn with seed %s, this run's with %s: "
                "the batches after the resume differ from an uninterrupted run's.",
                saved.get("seed"),
                self.data.seed,
            )

    # -- save --------------------------------------------------------------------------

    def history(self):
        """Every completed epoch's logs, resumed epochs included, as `{key: [values]}`.

        Keys are those of `model.fit`'s `History`, without Keras' `compile_metrics_` prefix.
        """
        out = {}
        for row in self.rows:
            for k, v in row.items():
                if k != "epoch":
                    out.setdefault(k.replace("compile_metrics_", ""), []).append(v)
        return out

    def _write_log(self):
        if self.rows or os.path.exists(os.path.join(self.write_dir, "log.csv")):
            os.makedirs(self.write_dir, exist_ok=True)
            write_text_atomic(os.path.join(self.write_dir, "log.csv"), _csv_text(self.rows))

    def _prune(self, key):
        """Before writing the checkpoint `key` (`(epoch, step)`): keeps only the newest
        complete checkpoint older than it.

        Removes leftover temporary files and folders (a killed save), checkpoints at `key`
        or later (skipped as unreadable at restore) and older ones, so a save needs room for
        two checkpoints at most.
        """
        self._remove_stale_temps()
        older = [p for k, p in self._epoch_folders(self.write_dir) if k < key]
        for k, path in self._epoch_folders(self.write_dir):
            if k >= key or path in older[1:]:
                _remove(path)

    def save(self, model, *, epoch, logs, step=0):
        """Writes the checkpoint after `epoch` completed epochs, then `log.csv` and the best.

        Args:
            model: the model that trains, compiled with its optimizer.
            epoch: the number of completed epochs.
            logs: the epoch's metrics (floats).
            step: steps of the next epoch done, for a run stopped mid-epoch: its checkpoint
                adds no row to `log.csv` and does not compete for the best.

        Raises:
            OSError: a file could not be written (a full disk): the message names it; no
                temporary file is left and the previous checkpoint is intact.
        """
        optimizer = self._optimizer(model)
        folder = self._folder(self.write_dir)
        os.makedirs(folder, exist_ok=True)
        self._prune((epoch, step))
        logs = {k: float(v) for k, v in logs.items()}
        rows = [r for r in self.rows if r["epoch"] < epoch - 1] + [{"epoch": epoch - 1, **logs}]
        if step:
            rows = [r for r in self.rows if r["epoch"] < epoch]
        value = None if step else logs.get(self.monitor)
        if value is not None and value > self.best:
            # Before the commit: a kill in between replays the epoch, which cannot beat
            # the value recorded here, so the best model is never lost.
            record = {"monitor": self.monitor, "value": value, "epoch": int(epoch)}
            save_model_weights_atomic(
                self.export(model),
                os.path.join(self.write_dir, "best.weights.h5"),
                {"keras_preact_best": json.dumps(record)},
            )
            write_json_atomic(os.path.join(self.write_dir, "best.json"), record)
            self.best = value
        name = f"epoch-{epoch:04d}" + (f"-step-{step:06d}" if step else "")
        final = os.path.join(folder, name)
        tmp = os.path.join(folder, f".tmp-{name}-{os.getpid()}")
        try:
            os.makedirs(tmp)
            weights = os.path.join(tmp, WEIGHTS)
            _save_weights(model, weights, os.path.join(final, WEIGHTS))
            state = {
                "format": FORMAT,
                "epoch": int(epoch),
                "step_in_epoch": int(step),
                "steps": int(metrics.scalar(optimizer.iterations)),
                "best": self.best,
                "monitor": self.monitor,
                "logs": logs,
                "rows": rows,
                "input": self._input_position(epoch, step),
                "weights": {
                    "file": WEIGHTS,
                    "bytes": os.path.getsize(weights),
                    "sha256": file_digest(weights),
                },
                "time": time.time(),
            }
            write_json_atomic(os.path.join(tmp, STATE), state)
            _fsync_folder(tmp)
            # The commit: the epoch's folder appears whole, or not at all.
            os.rename(tmp, final)
            _fsync_folder(folder)
        except BaseException as e:
            _remove(tmp)
            if isinstance(e, OSError):
                raise _write_failed(e, final) from None
            raise
        self.rows = rows
        self._prune_after()
        self._write_log()

    def _prune_after(self):
        """After `epoch` is committed: the checkpoint before it stays as the fallback."""
        folder = self._folder(self.write_dir)
        for _, path in self._epoch_folders(self.write_dir)[2:]:
            _remove(path)
        for name in ("latest.weights.h5", "latest.json"):  # the previous format's files
            _remove(os.path.join(folder, name))

    def _input_position(self, epoch, step=0):
        if self.data is None:
            return None
        steps = getattr(self.data, "steps_per_epoch", None)
        return {
            "seed": self.data.seed,
            "epoch": int(epoch),
            "next_batch": None if steps is None else int(epoch) * int(steps) + int(step),
        }


def write_summary(model_dir, summary):
    """Writes `summary.json` and prints it."""
    write_json_atomic(os.path.join(model_dir, "summary.json"), summary)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str), flush=True)


def write_config(cfg, run, resumes=()):
    """`config.json` (chief only): every option and its origin, the run's set-up, versions,
    and `resumes`: each resume's changed options (`resume.history`)."""
    if not run.chief:
        return
    record = {
        **cfg.record(),
        "resumes": list(resumes),
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
