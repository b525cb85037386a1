"""What a run writes beside its checkpoints: `log.csv`, the best model, `config.json` and
`summary.json` (docs/training.md, "Run directory, checkpoints and resume").

`RunLog` holds the run's history, one row per completed epoch (epochs numbered from 0, as
Keras' `CSVLogger` writes them), resumed epochs included: each checkpoint stores the rows up
to it, so `log.csv` is rewritten from the checkpoint a run resumes from and a kill can
neither lose nor repeat a row. `best.weights.h5` holds the model of the best `val_top1`;
its value is stored in the file itself. Every path goes through `fs`.
"""

import csv
import io
import json
import logging
import sys
import time

import keras

from keras_preact._optional import require
from keras_preact.train import checkpoints, fs

log = logging.getLogger(__name__)

BEST, LOG = "best.weights.h5", "log.csv"


def _csv_text(rows):
    keys = sorted({k for row in rows for k in row if k != "epoch"})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for row in rows:
        writer.writerow([row["epoch"], *(row.get(k, "") for k in keys)])
    return out.getvalue()


def _best_record(path):
    """The `{"monitor", "value", "epoch"}` stored in a `best.weights.h5`, or None."""
    with fs.local_copy(path) as local, require("h5py").File(local, "r") as f:
        text = f.attrs.get("keras_preact_best")
    return None if text is None else json.loads(text)


class RunLog:
    """`log.csv`, the history and the best model of one run.

    Args:
        folder: where the files go (`model_dir` on the chief, a worker's scratch folder).
        monitor: the log key whose improvement (higher is better) writes `best.weights.h5`.
        export: `model -> model` whose weights `best.weights.h5` holds (default: the model;
            a scanned net's written-out twin, `modeling.WrittenOut`).
        writes: False on a process that keeps the log without writing it (JAX's processes
            other than the first).
    """

    def __init__(self, folder, *, monitor="val_top1", export=None, writes=True):
        self.folder, self.monitor, self.writes = folder, monitor, writes
        self.export = export or (lambda model: model)
        self.rows, self.best = [], -float("inf")
        self._unrecorded = False
        for name in fs.listdir(folder) if writes and fs.isdir(folder) else []:
            if fs.TEMP.search(name):  # a killed process's (one trainer writes a folder)
                fs.remove(fs.join(folder, name))
        self._read_best()

    def _read_best(self):
        """The value of an existing `best.weights.h5`: a rerun whose `checkpoints/` was
        deleted must not replace a better model there."""
        path = fs.join(self.folder, BEST)
        if not fs.exists(path):
            return
        try:
            best = _best_record(path)
            if best is not None and best.get("monitor") == self.monitor:
                self.best = float(best["value"])
                return
            reason = f"it records {best and best.get('monitor')!r}, not {self.monitor!r}"
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = f"its record is unreadable ({type(e).__name__})"
        # Its value is unknown: keep it rather than replace it with a possibly worse model
        # (unless a restored checkpoint says which value it holds).
        self.best, self._unrecorded = float("inf"), True
        log.warning(
            "%s is kept and will not be replaced in this run: %s. Move or delete it to let "
            "this run write its best model there.",
            path,
            reason,
        )

    def restore(self, state):
        """Takes the rows and best value of a restored checkpoint's `state` (a fresh run:
        an earlier `log.csv` is kept aside) and rewrites `log.csv` to them."""
        if not state:
            path = fs.join(self.folder, LOG)
            if self.writes and fs.exists(path):
                kept = fs.join(self.folder, f"log.replaced-{time.strftime('%Y%m%d-%H%M%S')}.csv")
                fs.rename(path, kept)
                log.warning("No checkpoint to resume from: the earlier %s is kept as %s.", path,
                            kept)  # fmt: skip
            return
        best = float(state.get("best", -float("inf")))
        self.best = best if self._unrecorded else max(self.best, best)
        self.commit(list(state.get("rows", [])))

    def rows_after(self, epoch, logs=None):
        """The rows of a checkpoint at `epoch` whole epochs: with the row of `logs` (the epoch
        that just ended), or without it (a checkpoint inside epoch `epoch`)."""
        rows = [r for r in self.rows if r["epoch"] < epoch - (logs is not None)]
        if logs is not None:
            rows.append({"epoch": epoch - 1, **{k: float(v) for k, v in logs.items()}})
        return rows

    def consider_best(self, model, epoch, logs):
        """Writes `best.weights.h5` if `logs` improve on the best; before the checkpoint's
        commit, so a kill in between replays an epoch that cannot beat it."""
        value = logs.get(self.monitor)
        if value is None or value <= self.best:
            return
        record = {"monitor": self.monitor, "value": float(value), "epoch": int(epoch)}
        self.best = float(value)
        if not self.writes:
            return
        fs.makedirs(self.folder)
        checkpoints.save_model_weights(
            self.export(model),
            fs.join(self.folder, BEST),
            {"keras_preact_best": json.dumps(record)},
        )

    def commit(self, rows):
        """The rows of the committed checkpoint: `log.csv` is rewritten to them."""
        self.rows = rows
        if self.writes and (rows or fs.exists(fs.join(self.folder, LOG))):
            fs.makedirs(self.folder)
            fs.write_text_atomic(fs.join(self.folder, LOG), _csv_text(rows))

    def history(self):
        """Every completed epoch's logs, resumed epochs included, as `{key: [values]}`."""
        out = {}
        for row in self.rows:
            for k, v in row.items():
                if k != "epoch":
                    out.setdefault(k, []).append(v)
        return out


def write_summary(model_dir, summary):
    """Writes `summary.json` and prints it."""
    fs.write_json_atomic(fs.join(model_dir, "summary.json"), summary)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str), flush=True)


def write_config(cfg, run, resumes=()):
    """`config.json` (chief only): every option and its origin, the run's set-up, versions,
    and `resumes`: each resume's changed options (`resume.history`)."""
    if not run.chief:
        return
    record = {
        **cfg.record(), "resumes": list(resumes), "replicas": run.replicas,
        "processes": run.processes, "precision_policy": run.policy, "loop": run.loop,
        "batchnorm_statistics": "global batch", "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__, "argv": sys.argv,
    }  # fmt: skip
    if cfg.loop == "auto":
        record["origins"]["loop"] = "derived"
    fs.makedirs(cfg.model_dir)
    fs.write_json_atomic(fs.join(cfg.model_dir, "config.json"), record)
