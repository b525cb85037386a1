"""A `strategy.run` training loop for TensorFlow strategies.

Keras 3.15's `model.fit` fails under `tf.distribute.MultiWorkerMirroredStrategy`
(keras-team/keras#20585: a PerReplica error while building and "Invalid
reduction dimension 0" while reducing metrics). This loop avoids the Keras
trainer altogether: the Keras model and optimizer are used as plain objects, the
loss is averaged over the global batch with `tf.nn.compute_average_loss`, the
Keras TF optimizer all-reduces (sums) the gradients across replicas in
`apply`, and metrics are per-replica counts summed with `strategy.reduce`.
It works under every TF strategy, which is how the tests compare it with `fit`; under
another backend `--loop=custom` is refused when the flags are parsed.
"""

import os
import time

import keras
import numpy as np
import tensorflow as tf

from keras_preact.train import callbacks, metrics, optimization


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


def make_train_step(
    model, optimizer, strategy, global_batch_size, *, jit_compile=False, label_smoothing=0.0
):
    """Returns `step(iterator) -> (loss, top1_count, top5_count, n)` summed over replicas."""
    replicas = strategy.num_replicas_in_sync

    def step_fn(images, labels):
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
        return (loss, *_counts(labels, logits))

    @tf.function(jit_compile=jit_compile and replicas == 1)
    def step(iterator):
        per_replica = strategy.run(step_fn, args=next(iterator))
        return [strategy.reduce("SUM", t, axis=None) for t in per_replica]

    return step


def make_sync_step(model, strategy):
    """Averages BatchNorm moving statistics over all replicas (timm's `distribute_bn`).

    Each replica updates its own moving mean and variance from its own batches;
    without this, workers would end an epoch with different statistics.
    """
    variables = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]

    @tf.function
    def sync():
        def fn():
            ctx = tf.distribute.get_replica_context()
            for v in variables:
                v.assign(ctx.all_reduce("MEAN", tf.identity(v.value)))

        strategy.run(fn)

    return sync


def make_eval_step(model, strategy, *, label_smoothing=0.0):
    """Returns `step(batch) -> (loss_sum, top1_count, top5_count, n)` summed over replicas.

    The loss is the training loss (with its label smoothing), as `model.evaluate`
    reports it in the `fit` loop.
    """

    def step_fn(images, labels):
        logits = model(images, training=False)
        per_example = _per_example_loss(labels, logits, label_smoothing)
        return (tf.reduce_sum(per_example), *_counts(labels, logits))

    @tf.function
    def step(batch):
        per_replica = strategy.run(step_fn, args=batch)
        return [strategy.reduce("SUM", t, axis=None) for t in per_replica]

    return step


def evaluate(model, strategy, dist_dataset, *, label_smoothing=0.0):
    """Loss, top-1 and top-5 over a distributed evaluation dataset.

    The loss includes the weight-decay penalty, as `model.evaluate` reports it.
    """
    step = make_eval_step(model, strategy, label_smoothing=label_smoothing)
    totals = np.zeros(4)
    for batch in dist_dataset:
        totals += np.array([float(t) for t in step(batch)])
    loss, top1, top5, n = totals
    n = max(n, 1.0)
    penalty = sum(float(keras.ops.convert_to_numpy(x)) for x in model.losses)
    return {"loss": loss / n + penalty, "top1": top1 / n, "top5": top5 / n}


def fit(
    model,
    strategy,
    train_dist_dataset,
    *,
    checkpointer,
    epochs,
    steps_per_epoch,
    global_batch_size,
    log_dir,
    chief=True,
    initial_epoch=0,
    val_dist_dataset_fn=None,
    max_steps=None,
    jit_compile=False,
    verbose=1,
    label_smoothing=0.0,
    budget=None,
    initial_step=0,
    stop=None,
):
    """Trains with `strategy.run`, checkpointing and logging like `model.fit`.

    Args:
        model: the model, compiled with its optimizer (the checkpoint saves both).
        strategy: a `tf.distribute.Strategy`.
        train_dist_dataset: the distributed training dataset (repeats forever).
        checkpointer: the run's `checkpoints.Checkpointer`; saves the checkpoint and
            `log.csv` after every epoch.
        epochs: train until this epoch.
        steps_per_epoch: steps per epoch.
        global_batch_size: the global batch size (the loss is averaged over it).
        log_dir: this worker's write folder (created here).
        chief: whether this worker prints progress.
        initial_epoch: epochs already done (resumed runs).
        val_dist_dataset_fn: returns the distributed validation dataset, or None.
        max_steps: stop after this many optimizer steps in total.
        jit_compile: XLA-compile the step (single replica only).
        verbose: 0 silent, 1 progress bar, 2 one line per epoch.
        label_smoothing: of the loss.
        budget: a `callbacks.TimeBudget` (checked after each epoch's checkpoint), or None.
        initial_step: steps of epoch `initial_epoch` already done (a mid-epoch resume).
        stop: a `callbacks.StopRequest`: after a signal (sent to every worker), the state
            is checkpointed at the next step boundary and `callbacks.Interrupted` raised.
    """
    optimizer = model.optimizer
    os.makedirs(log_dir, exist_ok=True)
    guard = callbacks.NaNGuard()
    step = make_train_step(
        model,
        optimizer,
        strategy,
        global_batch_size,
        jit_compile=jit_compile,
        label_smoothing=label_smoothing,
    )
    sync = make_sync_step(model, strategy)
    iterator = iter(train_dist_dataset)
    for epoch in range(initial_epoch, epochs):
        if budget is not None:
            budget.on_epoch_begin(epoch)
        if verbose and chief:
            print(f"Epoch {epoch + 1}/{epochs}", flush=True)
        bar = keras.utils.Progbar(
            steps_per_epoch,
            verbose=verbose if chief else 0,
            stateful_metrics=["loss", "top1", "top5", "lr"],
        )
        totals = np.zeros(4)
        start = time.time()
        guard.on_epoch_begin(epoch)
        first = initial_step if epoch == initial_epoch else 0
        for i in range(first, steps_per_epoch):
            if stop is not None and stop.signum is not None and i > first:
                sync()
                checkpointer.save(model, epoch=epoch, logs={}, step=i)
                raise callbacks.Interrupted(
                    stop.signum, saved=True, where=f"at step {i} of epoch {epoch + 1}"
                )
            out = np.array([float(t) for t in step(iterator)])
            totals += out
            logs = {
                "loss": totals[0] / (i + 1 - first),
                "top1": totals[1] / totals[3],
                "top5": totals[2] / totals[3],
            }
            guard.on_train_batch_end(i, {"loss": out[0]})
            bar.update(i + 1, [(k, v) for k, v in logs.items()])
            if max_steps and int(metrics.scalar(optimizer.iterations)) >= max_steps:
                break
        sync()
        logs["epoch_time_s"] = time.time() - start
        logs["lr"] = metrics.learning_rate(optimizer)
        if val_dist_dataset_fn is not None:
            val = evaluate(model, strategy, val_dist_dataset_fn(), label_smoothing=label_smoothing)
            for k, v in val.items():
                logs["val_" + k] = v
        if verbose and chief:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in logs.items()), flush=True)
        callbacks.check_finite(model, logs, epoch + 1)
        checkpointer.save(model, epoch=epoch + 1, logs=logs)  # also writes log.csv
        if stop is not None and stop.signum is not None:
            raise callbacks.Interrupted(stop.signum, saved=True, where=f"after epoch {epoch + 1}")
        if budget is not None:
            budget.on_epoch_end(epoch)
        if max_steps and int(metrics.scalar(optimizer.iterations)) >= max_steps:
            break
        if budget is not None and budget.stopped:
            break
