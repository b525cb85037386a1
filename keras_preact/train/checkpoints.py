"""A run's resumable state: the checkpoint folders under `MODEL_DIR/checkpoints/`.

One checkpoint is one folder, `epoch-NNNN/` after NNNN whole epochs or
`epoch-NNNN-step-SSSSSS/` after SSSSSS steps of the next: `model.weights.h5` (the model's and
the optimizer's variables) and `state.json` (where the run stands, its `log.csv` rows, the
epoch's running sums, the input's position, the weights' SHA-256), written last in one
atomic write: the commit, on a local disk as on an object store (`gs://`), where a folder
cannot be renamed atomically. A folder without a readable `state.json`, or whose weights do
not match it, is skipped with a warning; the newest two complete ones are kept. Every path
goes through `fs`.
"""

import contextlib
import hashlib
import logging
import os
import re
from typing import NamedTuple

import keras

from keras_preact._optional import require
from keras_preact.train import fs, metrics

log = logging.getLogger(__name__)

FOLDER, WEIGHTS, STATE = "checkpoints", "model.weights.h5", "state.json"
_NAME = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?$")
#: Version of `state.json` (2: `step_in_epoch` and `steps` for `step` and `iterations`).
FORMAT = 3


class ResumeRefused(ValueError):
    """A run cannot resume as asked; the message says why and what to do."""


class Restored(NamedTuple):
    """Where a run resumes (all zero for a fresh run)."""

    epoch: int = 0  # whole epochs done
    step: int = 0  # steps of epoch `epoch` done (a run stopped inside it)
    iterations: int = 0  # the optimizer's steps
    state: dict = {}  # the checkpoint's state.json ({} for a fresh run)


def name(epoch, step=0):
    """The folder name of the checkpoint at `(epoch, step)`."""
    return f"epoch-{epoch:04d}" + (f"-step-{step:06d}" if step else "")


def digest(path):
    """The SHA-256 of a file, through `fs`."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _close_h5(path):
    """Closes the HDF5 handles a failed write left open on the local file `path`.

    Keras does not close its file when a write fails; h5py would flush it when the object
    is collected or at exit, fail again on a full disk, and crash the interpreter.
    Truncating the file first gives the final flush room to succeed.
    """
    h5py = require("h5py")
    target = os.path.abspath(path)
    for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        with contextlib.suppress(Exception):
            if os.path.abspath(fid.name.decode()) == target:
                with contextlib.suppress(OSError):
                    os.truncate(path, 0)
                h5py.File(fid).close()  # closes its groups and datasets too


def save_weights(model, path, attrs=None):
    """`model.save_weights` at `path` (any `fs` path), atomically; `attrs` are stored in the
    file's root (Keras ignores them when it loads). On failure nothing is left behind and
    one `fs.WriteError` names `path`."""

    def write(local):
        try:
            model.save_weights(local, overwrite=True)
            if attrs:
                with require("h5py").File(local, "a") as f:
                    f.attrs.update(attrs)
        except BaseException:
            _close_h5(local)
            raise

    fs.save_file(path, write)


def save_model_weights(model, path, attrs=None):
    """Like `save_weights`, without the optimizer's variables (the shippable file)."""
    if getattr(model, "optimizer", None) is not None:
        clone = model.__class__.from_config(model.get_config())
        clone.set_weights(model.get_weights())
        model = clone
    save_weights(model, path, attrs)


def _optimizer_shapes(local):
    """The shapes of the optimizer variables saved in a `.weights.h5` file."""
    with require("h5py").File(local, "r") as f:
        group = f.get("optimizer/vars")
        return [tuple(group[k].shape) for k in sorted(group, key=int)] if group else []


def _load(model, local, iterations, *, restart_optimizer):
    """Loads a checkpoint's weights; the optimizer's only if its structure is this run's."""
    from keras_preact.weights import load_weights_file

    optimizer = model.optimizer
    saved, mine = _optimizer_shapes(local), [tuple(v.shape) for v in optimizer.variables]
    if saved != mine and not restart_optimizer:
        raise ResumeRefused(
            f"The checkpoint's optimizer state has {len(saved)} variables, this run's "
            f"optimizer {len(mine)} ({type(optimizer).__name__}): an option that shapes it "
            "changed (--momentum to or from 0, --mixed_precision on a GPU, which adds loss "
            "scaling, or --loop=custom with it). Rerun with the checkpoint's options, or "
            "restart the optimizer on purpose with --restart_optimizer (the weights and the "
            "step count are kept, the momentum starts again at zero)."
        )
    if saved == mine:
        load_weights_file(model, local)
    else:  # Keras warns and loads the layers alone
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_weights(local)
    if restart_optimizer:
        for v in optimizer.variables:
            v.assign(keras.ops.zeros(v.shape, v.dtype))
        optimizer.iterations.assign(iterations)


def _optimizer(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            f"model {model.name!r} has no optimizer: compile it with its optimizer so "
            "the checkpoint holds the optimizer's iterations and momentum."
        )
    return optimizer


class Store:
    """The checkpoint folders of one run; every process of a run has one.

    Args:
        model_dir: the run's folder; `restore` reads the chief's checkpoints there.
        write_dir: where `save` writes (`model_dir` on the chief, a scratch folder on other
            TensorFlow workers, which must save too because reading variables may be
            collective).
        writes: False on a process whose `save` writes nothing (JAX's processes other
            than the first: each holds the whole state).
    """

    def __init__(self, model_dir, write_dir=None, *, writes=True):
        self.model_dir, self.write_dir = model_dir, write_dir or model_dir
        self.writes = writes

    def folders(self, root):
        """`[((epoch, step), path)]` of the checkpoint folders under `root`, newest first."""
        top = fs.join(root, FOLDER)
        found = [(_NAME.match(n), n) for n in fs.listdir(top)] if fs.isdir(top) else []
        return sorted(
            (((int(m.group(1)), int(m.group(2) or 0)), fs.join(top, n)) for m, n in found if m),
            reverse=True,
        )

    def _read(self, path):
        """A checkpoint folder's state, checked against its weights; ValueError otherwise."""
        state_path, weights = fs.join(path, STATE), fs.join(path, WEIGHTS)
        try:
            state = fs.read_json(state_path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{state_path}: {type(e).__name__}: {e}") from None
        record = state.get("weights", {})
        if not fs.exists(weights):
            raise ValueError(f"{weights} is missing")
        size = fs.getsize(weights)
        if size != record.get("bytes"):
            raise ValueError(f"{weights} has {size} bytes, {state_path} says {record.get('bytes')}")
        if digest(weights) != record.get("sha256"):
            raise ValueError(f"{weights} does not match the SHA-256 in {state_path}")
        return state

    def restore(self, model, *, restart_optimizer=False):
        """Loads the newest complete checkpoint into `model` and its optimizer, if any.

        A damaged newest checkpoint is skipped with a warning naming the file; the one
        before it is used. Returns a `Restored` (all zero when there is none).

        Raises:
            ResumeRefused: the optimizer state does not fit (see `--restart_optimizer`).
            RuntimeError: checkpoints exist but none can be read (names each and why).
        """
        optimizer = _optimizer(model)
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        problems = []
        for (epoch, step), path in self.folders(self.model_dir):
            try:
                state = self._read(path)
            except ValueError as e:
                problems.append(str(e))
                log.warning("Skipping checkpoint %s: %s", path, e)
                continue
            iterations = int(state.get("iterations", state.get("steps", 0)))
            with fs.local_copy(fs.join(path, WEIGHTS)) as local:
                _load(model, local, iterations, restart_optimizer=restart_optimizer)
            step = int(state.get("step", state.get("step_in_epoch", 0)))
            iterations = int(metrics.scalar(model.optimizer.iterations))
            within = f" and {step} step(s) of the next" if step else ""
            skipped = f" Skipped: {'; '.join(problems)}." if problems else ""
            print(
                f"Resuming from {path}: {epoch} epoch(s){within} done, optimizer step "
                f"{iterations}, learning rate "
                f"{metrics.learning_rate(model.optimizer):.6g}.{skipped}",
                flush=True,
            )
            return Restored(epoch, step, iterations, state)
        if problems:
            raise RuntimeError(
                f"No usable checkpoint under {fs.join(self.model_dir, FOLDER)}: "
                f"{'; '.join(problems)}. Delete that folder to start the run again from scratch."
            )
        return Restored()

    def save(self, model, *, epoch, step=0, state):
        """Writes the checkpoint at `(epoch, step)`: the weights, then `state.json` (`state`
        plus the position and the weights' size and hash), the commit. Keeps the newest
        complete checkpoint before it and removes everything else (a killed save's leftovers
        included), so a save needs room for two checkpoints at most.

        Raises:
            fs.WriteError: a file could not be written (a full disk); the message names it,
                and the checkpoint before is intact.
        """
        _optimizer(model)
        if not self.writes:
            return
        self._prune((epoch, step))
        folder = fs.join(self.write_dir, FOLDER, name(epoch, step))
        fs.makedirs(folder)
        weights = fs.join(folder, WEIGHTS)
        save_weights(model, weights)
        record = {"file": WEIGHTS, "bytes": fs.getsize(weights), "sha256": digest(weights)}
        fs.write_json_atomic(
            fs.join(folder, STATE),
            {**state, "format": FORMAT, "epoch": epoch, "step": step, "weights": record},
        )

    def _prune(self, key):
        """Before the save at `key`: removes every checkpoint folder but the newest complete
        one before `key` (incomplete ones, later ones, older ones), and temporary files and
        the files of earlier versions (`latest.*`)."""
        found = self.folders(self.write_dir)
        complete = [p for k, p in found if k < key and fs.exists(fs.join(p, STATE))]
        top = fs.join(self.write_dir, FOLDER)
        names = fs.listdir(top) if fs.isdir(top) else []
        stale = [fs.join(top, n) for n in names if n.startswith((".tmp", "latest."))]
        for path in [p for _, p in found if p not in complete[:1]] + stale:
            fs.remove(path)
