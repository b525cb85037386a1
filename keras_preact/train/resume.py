"""A run folder's guards: one trainer at a time, and a resume that keeps the run's meaning.

`lock(folder)` is taken before a trainer writes anything: a second trainer on the same
`--model_dir` is refused at once, naming the first. The kernel drops the lock when its
holder dies, so a killed run's leftover `.lock` file is simply taken over.

`check(cfg, model_dir)` compares a resumed run's options with its `config.json` before
anything is rewritten. Options fall into three classes:

- the architecture and the data set (`ARCHITECTURE`): the checkpoint cannot load into
  another net, so a change is always refused (use a new `--model_dir`);
- harmless ones (`HARMLESS`: more epochs, verbosity, evaluation size, loop, paths): allowed,
  and recorded in `config.json`'s `"resumes"` (with a cosine schedule, more epochs stretch
  the rest of the decay: the derived `total_steps` is recorded as changed too);
- every other option (batch size, schedule, optimizer, augmentation, seed, ...) changes
  what the run means: refused unless named in `--allow_changes` (or `--allow_changes=all`).
"""

import atexit
import contextlib
import datetime
import json
import os
import shlex
import socket
import sys

from keras_preact.train import checkpoints

#: Options whose change makes the checkpoint unloadable, or the task another.
ARCHITECTURE = (
    "model",
    "unit",
    "shortcut",
    "layout",
    "width_multiplier",
    "scan_units",
    "dataset",
    "num_classes",
    "image_size",
)
#: Options a resumed run may change freely (each change is recorded).
HARMLESS = (
    "epochs",
    "verbose",
    "eval_batch_size",
    "eval_examples",
    "num_test",
    "num_eval_examples",
    "eval_split",
    "eval_resize",
    "eval_size",
    "time_budget",
    "max_steps",
    "model_dir",
    "data_dir",
    "source",
    "loop",
    "pipeline",
    "strategy",
    "tpu",
    "jit_compile",
    "compilation_cache",
    "fused_decode",
    "preset",
    "weights",  # start weights: the checkpoint's weights replace them on resume
    "allow_changes",
    "decayed_weights",
)


class RunLocked(RuntimeError):
    """Another trainer holds the run folder."""


class ResumeRefused(ValueError):
    """A resumed run's options differ from its `config.json` in what the run means."""


def lock(folder):
    """Takes the exclusive lock of `folder` (created if needed) for this process's life.

    Returns the open lock file (keep a reference: closing it releases the lock).

    Raises:
        RunLocked: another live process holds it; the message names that process.
        checkpoints.WriteError: the folder cannot be written (read-only, no permission).
    """
    path = os.path.join(folder, ".lock")
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 - held for the process's lifetime
    except OSError as e:
        raise checkpoints.WriteError(
            e.errno,
            f"Cannot write in --model_dir={folder}: {e.strerror or e}. Give the run a "
            "folder it can write to.",
        ) from None
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its name yet"
        handle.close()
        raise RunLocked(
            f"{folder} is in use by another trainer: {holder}. Wait for it to end or stop "
            "it, or give this run another --model_dir."
        ) from None
    handle.seek(0)
    stale = handle.read().strip()
    if stale:
        print(f"Taking over the lock of {path} left by an ended process: {stale}", flush=True)
    handle.seek(0)
    handle.truncate()
    command = " ".join(map(shlex.quote, getattr(sys, "orig_argv", sys.argv)))
    handle.write(
        f"pid {os.getpid()} on {socket.gethostname()}, since "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}: {command}\n"
    )
    handle.flush()
    atexit.register(_release, handle)
    return handle


def _release(handle):
    """At a normal exit: empties the lock file, so the next trainer sees no ended holder."""
    with contextlib.suppress(OSError, ValueError):
        handle.seek(0)
        handle.truncate()
        handle.close()


def _json(value):
    return json.loads(json.dumps(value, default=str))


def _has_checkpoint(model_dir):
    folder = os.path.join(model_dir, "checkpoints")
    with contextlib.suppress(OSError):
        return any(n.startswith("epoch-") or n.startswith("latest.") for n in os.listdir(folder))
    return False


def changes(recorded, record):
    """`{option: (recorded value, new value)}` of the options that differ."""
    skip = {"origins", "trainer"}
    names = sorted((set(recorded) | set(record)) - skip)
    return {
        n: (recorded.get(n), _json(record.get(n)))
        for n in names
        if _json(recorded.get(n)) != _json(record.get(n))
    }


def _listed(found):
    return ", ".join(f"--{n}: {a!r} -> {b!r}" for n, (a, b) in found.items())


def check(cfg, model_dir):
    """The changes of a resumed run, checked against its `config.json` (nothing is written).

    Returns:
        `{option: (old, new)}`, the allowed changes ({} for a fresh run).

    Raises:
        ResumeRefused: an architecture option changed, or another meaningful option not
            named in `--allow_changes`; the message lists each and suggests what to do.
    """
    path = os.path.join(model_dir, "config.json")
    if not (_has_checkpoint(model_dir) and os.path.exists(path)):
        return {}
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise ResumeRefused(
            f"{path} cannot be read ({e}): the run's options are unknown, so its checkpoint "
            "is not resumed. Give this run another --model_dir."
        ) from None
    record = cfg.record()
    found = {n: v for n, v in changes(recorded, record).items() if n in cfg.values}
    allowed = set(cfg.allow_changes or ())
    harmless = set(HARMLESS)
    fixed = {n: v for n, v in found.items() if n in ARCHITECTURE}
    meaning = {
        n: v
        for n, v in found.items()
        if n not in fixed
        and n not in harmless
        and cfg.origins.get(n) != "derived"  # follows from another option, reported there
        and not ({"all", n} & allowed)
    }
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


def history(model_dir, found):
    """`config.json`'s `"resumes"` list with this resume's changes appended."""
    path = os.path.join(model_dir, "config.json")
    previous = []
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(path) as f:
            previous = list(json.load(f).get("resumes", []))
    if not _has_checkpoint(model_dir):
        return []  # a fresh run: an earlier run's history (its checkpoints gone) is not its
    entry = {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "changed": {n: {"from": a, "to": b} for n, (a, b) in found.items()},
    }
    return [*previous, entry]
