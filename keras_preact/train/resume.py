"""A resume that keeps the run's meaning: a resumed run's options against its `config.json`.

`check(cfg, run, model_dir)` compares them before anything is written. Options fall into
three classes:

- the architecture and the data set (`ARCHITECTURE`): the checkpoint cannot load into
  another net, so a change is always refused (use a new `--model_dir`);
- harmless ones (`HARMLESS`: more epochs, verbosity, evaluation size, loop, paths): allowed,
  and recorded in `config.json`'s `"resumes"`;
- every other option, the precision policy and every derived value (batch size, schedule,
  optimizer, augmentation, seed, the steps per epoch and the normalization computed from
  the data, ...) changes what the run means: refused unless named in `--allow_changes` (or
  `--allow_changes=all`). A derived value that follows from an accepted change is accepted
  with it (`DERIVED_FROM`: more `--epochs` stretch a cosine schedule's `total_steps`).

The entry of `"resumes"` is written once the checkpoint has loaded (`history`), so a resume
that is refused or fails leaves `config.json` as it was.
"""

import datetime
import json
import sys

from keras_preact.train import fs
from keras_preact.train.checkpoints import FOLDER, ResumeRefused

__all__ = ["ResumeRefused", "check", "history"]

#: Options whose change makes the checkpoint unloadable, or the task another.
ARCHITECTURE = ("model", "unit", "shortcut", "layout", "width_multiplier", "scan_units",
                "dataset", "num_classes", "image_size")  # fmt: skip
#: Options a resumed run may change freely (each change is recorded).
HARMLESS = ("epochs", "verbose", "eval_batch_size", "eval_examples", "num_test",
            "num_eval_examples", "eval_split", "eval_resize", "eval_size", "time_budget",
            "max_steps", "model_dir", "data_dir", "source", "loop", "pipeline", "strategy",
            "tpu", "coordinator_address", "num_processes", "process_id", "jit_compile",
            "compilation_cache", "fused_decode", "preset",
            "weights",  # start weights: the checkpoint's replace them on resume
            "allow_changes", "restart_optimizer", "decayed_weights")  # fmt: skip
#: The options a derived value is computed from: it may change with any of them.
DERIVED_FROM = {
    "total_steps": ("epochs", "steps_per_epoch", "batch_size", "num_train_examples"),
    "eval_resize": ("eval_size",),
    "steps_per_epoch": ("batch_size", "num_train_examples"),
    "base_lr": ("batch_size",),
    "mean": ("weights",),
    "std": ("weights",),
}


def _json(value):
    return json.loads(json.dumps(value, default=str))


def _has_checkpoint(model_dir):
    folder = fs.join(model_dir, FOLDER)
    return fs.isdir(folder) and any(n.startswith(("epoch-", "latest.")) for n in fs.listdir(folder))


def changes(recorded, record):
    """`{option: (recorded value, new value)}` of the options that differ."""
    names = sorted((set(recorded) | set(record)) - {"origins", "trainer"})
    return {
        n: (recorded.get(n), _json(record.get(n)))
        for n in names
        if _json(recorded.get(n)) != _json(record.get(n))
    }


def _listed(found):
    return ", ".join(f"--{n}: {a!r} -> {b!r}" for n, (a, b) in found.items())


def check(cfg, run, model_dir):
    """The changes of a resumed run, checked against its `config.json` (nothing is written).

    Returns:
        `{option: (old, new)}`, the accepted changes ({} for a fresh run).

    Raises:
        ResumeRefused: an architecture option changed, or another meaningful option not
            named in `--allow_changes`; the message lists each and suggests what to do.
    """
    path = fs.join(model_dir, "config.json")
    if not (_has_checkpoint(model_dir) and fs.exists(path)):
        return {}
    try:
        recorded = fs.read_json(path)
    except (OSError, ValueError) as e:
        raise ResumeRefused(
            f"{path} cannot be read ({e}): the run's options are unknown, so its checkpoint "
            "is not resumed. Give this run another --model_dir."
        ) from None
    record = {**cfg.record(), "precision_policy": run.policy}
    # An option the record lacks, at its default or derived now, was added after the run was
    # written (a run of then had its default: 3 channels, ImageNet as the data set).
    found = {
        n: v for n, v in changes(recorded, record).items()
        if n in record and not (n not in recorded and cfg.origins.get(n) in ("default", "derived"))
    }  # fmt: skip
    allowed = set(cfg.allow_changes or ())
    fixed = {n: v for n, v in found.items() if n in ARCHITECTURE}
    free = {n for n in found if n in HARMLESS or {"all", n} & allowed}
    free |= {n for n in found if set(DERIVED_FROM.get(n, ())) & free}
    meaning = {n: v for n, v in found.items() if n not in fixed and n not in free}
    if fixed:
        raise ResumeRefused(
            f"{model_dir} holds a run of another net or data set ({_listed(fixed)}; "
            f"recorded in {path}): its checkpoint cannot be resumed. Start this run in a "
            "new --model_dir; the run there is unchanged."
        )
    if meaning:
        names = ",".join(meaning)
        raise ResumeRefused(
            f"Resuming {model_dir} with other values of options that change what the run "
            f"means ({_listed(meaning)}; recorded in {path}). Rerun with the recorded "
            f"values, start a new --model_dir, or resume anyway with --allow_changes={names}."
        )
    return found


def history(model_dir, found, restored):
    """`config.json`'s `"resumes"` list, with this resume's changes appended when it resumed
    a checkpoint (`restored.state`)."""
    path = fs.join(model_dir, "config.json")
    if not restored.state:
        return []  # a fresh run: an earlier run's history (its checkpoints gone) is not its
    try:
        previous = list(fs.read_json(path).get("resumes", []))
    except (OSError, ValueError, AttributeError):
        previous = []
    entry = {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "at": {"epoch": restored.epoch, "step": restored.step, "iterations": restored.iterations},
        "changed": {n: {"from": a, "to": b} for n, (a, b) in found.items()},
    }
    return [*previous, entry]
