"""A jitted JAX training loop for keras_preact models that needs no TensorFlow.

Shared by `training/paper_tables.py`, `training/fashion_mnist_recipe.py` and
`benchmarks/gpu_throughput.py`. The Keras model and optimizer are used as pure functions
(`model.stateless_call`, `optimizer.stateless_apply`); the whole update is one `jax.jit`
with the state's buffers donated, so XLA updates the weights in place. Several seeds of one
architecture can train in one step (`seeds > 1`): their states are stacked on a leading axis
and the step is `jax.vmap`ped, which turns each convolution into a grouped one.

Reading order: learning-rate schedule and loss, the state and the steps, the input stream
(uint8 batches from `keras_preact.data.numpy_pipeline`, normalized on the device),
evaluation, checkpoints (atomic, in files of at most 16 MiB), the time guard, and FLOP
counting.

Needs `KERAS_BACKEND=jax`; import it after choosing the backend.
"""

import dataclasses
import glob
import hashlib
import json
import math
import os
import queue
import shutil
import threading
import time

import keras
import numpy as np

if keras.backend.backend() != "jax":
    raise ImportError(
        f"training/jax_loop.py needs KERAS_BACKEND=jax; the backend is {keras.backend.backend()!r}."
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from keras_preact.data import numpy_pipeline  # noqa: E402

#: Largest file a checkpoint writes: what one file coming back from the GPU machine may hold.
MAX_FILE_BYTES = 16 * 2**20


# -- Learning rate and loss -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Step or cosine decay after a warm-up, a function of the step and the run's length.

    The length is an argument, not a constant: the train step reads it from the state
    (`TrainState.hyper["total_steps"]`), so a run can fix its number of epochs after timing
    its first compiled steps without compiling again.

    Attributes:
        base_lr: the rate after warm-up.
        decay: `"step"` (divide by 10 at each fraction of the run in `boundaries`) or
            `"cosine"` (to 0 at the end).
        boundaries: for `"step"`, fractions of the run (the paper's 32k and 48k of 64k
            steps are `(0.5, 0.75)`).
        warmup_steps: steps before `base_lr` applies.
        warmup: `"constant"` (`warmup_lr`: the paper's 0.01 for ResNet-110) or `"linear"`.
        warmup_lr: the rate of a constant warm-up.

    Example:

    >>> s = Schedule(0.1, decay="step", boundaries=(0.5, 0.75), warmup_steps=100,
    ...              warmup="constant", warmup_lr=0.01)
    >>> [round(float(s(i, 1000)), 4) for i in (0, 100, 500, 750)]
    [0.01, 0.1, 0.01, 0.001]
    """

    base_lr: float
    decay: str = "cosine"
    boundaries: tuple = (0.5, 0.75)
    warmup_steps: int = 0
    warmup: str = "linear"
    warmup_lr: float = 0.0

    def __post_init__(self):
        if self.decay not in ("step", "cosine"):
            raise ValueError(f"decay={self.decay!r}; allowed: 'step', 'cosine'.")
        if self.warmup not in ("linear", "constant"):
            raise ValueError(f"warmup={self.warmup!r}; allowed: 'linear', 'constant'.")
        if any(not 0.0 < b < 1.0 for b in self.boundaries):
            raise ValueError(f"boundaries={self.boundaries!r} must be fractions in (0, 1).")

    def __call__(self, step, total_steps):
        step = jnp.asarray(step, jnp.float32)
        total = jnp.asarray(total_steps, jnp.float32)
        if self.decay == "step":
            lr = jnp.asarray(self.base_lr, jnp.float32)
            for b in self.boundaries:
                lr = jnp.where(step >= jnp.floor(b * total), lr * 0.1, lr)
        else:
            span = jnp.maximum(total - self.warmup_steps, 1.0)
            frac = jnp.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            lr = 0.5 * self.base_lr * (1.0 + jnp.cos(math.pi * frac))
        if self.warmup_steps:
            warm = (
                self.base_lr * (step + 1.0) / self.warmup_steps
                if self.warmup == "linear"
                else jnp.asarray(self.warmup_lr, jnp.float32)
            )
            lr = jnp.where(step < self.warmup_steps, warm, lr)
        return lr


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy of float32 logits against integer labels."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return nll.mean()


def decay_mask(model):
    """Which trainable variables get L2 decay: conv and dense kernels (the trainers' default).

    BatchNorm gamma/beta and biases are not decayed, as `training/common.py`'s
    `weight_decay_on="kernels"`.
    """
    kinds = (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D)
    decayed = set()
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, kinds) and getattr(layer, "kernel", None) is not None:
            decayed.add(id(layer.kernel))
    return [id(v) in decayed for v in model.trainable_variables]


# -- State and steps --------------------------------------------------------------------


#: The groups of a `TrainState`, in checkpoint order (weights first: they can travel alone).
STATE_GROUPS = ("trainable", "non_trainable", "optimizer", "hyper")


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class TrainState:
    """Everything a step reads and changes: weights, BatchNorm statistics, optimizer slots,
    and `hyper`, the run's scalars the step reads (`total_steps` for the schedule)."""

    trainable: list
    non_trainable: list
    optimizer: list
    hyper: dict = dataclasses.field(default_factory=dict)

    def tree_flatten(self):
        return (self.trainable, self.non_trainable, self.optimizer, self.hyper), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


def init_state(model, optimizer, *, total_steps=0):
    """The model's and optimizer's current values as a `TrainState` (builds the optimizer)."""
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    # Copies: a donating step frees its input buffers, which must not be the variables'.
    return TrainState(
        [jnp.array(v.value, copy=True) for v in model.trainable_variables],
        [jnp.array(v.value, copy=True) for v in model.non_trainable_variables],
        [jnp.array(v.value, copy=True) for v in optimizer.variables],
        {"total_steps": jnp.asarray(total_steps, jnp.int32)},
    )


def _lr_index(optimizer):
    for i, v in enumerate(optimizer.variables):
        if v is optimizer._learning_rate:
            return i
    raise ValueError(
        "With schedule=, the optimizer needs a float learning rate (a variable the step "
        "sets), not a LearningRateSchedule; e.g. keras.optimizers.SGD(schedule.base_lr)."
    )


def stack_states(states):
    """Stacks per-seed states on a new leading axis (for `seeds > 1` steps)."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def iteration_index(optimizer):
    """Index of the optimizer's step counter in `optimizer.variables`."""
    for i, v in enumerate(optimizer.variables):
        if v is optimizer._iterations:
            return i
    raise ValueError("The optimizer has no iteration counter among its variables.")


def assign_state(model, state, index=None):
    """Writes `state` (or seed `index` of a stacked state) into the model's variables."""
    pick = (lambda a: a) if index is None else (lambda a: a[index])
    for v, a in zip(model.trainable_variables, state.trainable):
        v.assign(pick(a))
    for v, a in zip(model.non_trainable_variables, state.non_trainable):
        v.assign(pick(a))


def device_normalizer(mean, std):
    """`x -> (x / 255 - mean) / std` on the device for uint8 batches (None: identity).

    For models without a normalization layer of their own (keras.applications models);
    keras_preact builders normalize themselves with `include_preprocessing=True`.
    """
    if mean is None:
        return lambda x: x
    scale = jnp.asarray(1.0 / (255.0 * np.asarray(std, np.float32)))
    shift = jnp.asarray(np.asarray(mean, np.float32) / np.asarray(std, np.float32))
    return lambda x: x.astype(jnp.float32) * scale - shift


def make_train_step(
    model,
    optimizer,
    *,
    schedule=None,
    weight_decay=0.0,
    label_smoothing=0.0,
    normalize=None,
    seeds=1,
    donate=True,
):
    """A jitted `step(state, images, labels) -> (state, metrics)`.

    Args:
        model: a Keras model returning logits (`classifier_activation=None`).
        optimizer: a built Keras optimizer (its `stateless_apply` is used).
        schedule: a `Schedule`; the step sets the optimizer's learning rate to
            `schedule(iteration, state.hyper["total_steps"])` (None: the optimizer's own).
        weight_decay: coupled L2 coefficient on conv/dense kernels (gradient += wd * w).
        label_smoothing: label smoothing of the cross-entropy.
        normalize: a function applied to the batch first (e.g. `device_normalizer`).
        seeds: > 1 for a state stacked over seeds; images `(seeds, B, ...)`.
        donate: donate the state's buffers (the update happens in place).

    `metrics` holds the batch's mean cross-entropy `loss` and the count of `correct`
    predictions (per seed when `seeds > 1`), left on the device.
    """
    mask = decay_mask(model)
    normalize = normalize or (lambda x: x)
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    if schedule is not None:
        lr_at, it_at = _lr_index(optimizer), iteration_index(optimizer)

    def loss_fn(trainable, non_trainable, images, labels):
        logits, non_trainable = model.stateless_call(
            trainable, non_trainable, normalize(images), training=True
        )
        ce = cross_entropy(logits, labels, label_smoothing)
        loss = ce
        if weight_decay:
            l2 = sum(
                jnp.sum(jnp.square(w.astype(jnp.float32))) for w, m in zip(trainable, mask) if m
            )
            loss = ce + 0.5 * weight_decay * l2
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return loss, (ce, correct, non_trainable)

    def step(state, images, labels):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (ce, correct, non_trainable)), grads = grad_fn(
            state.trainable, state.non_trainable, images, labels
        )
        opt = list(state.optimizer)
        if schedule is not None:
            lr = schedule(opt[it_at], state.hyper["total_steps"])
            opt[lr_at] = lr.astype(opt[lr_at].dtype)
        trainable, opt = optimizer.stateless_apply(opt, grads, state.trainable)
        new_state = TrainState(trainable, non_trainable, opt, state.hyper)
        return new_state, {"loss": ce, "correct": correct}

    if seeds > 1:
        step = jax.vmap(step)
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(model, *, normalize=None):
    """A jitted `step(state, images, labels, valid) -> (loss_sum, correct)` on a padded batch.

    `valid` masks the padding of the last batch, so every batch has one shape (one
    compilation).
    """
    normalize = normalize or (lambda x: x)

    def step(state, images, labels, valid):
        logits, _ = model.stateless_call(
            state.trainable, state.non_trainable, normalize(images), training=False
        )
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), -1)[:, 0]
        correct = (jnp.argmax(logp, -1) == labels) & valid
        return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(correct)

    return jax.jit(step)


def evaluate(eval_step, state, images, labels, batch_size):
    """Mean loss and error rate over a whole uint8 test set."""
    n = len(images)
    loss, correct = 0.0, 0
    for start in range(0, n, batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        valid = np.ones(batch_size, bool)
        if len(x) < batch_size:  # pad the last batch: one shape, one compilation
            pad = batch_size - len(x)
            valid[len(x) :] = False
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
        batch_loss, batch_correct = eval_step(state, x, y, valid)
        loss, correct = loss + batch_loss, correct + batch_correct
    loss, correct = np.asarray(loss, np.float64), np.asarray(correct, np.float64)
    return loss / n, 1.0 - correct / n


# -- Input stream -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Augment:
    """The numpy augmentations of one run, applied to uint8 batches on the host.

    Attributes:
        padding: zero padding of the random crop (0: no crop).
        flip: random horizontal flips.
        erasing: probability of random erasing per image (0: off).
    """

    padding: int = 4
    flip: bool = True
    erasing: float = 0.0

    def __call__(self, images, seed, step):
        """Augments training batch `step` of the stream `seed`, with the random streams of
        `numpy_pipeline.ArrayDataset` (crop and flip `[seed, 1, step]`, erasing
        `[seed, 2, step]`), so both pipelines give the same images."""
        if self.padding or self.flip:
            rng = np.random.default_rng([seed, 1, step])
            images = numpy_pipeline.pad_crop_flip(images, rng, padding=self.padding, flip=self.flip)
        if self.erasing:
            rng = np.random.default_rng([seed, 2, step])
            images = numpy_pipeline.random_erasing(images, rng, probability=self.erasing)
        return images


def batch_indices(n, batch_size, seed, global_batch):
    """Example indices of training batch `global_batch` of the stream seeded by `seed`.

    Passes over the data are shuffled by `[seed, pass]`, so the stream is a fixed function
    of (seed, batch index): a resumed run sees exactly the batches an uninterrupted one would.
    """
    per_pass = n // batch_size
    data_pass, within = divmod(global_batch, per_pass)
    order = _permutation(n, seed, data_pass)
    return order[within * batch_size : (within + 1) * batch_size]


_PERMUTATIONS = {}


def _permutation(n, seed, data_pass):
    key = (n, seed, data_pass)
    if key not in _PERMUTATIONS:
        if len(_PERMUTATIONS) > 64:
            _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = np.random.default_rng([seed, data_pass]).permutation(n)
    return _PERMUTATIONS[key]


def train_batches(images, labels, batch_size, *, seed, start_step, augment):
    """Yields `(step, images, labels)` from `start_step` on; uint8 images, int32 labels."""
    step = start_step
    while True:
        idx = batch_indices(len(images), batch_size, seed, step)
        yield step, augment(images[idx], seed, step), labels[idx].astype(np.int32)
        step += 1


def prefetch(iterator, size=3):
    """Runs `iterator` in a background thread, `size` items ahead, moving arrays to the device.

    numpy's fancy indexing and the host-to-device copy overlap the device's work this way.
    An exception in the producer is raised in the consumer.
    """
    q = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterator:
                item = tuple(jax.device_put(a) if isinstance(a, np.ndarray) else a for a in item)
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)
            return
        put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# -- Checkpoints ------------------------------------------------------------------------


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def state_arrays(state):
    """A flat `{name: np.ndarray}` of a `TrainState` (device to host)."""
    out = {}
    for group in STATE_GROUPS[:3]:
        for i, a in enumerate(getattr(state, group)):
            out[f"{group}/{i:04d}"] = np.asarray(a)
    for k, a in state.hyper.items():
        out[f"hyper/{k}"] = np.asarray(a)
    return out


def state_from_arrays(arrays, like, *, fresh=()):
    """The `TrainState` of `arrays`, checked against the structure of the state `like`.

    Groups named in `fresh` (e.g. `("optimizer",)`) that `arrays` lack keep `like`'s values.
    """
    groups = {}
    for group in STATE_GROUPS[:3]:
        ref = getattr(like, group)
        values = []
        if group in fresh and not any(k.startswith(group + "/") for k in arrays):
            groups[group] = list(ref)
            continue
        for i, r in enumerate(ref):
            key = f"{group}/{i:04d}"
            if key not in arrays:
                raise ValueError(f"checkpoint lacks {key}: it is for another model or optimizer.")
            a = arrays[key]
            if tuple(a.shape) != tuple(r.shape):
                raise ValueError(
                    f"checkpoint {key} has shape {tuple(a.shape)}, the run expects "
                    f"{tuple(r.shape)}: it is for another model, width or number of seeds."
                )
            values.append(jnp.asarray(a, dtype=r.dtype))
        groups[group] = values
    hyper = {}
    for k, r in like.hyper.items():
        if f"hyper/{k}" not in arrays:
            raise ValueError(f"checkpoint lacks hyper/{k}.")
        hyper[k] = jnp.asarray(arrays[f"hyper/{k}"], dtype=r.dtype)
    expected = {f"{g}/{i:04d}" for g, values in groups.items() for i in range(len(values))}
    expected |= {f"hyper/{k}" for k in like.hyper}
    extra = sorted(set(arrays) - expected)
    if extra:
        raise ValueError(
            f"checkpoint holds {len(extra)} arrays the run has no place for, first {extra[0]!r}: "
            "it is for another model or optimizer."
        )
    return TrainState(**groups, hyper=hyper)


def save_checkpoint(directory, arrays, meta, *, keep=2, max_file_bytes=MAX_FILE_BYTES):
    """Writes one checkpoint atomically as `directory/ckpt-<step>/` in files <= 16 MiB.

    Arrays are packed into shard files named by their group (`shard-000-trainable.npz`,
    ..., `shard-004-optimizer.npz`), splitting any array larger than `max_file_bytes`; no
    file mixes groups, so the weights can travel without the optimizer slots.
    `manifest.json` lists every piece with its file's SHA-256, and is written last. Then `directory/latest.json` points at the new checkpoint
    (atomic rename), and only then are older ones beyond `keep` removed: a crash at any
    moment leaves the previous complete checkpoint loadable.

    Args:
        directory: the run's checkpoint folder.
        arrays: `{name: np.ndarray}`.
        meta: JSON-serializable dict (step, epoch, log rows, configuration...).
    """
    os.makedirs(directory, exist_ok=True)
    step = int(meta["step"])
    name = f"ckpt-{step:08d}"
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, f".{name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    budget = max_file_bytes - 64 * 1024  # room for the npz headers
    shards, groups, current, size = [], [], {}, 0
    pieces = []
    for key, a in arrays.items():
        a = np.asarray(a, order="C")  # (np.ascontiguousarray would make scalars 1-d)
        flat = a.reshape(-1)
        per = max(1, budget // max(a.itemsize, 1))
        for j in range(0, max(flat.size, 1), per):
            piece = flat[j : j + per]
            pieces.append((f"{key}#{j}", key, piece, a.shape, str(a.dtype)))
    entries = []
    group = None
    for pkey, key, piece, shape, dtype in pieces:
        # Weights and optimizer slots never share a file: the weights alone can travel.
        new_group = key.split("/")[0]
        if current and (size + piece.nbytes > budget or new_group != group):
            shards.append(current)
            groups.append(group)
            current, size = {}, 0
        group = new_group
        current[pkey] = piece
        size += piece.nbytes
        entries.append(
            {
                "piece": pkey,
                "array": key,
                "shape": list(shape),
                "dtype": dtype,
                "shard": len(shards),
            }
        )
    if current or not shards:
        shards.append(current)
        groups.append(group or "empty")
    files = []
    for i, (shard, group) in enumerate(zip(shards, groups)):
        path = os.path.join(tmp, f"shard-{i:03d}-{group}.npz")
        with open(path, "wb") as f:
            np.savez(f, **{k.replace("/", "|"): v for k, v in shard.items()})
            f.flush()
            os.fsync(f.fileno())
        files.append(
            {
                "file": os.path.basename(path),
                "bytes": os.path.getsize(path),
                "sha256": _sha256(path),
            }
        )
    _write_json(
        os.path.join(tmp, "manifest.json"), {"meta": meta, "files": files, "pieces": entries}
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_json(os.path.join(directory, "latest.json"), {"checkpoint": name})
    for old in sorted(glob.glob(os.path.join(directory, "ckpt-*")))[:-keep]:
        if os.path.basename(old) != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _read_checkpoint(path, allow_missing=()):
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    groups_in = {}
    for e in manifest["pieces"]:
        groups_in.setdefault(e["shard"], set()).add(e["array"].split("/")[0])
    present = set()
    for i, entry in enumerate(manifest["files"]):
        file = os.path.join(path, entry["file"])
        if not os.path.isfile(file) and groups_in.get(i, set()) <= set(allow_missing):
            continue  # e.g. optimizer slots left behind on another machine
        if not os.path.isfile(file) or os.path.getsize(file) != entry["bytes"]:
            raise ValueError(f"{file} is missing or truncated.")
        if _sha256(file) != entry["sha256"]:
            raise ValueError(f"{file} does not match its SHA-256 in the manifest.")
        present.add(i)
    shard_data = {}
    for i in present:
        with np.load(os.path.join(path, manifest["files"][i]["file"])) as z:
            shard_data[i] = {k.replace("|", "/"): z[k] for k in z.files}
    parts = {}
    for e in manifest["pieces"]:
        if e["shard"] not in present:
            continue
        parts.setdefault(e["array"], (e["shape"], e["dtype"], []))[2].append(
            shard_data[e["shard"]][e["piece"]]
        )
    arrays = {
        k: np.concatenate(p).astype(dtype).reshape(shape) if p else np.zeros(shape, dtype)
        for k, (shape, dtype, p) in parts.items()
    }
    return arrays, manifest["meta"]


def load_checkpoint(directory, allow_missing=()):
    """The newest complete checkpoint in `directory` as `(arrays, meta)`, or None.

    A checkpoint whose files are missing, truncated or altered is skipped with a warning and
    the next older one is tried, so a crash while writing costs at most one epoch.
    `allow_missing=("optimizer",)` accepts a checkpoint whose optimizer files were left
    behind (the arrays then lack `optimizer/*`).
    """
    candidates = sorted(glob.glob(os.path.join(directory, "ckpt-*")), reverse=True)
    latest = os.path.join(directory, "latest.json")
    if os.path.exists(latest):
        with open(latest) as f:
            named = os.path.join(directory, json.load(f)["checkpoint"])
        candidates = [named] + [c for c in candidates if c != named]
    for path in candidates:
        try:
            return _read_checkpoint(path, allow_missing)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            print(f"WARNING: skipping checkpoint {path}: {e}", flush=True)
    return None


# -- Time guard -------------------------------------------------------------------------


class TimeGuard:
    """Stops a run before a wall-clock budget ends, leaving room for the next unit of work.

    `fits(cost_s)` is True while `cost_s` more seconds (times `margin`) end before the
    deadline; a script checkpoints and exits cleanly when it is False. The budget counts
    from `start` (default: now), so a script passes its own start time to count imports too.
    """

    def __init__(self, budget_s, *, start=None, margin=1.2):
        self.start = time.time() if start is None else start
        self.deadline = None if not budget_s else self.start + float(budget_s)
        self.margin = margin

    def remaining(self):
        return math.inf if self.deadline is None else self.deadline - time.time()

    def fits(self, cost_s):
        return self.remaining() > self.margin * cost_s


# -- The loop ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What one training run is: one frozen value, recorded in every checkpoint.

    A resumed run must have the same spec (the checkpoint's is compared field by field).

    Attributes:
        batch_size: images per step.
        epochs: passes of `steps_per_epoch` steps.
        steps_per_epoch: steps per epoch (one pass over the data by default).
        seed: the data stream's seed (order and augmentation).
        eval_every: evaluate on the test set every this many epochs (and after the last).
        log_every: also log the running training loss every this many steps (0: per epoch).
        eval_batch_size: batch size of evaluation.
    """

    batch_size: int
    epochs: int
    steps_per_epoch: int
    seed: int = 0
    eval_every: int = 1
    log_every: int = 0
    eval_batch_size: int = 500


def _check_resumable(meta, spec, extra):
    saved = meta.get("spec", {})
    want = {**dataclasses.asdict(spec), **(extra or {})}
    diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"The checkpoint in this run folder was written by a different run ({details}). "
            "Use another --model_dir, or the original arguments."
        )


def fit(
    *,
    state,
    train_step,
    eval_step,
    data,
    spec,
    augment,
    run_dir,
    guard=None,
    config=None,
    schedule=None,
    iteration_index=None,
    verbose=True,
    label="",
):
    """Trains from the newest checkpoint in `run_dir` (or `state`), one checkpoint per epoch.

    Args:
        state: the initial `TrainState` (also the structure a checkpoint must match).
        train_step, eval_step: from `make_train_step` / `make_eval_step` (one seed).
        data: `((x_train, y_train), (x_test, y_test))`, uint8 images and int labels.
        spec: the `RunSpec`.
        augment: an `Augment`.
        run_dir: folder for checkpoints (`ckpt-*`, written atomically, files <= 16 MiB) and
            `log.csv`.
        guard: a `TimeGuard`; before each epoch the loop stops, checkpointed, if the
            epoch (timed on the previous one) would not end before its deadline.
        config: extra JSON-able settings a resumed run must share (model, optimizer...).
        schedule: the learning-rate schedule, for the `lr` column of the log.
        iteration_index: index of the optimizer's step counter in `state.optimizer`; allows
            resuming from a checkpoint whose optimizer files were left behind.
        verbose: print one line per epoch.
        label: prefix of the printed lines.

    Returns:
        A dict: `status` (`"done"`, `"stopped"` by the guard, or `"diverged"`: a NaN or
        infinite loss), `state`, `rows` (one dict per log point: `kind` `"train"` or
        `"epoch"`, `epoch`, `step`, `lr`, `train_loss`, `test_loss`, `test_error`, ...),
        `epoch` (epochs completed) and `train_seconds`.
    """
    (x_train, y_train), (x_test, y_test) = data
    guard = guard or TimeGuard(None)
    rows, epoch, train_seconds = [], 0, 0.0
    saved = load_checkpoint(run_dir, ("optimizer",)) if os.path.isdir(run_dir) else None
    if saved is not None:
        arrays, meta = saved
        _check_resumable(meta, spec, config)
        state = state_from_arrays(arrays, state, fresh=("optimizer",))
        if not any(k.startswith("optimizer/") for k in arrays):
            if iteration_index is None:
                raise ValueError(f"The checkpoint in {run_dir} has no optimizer files.")
            # Weights-only resume: momentum restarts at 0 (it refills within ~1/(1-0.9) = 10
            # steps); the step counter, hence the learning rate, continues.
            state.optimizer[iteration_index] = jnp.asarray(
                meta["step"], state.optimizer[iteration_index].dtype
            )
            print(
                f"{label}WARNING: resuming from weights only; momentum restarts at zero", flush=True
            )
        rows, epoch = meta["rows"], int(meta["epoch"])
        train_seconds = float(meta.get("train_seconds", 0.0))
        if verbose:
            print(
                f"{label}resumed at epoch {epoch} (step {meta['step']}) from {run_dir}", flush=True
            )
        if meta.get("status") in ("done", "diverged"):
            return {
                "status": meta["status"],
                "state": state,
                "rows": rows,
                "epoch": epoch,
                "train_seconds": train_seconds,
            }
    os.makedirs(run_dir, exist_ok=True)

    def checkpoint(status):
        meta = {
            "step": epoch * spec.steps_per_epoch,
            "epoch": epoch,
            "rows": rows,
            "status": status,
            "train_seconds": train_seconds,
            "spec": {**dataclasses.asdict(spec), **(config or {})},
        }
        save_checkpoint(run_dir, state_arrays(state), meta)
        _write_rows(os.path.join(run_dir, "log.csv"), rows)

    last_epoch_s = None
    status = "done"
    while epoch < spec.epochs:
        if last_epoch_s is not None and not guard.fits(last_epoch_s):
            status = "stopped"
            break
        start = time.time()
        start_step = epoch * spec.steps_per_epoch
        stream = train_batches(
            x_train,
            y_train,
            spec.batch_size,
            seed=spec.seed,
            start_step=start_step,
            augment=augment,
        )
        window, window_n, total, total_n, correct = 0.0, 0, 0.0, 0, 0.0
        bad = False
        for i, (step, x, y) in enumerate(prefetch(stream)):
            state, metrics = train_step(state, x, y)
            window = window + metrics["loss"]
            correct = correct + metrics["correct"]
            window_n += 1
            last = i + 1 == spec.steps_per_epoch
            if last or (spec.log_every and (step + 1) % spec.log_every == 0):
                mean = float(window) / window_n  # one host sync per log point
                total, total_n = total + mean * window_n, total_n + window_n
                if not math.isfinite(mean):
                    bad = True
                rows.append(
                    {
                        "kind": "train",
                        "epoch": epoch,
                        "step": step + 1,
                        "lr": float(schedule(step, state.hyper["total_steps"]))
                        if schedule
                        else None,
                        "train_loss": mean,
                    }
                )
                window, window_n = 0.0, 0
                if bad:
                    break
            if last:
                break
        epoch += 1
        train_seconds += time.time() - start
        row = {
            "kind": "epoch",
            "epoch": epoch,
            "step": epoch * spec.steps_per_epoch,
            "train_loss": total / max(total_n, 1),
            "train_error": 1.0 - float(correct) / (max(total_n, 1) * spec.batch_size),
        }
        if bad:
            row.update(train_loss=float("nan"), test_loss=float("nan"), test_error=float("nan"))
            rows.append(row)
            status = "diverged"
            checkpoint(status)
            if verbose:
                print(
                    f"{label}epoch {epoch}: the loss is not finite; the run diverged.", flush=True
                )
            break
        if epoch % spec.eval_every == 0 or epoch == spec.epochs:
            loss, err = evaluate(eval_step, state, x_test, y_test, spec.eval_batch_size)
            row.update(test_loss=float(loss), test_error=float(err))
        row.update(epoch_s=time.time() - start, train_seconds=train_seconds)
        rows.append(row)
        checkpoint("done" if epoch == spec.epochs else "running")
        last_epoch_s = time.time() - start
        if verbose:
            test = (
                f", test loss {row['test_loss']:.4f}, test error {100 * row['test_error']:.2f}%"
                if "test_error" in row
                else ""
            )
            print(
                f"{label}epoch {epoch}/{spec.epochs}: train loss {row['train_loss']:.4f}"
                f"{test} ({last_epoch_s:.1f} s)",
                flush=True,
            )
    return {
        "status": status,
        "state": state,
        "rows": rows,
        "epoch": epoch,
        "train_seconds": train_seconds,
    }


ROW_FIELDS = (
    "kind",
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_error",
    "test_loss",
    "test_error",
    "epoch_s",
    "train_seconds",
)


def _write_rows(path, rows):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(",".join(ROW_FIELDS) + "\n")
        for r in rows:
            f.write(",".join("" if r.get(k) is None else str(r[k]) for k in ROW_FIELDS) + "\n")
    os.replace(tmp, path)


# -- FLOPs ------------------------------------------------------------------------------


def multiply_adds(model):
    """Multiply-adds of one image's forward pass through the conv and dense layers.

    The usual convention (He et al. count FLOPs this way): BatchNorm, activations and
    pooling are left out. A training step costs about 3x this (forward, and two products
    per layer backward), i.e. `6 * multiply_adds` floating-point operations per image.
    """
    total = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            out = layer.output.shape
            k = layer.kernel_size[0] * layer.kernel_size[1]
            total += out[1] * out[2] * out[3] * k
        elif isinstance(layer, keras.layers.Conv2D):
            out, cin = layer.output.shape, layer.input.shape
            channels_last = layer.data_format == "channels_last"
            h, w = (out[1], out[2]) if channels_last else (out[2], out[3])
            c_in = cin[-1] if channels_last else cin[1]
            k = layer.kernel_size[0] * layer.kernel_size[1]
            total += h * w * k * (c_in // layer.groups) * layer.filters
        elif isinstance(layer, keras.layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return int(total)


def train_flops_per_image(model):
    """`6 * multiply_adds(model)`: forward (2 per multiply-add) plus a backward pass twice
    as costly (gradients with respect to inputs and to weights)."""
    return 6 * multiply_adds(model)


def compiled_flops(jitted, *args):
    """XLA's own FLOP count of `jitted(*args)` (None where the backend does not report it)."""
    try:
        analysis = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - cost analysis is best effort on every backend
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])
