"""The engines the controller drives: each trains a given number of steps and evaluates.

A runner has `model`, `train(inputs, steps, *, stop, progress, every) -> Trained`,
`evaluate(inputs) -> {"loss", "top1", "top5", "examples"}`, `sync()` (writes a state it
keeps elsewhere into the model's variables, before a checkpoint), `gather(value)` (the
value of every process, in process order) and `agree(wish)` (the largest of every
process's). `train` calls `stop(done)` after each step (the stop this process wishes, 0 for
none; the runner stops after a step that every process agrees on) and `progress(done,
sums)` every `every` steps and after the last.

- `FitRunner` (`--loop=fit`): Keras' `model.fit` / `model.evaluate`, any backend;
- `custom_loop.TFRunner` (`--loop=custom`): a `tf.distribute` `strategy.run` step;
- `jax_loop.JaxRunner` (`--loop=jax`): a jitted JAX step over a device mesh.
"""

from typing import NamedTuple

import keras


class Trained(NamedTuple):
    """What a runner's `train` did: the steps it ran, the sums of their logs (`loss` over
    steps; `top1`, `top5` over `examples`; `examples`, `steps`), and the stop the processes
    agreed on when it ended early (`controller.SIGNAL`, `BUDGET`; 0 for none)."""

    steps: int
    sums: dict
    stop: int = 0


def sums_of(logs, steps):
    """`Trained.sums` of Keras' running means over `steps` steps (`examples` counted)."""
    logs = {k.replace("compile_metrics_", ""): float(v) for k, v in (logs or {}).items()}
    examples = logs.get("examples", 0.0)
    return {"loss": logs.get("loss", 0.0) * steps, "top1": logs.get("top1", 0.0) * examples,
            "top5": logs.get("top5", 0.0) * examples, "examples": examples, "steps": steps}  # fmt: skip


def batches(inputs, steps=None):
    """The numpy batches of a runner's input: an indexable `ArrayDataset` (from its current
    position; `steps` of them, default all), a `tf.data.Dataset` or any iterable of
    `(images, labels)`."""
    if hasattr(inputs, "as_numpy_iterator"):
        yield from inputs.as_numpy_iterator()
    elif hasattr(inputs, "__getitem__"):
        for i in range(len(inputs) if steps is None else steps):
            yield inputs[i]
    else:
        yield from inputs


class _Steps(keras.callbacks.Callback):
    """`model.fit`'s side of a runner's `train`: counts steps, reports, asks to stop."""

    def __init__(self, steps, stop, progress, every):
        super().__init__()
        self.steps, self.stop, self.progress, self.every = steps, stop, progress, every
        self.done, self.sums, self.wish = 0, sums_of({}, 0), 0

    def on_train_batch_end(self, batch, logs=None):
        self.done = batch + 1
        if self.done % self.every == 0 or self.done == self.steps:
            self.sums = sums_of(logs, self.done)
            self.progress(self.done, self.sums)
        if self.done < self.steps:
            self.wish = self.stop(self.done)
            self.model.stop_training = bool(self.wish)

    def on_epoch_end(self, epoch, logs=None):
        self.sums = sums_of(logs, self.done)


class Runner:
    """What every runner shares: one process's defaults of `sync`, `gather` and `agree`."""

    def sync(self):
        """The state is the model's variables."""

    def gather(self, value):
        return [value]

    def agree(self, wish):
        return wish


class FitRunner(Runner):
    """`--loop=fit`: each stretch of steps is one `model.fit` call of one epoch (the
    controller counts the run's epochs), so Keras' own train step runs on every backend
    and under `tf.distribute` or `keras.distribution` (which writes its state into the
    variables when `fit` returns).

    Args:
        model: compiled with the loss and `metrics.top_k_metrics` (which count `examples`).
    """

    def __init__(self, model):
        self.model = model

    def train(self, inputs, steps, *, stop, progress, every):
        counter = _Steps(steps, stop, progress, every)
        self.model.fit(inputs, epochs=1, steps_per_epoch=steps, callbacks=[counter], verbose=0,
                       shuffle=False)  # fmt: skip
        return Trained(counter.done, counter.sums, counter.wish)

    def evaluate(self, inputs):
        result = self.model.evaluate(inputs, verbose=0, return_dict=True)
        return {k.replace("compile_metrics_", ""): float(v) for k, v in result.items()}
