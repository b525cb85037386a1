"""`--loop=jax`: the trainer's jitted JAX step loop (JAX backend, numpy input pipeline).

The Keras model and optimizer are used as pure functions (`model.stateless_call`,
`optimizer.stateless_apply`): one `jax.jit` step with the state's buffers donated, so XLA
updates the weights in place; uint8 batches travel to the device from a background thread
and the model normalizes them itself. Everything else is the trainer's own: the loss
(`optimization.SparseCrossentropy`), the weight decay (the variables' L2 regularizers,
`optimization.add_weight_decay`), the learning-rate schedule (the optimizer's), the batch
stream (`numpy_pipeline.ArrayDataset`), and the epoch-end callbacks, among them the
`checkpoints.Checkpointer` that `model.fit` saves through: same checkpoint files, same
`log.csv`, same resume, same `evaluate.py`.

`make_train_step(..., seeds=S)` trains S copies of one architecture in one step (their
states stacked on a leading axis, the step `jax.vmap`ped), for experiments that want several
seeds at once (`benchmarks/gpu_throughput.py`).
"""

import queue
import threading
import time

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_preact.train import callbacks as callbacks_lib
from keras_preact.train import metrics, optimization


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


def make_train_step(model, optimizer, *, label_smoothing=0.0, seeds=1, donate=True):
    """A jitted `step(state, images, labels) -> (state, sums)`.

    The loss is the trainer's: mean cross-entropy (`SparseCrossentropy`, with label
    smoothing) plus the L2 penalties of the variables that carry a regularizer (what
    `model.fit` adds through `model.losses`). `sums` holds the batch's `loss` and its
    `top1` / `top5` counts, left on the device. With `seeds > 1`, the state is stacked over
    seeds and images are `(seeds, batch, ...)`.
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
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(model, *, label_smoothing=0.0):
    """A jitted `step(state, images, labels, valid) -> (loss_sum, top1, top5)` on a batch
    whose padding `valid` masks (every batch has one shape: one compilation)."""
    loss_fn = optimization.SparseCrossentropy(label_smoothing, reduction=None)

    def step(state, images, labels, valid):
        trainable, non_trainable, _ = state
        logits, _ = model.stateless_call(trainable, non_trainable, images, training=False)
        losses = loss_fn(labels, logits.astype(jnp.float32))
        top1, top5 = _counts(logits, labels)
        total = lambda x: jnp.sum(jnp.where(valid, x, 0))  # noqa: E731
        return total(losses), total(top1), total(top5)

    return jax.jit(step)


def prefetch(batches, size=3):
    """Yields `batches`' items, produced `size` ahead in a thread and moved to the device.

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
                if not put(tuple(jax.device_put(a) for a in item)):
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


def evaluate_state(eval_step, state, data, penalty=0.0):
    """`{"loss", "top1", "top5"}` over an evaluation `ArrayDataset` (ordered, uint8).

    The loss includes the weight-decay penalty, as `model.evaluate` reports it.
    """
    totals, n = np.zeros(3), 0
    for i in range(len(data)):
        x, y = data[i]
        valid = np.ones(data.batch_size, bool)
        if len(x) < data.batch_size:  # pad the last batch: one shape, one compilation
            pad = data.batch_size - len(x)
            valid[len(x) :] = False
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
        totals += np.array([float(t) for t in eval_step(state, x, y, valid)])
        n += int(valid.sum())
    loss, top1, top5 = totals / max(n, 1)
    return {"loss": loss + penalty, "top1": top1, "top5": top5}


def _penalty(model, trainable):
    """The L2 penalties of the variables that carry a regularizer, at values `trainable`."""
    terms = [
        v.regularizer(w) for v, w in zip(model.trainable_variables, trainable) if v.regularizer
    ]
    return sum(terms) if terms else 0.0


class Loop:
    """The jitted loop of one run: its steps, compiled once, and the model's state."""

    def __init__(self, model, *, label_smoothing=0.0):
        if keras.distribution.distribution() is not None:
            raise ValueError(
                "--loop=jax runs on one device; with several, use --loop=fit "
                "(keras.distribution.DataParallel)."
            )
        self.model, self.optimizer = model, model.optimizer
        self.step_index = next(
            i for i, v in enumerate(self.optimizer.variables) if v is self.optimizer.iterations
        )
        self.train_step = make_train_step(model, self.optimizer, label_smoothing=label_smoothing)
        self.eval_step = make_eval_step(model, label_smoothing=label_smoothing)

    def evaluate(self, data, state=None):
        """`evaluate_state` at `state` (default: the model's variables), penalty included."""
        if state is None:
            state = init_state(self.model, self.optimizer)
        penalty = float(_penalty(self.model, state[0]))
        return evaluate_state(self.eval_step, state, data, penalty)

    def train_epoch(self, state, data, *, steps, bar, max_steps=None, on_batch=None, stop=None):
        """Runs `steps` batches of `data` (an `ArrayDataset` at its epoch); returns
        `(state, logs)`, with `logs["steps"]` the steps run. Host syncs happen only where a
        value is shown or checked. A `callbacks.StopRequest` `stop` that has seen a signal
        ends the epoch at the next step boundary."""
        sums, every = None, 10 if bar.verbose == 1 else steps
        first = int(state[2][self.step_index])
        n_steps = steps if not max_steps else max(0, min(steps, max_steps - first))
        batches = prefetch(data[i] for i in range(n_steps))
        for i, (x, y) in enumerate(batches):
            state, out = self.train_step(state, x, y)
            sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
            if stop is not None and stop.signum is not None:
                n_steps = i + 1
            if (i + 1) % every == 0 or i + 1 == n_steps:
                logs = {
                    "loss": float(sums["loss"]) / (i + 1),
                    "top1": float(sums["top1"]) / ((i + 1) * data.batch_size),
                    "top5": float(sums["top5"]) / ((i + 1) * data.batch_size),
                }
                bar.update(i + 1, list(logs.items()))
                if on_batch is not None:
                    on_batch(i, logs)
            if i + 1 == n_steps:
                break
        return state, ({**logs, "steps": n_steps} if sums is not None else {})


def fit(cfg, built, train_data, val_data, *, checkpointer, initial_epoch, initial_step=0,
        extra_callbacks=(), stop=None):  # fmt: skip
    """Trains `built.model` to `cfg.epochs` with the jitted step; saves every epoch.

    Args:
        cfg: the run's config (epochs, steps_per_epoch, max_steps, verbose, label_smoothing).
        built: `modeling.Built` (the model is compiled with its optimizer).
        train_data: a training `numpy_pipeline.ArrayDataset` (uint8 batches).
        val_data: an evaluation `ArrayDataset`, or None.
        checkpointer: the run's `checkpoints.Checkpointer`.
        initial_epoch: epochs already done (restored into the model).
        initial_step: steps of the next epoch done (`train_data.offset`, set on restore).
        extra_callbacks: more Keras callbacks called at each epoch end (a time budget).
        stop: a `callbacks.StopRequest`: after a signal, the state is checkpointed at the
            next step boundary and `callbacks.Interrupted` raised.

    Returns:
        The `Loop` (its compiled evaluation step serves the final evaluation).
    """
    model = built.model
    loop = Loop(model, label_smoothing=cfg.label_smoothing)
    cbs = keras.callbacks.CallbackList(
        [
            callbacks_lib.InputEpoch(train_data),
            *callbacks_lib.epoch_callbacks(checkpointer),
            *extra_callbacks,
        ],
        model=model,
    )
    guard = callbacks_lib.NaNGuard()
    state = init_state(model, loop.optimizer)
    model.stop_training = False
    for epoch in range(initial_epoch, cfg.epochs):
        if cfg.verbose:
            print(f"Epoch {epoch + 1}/{cfg.epochs}", flush=True)
        cbs.on_epoch_begin(epoch)
        guard.on_epoch_begin(epoch)
        offset = initial_step if epoch == initial_epoch else 0
        bar = keras.utils.Progbar(cfg.steps_per_epoch - offset, verbose=int(cfg.verbose == 1))
        start = time.time()
        state, logs = loop.train_epoch(
            state,
            train_data,
            steps=cfg.steps_per_epoch - offset,
            bar=bar,
            max_steps=cfg.max_steps,
            on_batch=guard.on_train_batch_end,
            stop=stop,
        )
        done = offset + logs.pop("steps", 0)
        if stop is not None and stop.signum is not None and done < cfg.steps_per_epoch:
            assign_state(model, loop.optimizer, state)
            checkpointer.save(model, epoch=epoch, logs={}, step=done)
            raise callbacks_lib.Interrupted(
                stop.signum, saved=True, where=f"at step {done} of epoch {epoch + 1}"
            )
        logs["epoch_time_s"] = time.time() - start
        if val_data is not None:
            logs.update({"val_" + k: v for k, v in loop.evaluate(val_data, state).items()})
        assign_state(model, loop.optimizer, state)
        if cfg.verbose:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), flush=True)
        cbs.on_epoch_end(epoch, logs)
        if stop is not None and stop.signum is not None:
            raise callbacks_lib.Interrupted(
                stop.signum, saved=True, where=f"after epoch {epoch + 1}"
            )
        steps = int(metrics.scalar(loop.optimizer.iterations))
        if model.stop_training or (cfg.max_steps and steps >= cfg.max_steps):
            break
    return loop
