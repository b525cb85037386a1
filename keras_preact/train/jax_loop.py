"""`--loop=jax`: the trainer's jitted JAX step (JAX backend), a runner of the controller.

The Keras model and optimizer are used as pure functions (`model.stateless_call`,
`optimizer.stateless_apply`): one `jax.jit` step with the state's buffers donated, so XLA
updates the weights in place, over a mesh of every local device (`JaxRunner`); uint8
batches travel to the devices from a background thread and the model normalizes them
itself. The loss (`optimization.SparseCrossentropy`), the weight decay (the variables' L2
regularizers), the learning-rate schedule (the optimizer's) and everything between steps
(`controller.Controller`: checkpoints, `log.csv`, resume) are the trainer's own, the same
as under `model.fit`. The input is the numpy `ArrayDataset` or a `tf.data` dataset.

`make_train_step(..., seeds=S)` trains S copies of one architecture in one step (their
states stacked on a leading axis, the step `jax.vmap`ped), for experiments that want several
seeds at once (`benchmarks/gpu_throughput.py`).
"""

import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np

from keras_preact.train import optimization, runners


def init_state(model, optimizer):
    """`(trainable, non_trainable, optimizer)` value lists of the model and its optimizer.

    Copies: a donating step frees its input buffers, which must not be the variables'.
    """
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    copy = lambda vs: [jnp.array(v.value, copy=True) for v in vs]  # noqa: E731
    return (
        copy(model.trainable_variables),
        copy(model.non_trainable_variables),
        copy(optimizer.variables),
    )


def assign_state(model, optimizer, state):
    """Writes a state back into the model's and the optimizer's variables."""
    trainable, non_trainable, opt = state
    for variables, values in (
        (model.trainable_variables, trainable),
        (model.non_trainable_variables, non_trainable),
        (optimizer.variables, opt),
    ):
        for v, a in zip(variables, values):
            v.assign(a)


def _counts(logits, labels):
    """Correct top-1 and top-k (k = min(5, classes)) predictions of a batch."""
    logits = logits.astype(jnp.float32)
    labels = labels.reshape(-1).astype(jnp.int32)
    top1 = jnp.argmax(logits, -1) == labels
    _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    return top1, jnp.any(top == labels[:, None], -1)


def make_train_step(model, optimizer, *, label_smoothing=0.0, seeds=1, donate=True, mesh=None):
    """A jitted `step(state, images, labels) -> (state, sums)`.

    The loss is the trainer's: mean cross-entropy (`SparseCrossentropy`, with label
    smoothing) plus the L2 penalties of the variables that carry a regularizer (what
    `model.fit` adds through `model.losses`). `sums` holds the batch's `loss` and its
    `top1` / `top5` counts, left on the device. With `seeds > 1`, the state is stacked over
    seeds and images are `(seeds, batch, ...)`. `mesh`: `(replicated, split)` shardings of
    the state and of a batch (`JaxRunner`).
    """
    loss_fn = optimization.SparseCrossentropy(label_smoothing)
    if not optimizer.built:
        optimizer.build(model.trainable_variables)

    def objective(trainable, non_trainable, images, labels):
        logits, non_trainable = model.stateless_call(
            trainable, non_trainable, images, training=True
        )
        return loss_fn(labels, logits) + _penalty(model, trainable), (logits, non_trainable)

    def step(state, images, labels):
        trainable, non_trainable, opt = state
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (loss, (logits, non_trainable)), grads = grad_fn(trainable, non_trainable, images, labels)
        trainable, opt = optimizer.stateless_apply(opt, grads, trainable)
        top1, top5 = _counts(logits, labels)
        sums = {"loss": loss, "top1": jnp.sum(top1), "top5": jnp.sum(top5)}
        return (trainable, non_trainable, opt), sums

    if seeds > 1:
        step = jax.vmap(step)
    placed = {}
    if mesh is not None:
        replicated, split = mesh
        placed = dict(in_shardings=(replicated, split, split), out_shardings=replicated)
    return jax.jit(step, donate_argnums=(0,) if donate else (), **placed)


def make_eval_step(model, *, label_smoothing=0.0, mesh=None):
    """A jitted `step(state, images, labels, valid) -> (loss_sum, top1, top5)` on a batch
    whose padding `valid` masks (every batch has one shape: one compilation); `mesh` as
    for `make_train_step`."""
    loss_fn = optimization.SparseCrossentropy(label_smoothing, reduction=None)

    def step(state, images, labels, valid):
        trainable, non_trainable, _ = state
        logits, _ = model.stateless_call(trainable, non_trainable, images, training=False)
        losses = loss_fn(labels, logits.astype(jnp.float32))
        top1, top5 = _counts(logits, labels)
        total = lambda x: jnp.sum(jnp.where(valid, x, 0))  # noqa: E731
        return total(losses), total(top1), total(top5)

    placed = {}
    if mesh is not None:
        replicated, split = mesh
        placed = dict(in_shardings=(replicated, split, split, split), out_shardings=replicated)
    return jax.jit(step, **placed)


def prefetch(batches, size=3, sharding=None, place=None):
    """Yields `batches`' items, produced `size` ahead in a thread and moved to the device
    (split over a mesh by `sharding`, when given; or each array by `place(array)`).

    numpy's augmentation and the host-to-device copy overlap the device's work this way.
    An exception in the producer is raised in the consumer.
    """
    q = queue.Queue(maxsize=size)
    done, stop = object(), threading.Event()
    place = place or (lambda a: jax.device_put(a, sharding))

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
            for item in batches:
                if not put(tuple(place(a) for a in item)):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)
            return
        put(done)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _penalty(model, trainable):
    """The L2 penalties of the variables that carry a regularizer, at values `trainable`."""
    terms = [
        v.regularizer(w) for v, w in zip(model.trainable_variables, trainable) if v.regularizer
    ]
    return sum(terms) if terms else 0.0


class JaxRunner(runners.Runner):
    """`--loop=jax`: the jitted step over every device of every process (a runner of
    `controller.Controller`).

    One `Mesh` over `jax.devices()` (every process's, after `jax.distributed` started them):
    each batch split over its `"data"` axis, the state replicated (and donated to the
    step); XLA's partitioner makes the gradient all-reduce, and BatchNorm sees the global
    batch, as on one device. Each process feeds only its share of every batch (its rows:
    the data's `shard`), from which `jax.make_array_from_process_local_data` assembles the
    global batch. The processes agree on a stop through the step after it (`train`).

    Args:
        model: the model, compiled with its optimizer.
        label_smoothing: of the loss.
        devices: the devices of the mesh (default: `jax.devices()`).
        eval_batch_size: the global evaluation batch (each process pads its share to
            `eval_batch_size / processes`; default: the first batch, padded to the devices).
    """

    def __init__(self, model, *, label_smoothing=0.0, devices=None, eval_batch_size=None):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.model, self.optimizer = model, model.optimizer
        devices = np.asarray(devices if devices is not None else jax.devices())
        mesh = Mesh(devices, ("data",))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.split = NamedSharding(mesh, PartitionSpec("data"))
        self.devices, self.processes = devices.size, jax.process_count()
        # Every process's share of an evaluation batch has one size (one program for all).
        multi = eval_batch_size and self.processes > 1
        self.eval_share = eval_batch_size // self.processes if multi else None
        placed = (self.replicated, self.split)
        self.train_step = make_train_step(
            model, self.optimizer, label_smoothing=label_smoothing, mesh=placed
        )
        self.eval_step = make_eval_step(model, label_smoothing=label_smoothing, mesh=placed)
        self.largest = jax.jit(jnp.max, in_shardings=self.split, out_shardings=self.replicated)
        self.state = None

    def _state(self):
        if self.state is None:  # the model's variables, as the controller restored them
            self.state = jax.device_put(init_state(self.model, self.optimizer), self.replicated)
        return self.state

    def _global(self, local):
        """The global array of every process's `local` share (rows in process order)."""
        if self.processes == 1:
            return jax.device_put(local, self.split)
        return jax.make_array_from_process_local_data(self.split, np.asarray(local))

    def _wishes(self, wish):
        """A step's stop wishes: this process's on each of its devices."""
        return self._global(np.full(self.devices // self.processes, wish, np.int32))

    def train(self, inputs, steps, *, stop, progress, every):
        """`steps` steps of `inputs`; see `runners`. Host syncs happen only where a value
        is shown (every `every` steps). With several processes each step also carries the
        stop wishes after the step before it: all stop after that step, one step late."""
        state, sums, done, wish, agreed = self._state(), None, 0, 0, None
        for x, y in prefetch(runners.batches(inputs, steps), place=self._global):
            state, out = self.train_step(state, x, y)
            if agreed is not None and (wish := int(agreed)):
                agreed = None  # the processes agreed on a stop: this step is the last
            elif self.processes > 1 and done + 1 < steps:
                agreed = self.largest(self._wishes(stop(done + 1)))
            sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
            done += 1
            if done % every == 0 or done == steps:
                progress(done, self._sums(sums, done, len(y)))
            if wish or done == steps or (self.processes == 1 and (wish := stop(done))):
                break
        self.state = state
        return runners.Trained(done, self._sums(sums, done, len(y)) if done else {}, wish)

    @staticmethod
    def _sums(sums, steps, batch):
        out = {k: float(v) for k, v in sums.items()}
        return {**out, "examples": float(steps * batch), "steps": steps}

    def evaluate(self, inputs):
        """Loss (with the weight-decay penalty, as `model.evaluate` reports it), top-1,
        top-5 and the examples of `inputs`; a short batch is padded and masked, and with
        several processes every batch of any process is scored (the others add empty
        shares), each image once."""
        state, totals, n, size, shape = self._state(), np.zeros(3), 0, self.eval_share, None
        batches = iter(runners.batches(inputs))
        while True:
            item = next(batches, None)
            if self.processes > 1:
                if not self.agree(int(item is not None)):
                    break
                if item is None:  # this process's data ended before another's
                    item = tuple(np.zeros((0, *a.shape[1:]), a.dtype) for a in shape)
            elif item is None:
                break
            x, y = shape = item  # the last batch: the form of an empty share
            size = size or -(-len(x) // self.devices) * self.devices
            valid = np.arange(size) < len(x)
            if len(x) < size:  # one shape, one compilation
                pad = ((0, size - len(x)),)
                x, y = np.pad(x, pad + ((0, 0),) * (x.ndim - 1)), np.pad(y, pad)
            arrays = (self._global(a) for a in (x, y, valid))
            totals += np.array([float(t) for t in self.eval_step(state, *arrays)])
            n += int(valid.sum())
        n = sum(counts["n"] for counts in self.gather({"n": n}))
        loss, top1, top5 = totals / max(n, 1)
        penalty = float(_penalty(self.model, state[0]))
        return {"loss": loss + penalty, "top1": top1, "top5": top5, "examples": n}

    def sync(self):
        """Writes the state into the model's and the optimizer's variables (every process
        holds it whole: the local copy of each replicated array)."""
        if self.state is not None:
            local = jax.tree_util.tree_map(lambda a: a.addressable_data(0), self.state)
            assign_state(self.model, self.optimizer, local)

    def agree(self, wish):
        """The largest `wish` of every process."""
        if self.processes == 1:
            return wish
        return int(self.largest(self._wishes(wish)))

    def gather(self, value):
        """Every process's `value` (a dict of ints), in process order."""
        if self.processes == 1:
            return [value]
        from jax.experimental import multihost_utils

        keys = sorted(value)
        rows = multihost_utils.process_allgather(np.array([value[k] for k in keys], np.int64))
        return [dict(zip(keys, map(int, row))) for row in np.asarray(rows)]
