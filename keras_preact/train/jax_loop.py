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


def prefetch(batches, size=3, sharding=None):
    """Yields `batches`' items, produced `size` ahead in a thread and moved to the device
    (split over a mesh by `sharding`, when given).

    numpy's augmentation and the host-to-device copy overlap the device's work this way.
    An exception in the producer is raised in the consumer.
    """
    q = queue.Queue(maxsize=size)
    done, stop = object(), threading.Event()

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
                if not put(tuple(jax.device_put(a, sharding) for a in item)):
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


def _batches(inputs, steps=None):
    """The numpy batches of a runner's input: an indexable `ArrayDataset` (from its current
    position), a `tf.data.Dataset` or any iterable of `(images, labels)`."""
    if hasattr(inputs, "as_numpy_iterator"):
        yield from inputs.as_numpy_iterator()
    elif hasattr(inputs, "__getitem__"):
        for i in range(len(inputs) if steps is None else steps):
            yield inputs[i]
    else:
        yield from inputs


def _penalty(model, trainable):
    """The L2 penalties of the variables that carry a regularizer, at values `trainable`."""
    terms = [
        v.regularizer(w) for v, w in zip(model.trainable_variables, trainable) if v.regularizer
    ]
    return sum(terms) if terms else 0.0


class JaxRunner(runners.Runner):
    """`--loop=jax`: the jitted step over every local device (a runner of
    `controller.Controller`).

    One `Mesh` over `jax.devices()`: each batch split over its `"data"` axis, the state
    replicated (and donated to the step); XLA's partitioner makes the gradient all-reduce,
    and BatchNorm sees the global batch, as on one device.

    Args:
        model: the model, compiled with its optimizer.
        label_smoothing: of the loss.
        devices: the devices of the mesh (default: `jax.devices()`).
    """

    def __init__(self, model, *, label_smoothing=0.0, devices=None):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.model, self.optimizer = model, model.optimizer
        devices = np.asarray(devices if devices is not None else jax.devices())
        mesh = Mesh(devices, ("data",))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.split = NamedSharding(mesh, PartitionSpec("data"))
        self.devices = devices.size
        placed = (self.replicated, self.split)
        self.train_step = make_train_step(
            model, self.optimizer, label_smoothing=label_smoothing, mesh=placed
        )
        self.eval_step = make_eval_step(model, label_smoothing=label_smoothing, mesh=placed)
        self.state = None

    def _state(self):
        if self.state is None:  # the model's variables, as the controller restored them
            self.state = jax.device_put(init_state(self.model, self.optimizer), self.replicated)
        return self.state

    def train(self, inputs, steps, *, stop, progress, every):
        """`steps` steps of `inputs`; see `runners`. Host syncs happen only where a value
        is shown (every `every` steps)."""
        state, sums, done, wish = self._state(), None, 0, 0
        for x, y in prefetch(_batches(inputs, steps), sharding=self.split):
            state, out = self.train_step(state, x, y)
            sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
            done += 1
            if done % every == 0 or done == steps:
                progress(done, self._sums(sums, done, len(y)))
            if done == steps or (wish := stop(done)):
                break
        self.state = state
        return runners.Trained(done, self._sums(sums, done, len(y)) if done else {}, wish)

    @staticmethod
    def _sums(sums, steps, batch):
        out = {k: float(v) for k, v in sums.items()}
        return {**out, "examples": float(steps * batch), "steps": steps}

    def evaluate(self, inputs):
        """Loss (with the weight-decay penalty, as `model.evaluate` reports it), top-1,
        top-5 and the examples of `inputs`; a short last batch is padded and masked."""
        state, totals, n, size = self._state(), np.zeros(3), 0, None
        for x, y in _batches(inputs):
            size = size or -(-len(x) // self.devices) * self.devices
            valid = np.arange(size) < len(x)
            if len(x) < size:  # one shape, one compilation
                pad = ((0, size - len(x)),)
                x, y = np.pad(x, pad + ((0, 0),) * (x.ndim - 1)), np.pad(y, pad)
            totals += np.array([float(t) for t in self.eval_step(state, x, y, valid)])
            n += int(valid.sum())
        loss, top1, top5 = totals / max(n, 1)
        penalty = float(_penalty(self.model, state[0]))
        return {"loss": loss + penalty, "top1": top1, "top5": top5, "examples": n}

    def sync(self):
        """Writes the state into the model's and the optimizer's variables."""
        if self.state is not None:
            assign_state(self.model, self.optimizer, self.state)
