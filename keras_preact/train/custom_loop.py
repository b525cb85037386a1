"""A `strategy.run` training loop for TensorFlow strategies.

Keras 3.15's `model.fit` fails under `tf.distribute.MultiWorkerMirroredStrategy`
(keras-team/keras#20585). This runner avoids the Keras trainer: the Keras model and
optimizer are plain objects, the loss is averaged over the global batch
(`tf.nn.compute_average_loss`), the Keras TF optimizer all-reduces (sums) the gradients in
`apply`, metrics are per-replica counts summed with `strategy.reduce`. It works under every
TF strategy; under another backend `--loop=custom` is refused when the flags are parsed.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_preact.train import optimization, runners


def _counts(labels, logits):
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    logits = tf.cast(logits, tf.float32)
    top1 = tf.reduce_sum(
        tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
    )
    k = min(5, logits.shape[-1])
    top5 = tf.reduce_sum(tf.cast(tf.nn.in_top_k(labels, logits, k), tf.float32))
    return top1, top5, tf.cast(tf.shape(labels)[0], tf.float32)


def _per_example_loss(labels, logits, label_smoothing=0.0):
    loss = optimization.SparseCrossentropy(label_smoothing, reduction=None)
    return loss(labels, tf.cast(logits, tf.float32))


def make_train_step(model, strategy, global_batch_size, *, jit_compile=False, label_smoothing=0.0):
    """Returns `step(iterator, wish) -> (loss, top1, top5, examples, stop)` summed over
    replicas; `stop` is 1 when any replica's `wish` (a stop its process wants) was 1, so
    every worker stops after the same step."""
    replicas = strategy.num_replicas_in_sync
    optimizer = model.optimizer

    def step_fn(images, labels, wish):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = _per_example_loss(labels, logits, label_smoothing)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
            if model.losses:
                # Each replica adds 1/R of the L2 term: the gradient all-reduce sums it back.
                loss += tf.add_n(model.losses) / replicas
            scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return (loss, *_counts(labels, logits), _one_hot(wish))

    @tf.function(jit_compile=jit_compile and replicas == 1)
    def step(iterator, wish):
        images, labels = next(iterator)
        *sums, stop = strategy.run(step_fn, args=(images, labels, wish))
        reduced = [strategy.reduce("SUM", t, axis=None) for t in sums]
        return [*reduced, _largest(strategy, stop)]

    return step


def _one_hot(wish):
    """A replica's stop wish (0, 1 or 2: `controller.BUDGET`, `SIGNAL`), one-hot: summed
    over the replicas, it says which wishes any replica had (`_largest`)."""
    return tf.one_hot(wish, 3, dtype=tf.int32)


def _largest(strategy, wishes):
    """The largest wish of the replicas' one-hot `wishes` (`strategy.reduce` only sums or
    averages)."""
    counts = strategy.reduce("SUM", wishes, axis=None)
    return tf.reduce_max(tf.where(counts > 0, tf.range(3), 0))


def make_eval_step(model, strategy, *, label_smoothing=0.0):
    """Returns `step(batch) -> (loss_sum, top1_count, top5_count, n)` summed over replicas
    (the loss with its label smoothing, as `model.evaluate` reports it under `fit`)."""

    def step_fn(images, labels):
        logits = model(images, training=False)
        per_example = _per_example_loss(labels, logits, label_smoothing)
        return (tf.reduce_sum(per_example), *_counts(labels, logits))

    @tf.function
    def step(batch):
        per_replica = strategy.run(step_fn, args=batch)
        return [strategy.reduce("SUM", t, axis=None) for t in per_replica]

    return step


class TFRunner(runners.Runner):
    """`--loop=custom`: the `strategy.run` loop (a runner of `controller.Controller`).

    Args:
        model: compiled with its optimizer (the checkpoint holds both).
        strategy: a `tf.distribute.Strategy`.
        global_batch_size: the global batch (the loss is averaged over it).
        jit_compile: XLA-compile the step (one replica only).
        label_smoothing: of the loss.
    """

    def __init__(self, model, strategy, global_batch_size, *, jit_compile=False,
                 label_smoothing=0.0):  # fmt: skip
        self.model, self.strategy = model, strategy
        self.step = make_train_step(model, strategy, global_batch_size, jit_compile=jit_compile,
                                    label_smoothing=label_smoothing)  # fmt: skip
        self.eval_step = make_eval_step(model, strategy, label_smoothing=label_smoothing)

    def train(self, inputs, steps, *, stop, progress, every):
        """`steps` steps of the distributed dataset `inputs`; see `runners`."""
        iterator, totals, wish, done, agreed = iter(inputs), np.zeros(4), tf.constant(0), 0, 0
        while done < steps and not agreed:
            *out, agreed = self.step(iterator, wish)
            totals += np.array([float(t) for t in out])
            done, agreed = done + 1, int(agreed)
            if done % every == 0 or done == steps or agreed:
                progress(done, self._sums(totals, done))
            # The wish travels with the next step: all workers stop after that one.
            wish = tf.constant(stop(done) if done < steps else 0)
        return runners.Trained(done, self._sums(totals, done), agreed)

    @staticmethod
    def _sums(totals, steps):
        loss, top1, top5, n = totals
        return {"loss": loss, "top1": top1, "top5": top5, "examples": n, "steps": steps}

    def evaluate(self, inputs):
        """Loss (with the weight-decay penalty, as `model.evaluate` reports it), top-1,
        top-5 and the number of examples over a distributed evaluation dataset."""
        totals = np.zeros(4)
        for batch in inputs:
            totals += np.array([float(t) for t in self.eval_step(batch)])
        loss, top1, top5, n = totals
        penalty = sum(float(keras.ops.convert_to_numpy(x)) for x in self.model.losses)
        seen = max(n, 1.0)
        return {"loss": loss / seen + penalty, "top1": top1 / seen, "top5": top5 / seen,
                "examples": n}  # fmt: skip

    def agree(self, wish):
        """The largest `wish` over the workers (each worker's replicas wish alike)."""
        return int(_largest(self.strategy, self.strategy.run(lambda: _one_hot(wish))))

    def gather(self, value):
        """Every worker's `value` (a dict of ints), in worker order: each worker's first
        replica adds its values to its row of a table summed over the replicas."""
        from keras_preact.train import distribution

        workers = distribution.num_workers(self.strategy)
        if workers == 1:
            return [value]
        keys = sorted(value)
        table = np.zeros((workers, len(keys)), np.int64)
        table[distribution.worker_index(self.strategy)] = [value[k] for k in keys]
        local = self.strategy.num_replicas_in_sync // workers

        def mine():
            first = tf.distribute.get_replica_context().replica_id_in_sync_group % local == 0
            return tf.constant(table) * tf.cast(first, tf.int64)

        total = self.strategy.reduce("SUM", self.strategy.run(mine), axis=None).numpy()
        return [dict(zip(keys, map(int, row))) for row in total]
