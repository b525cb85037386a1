"""Top-1 / top-5 accuracy and reading numbers back from variables.

Labels are integers in every pipeline and both loops (label smoothing happens inside the
loss, `optimization.SparseCrossentropy`), so the metrics are always the sparse ones.
"""

import keras


def top_k_metrics(num_classes):
    """top-1 and top-5 (top-k with k = classes when there are fewer than 5) of integer labels."""
    return [
        keras.metrics.SparseCategoricalAccuracy(name="top1"),
        keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
    ]


def scalar(value):
    """A Python float from a Keras/TF variable or tensor (also a MirroredVariable)."""
    value = getattr(value, "value", value)
    if hasattr(value, "numpy"):
        return float(value.numpy())
    return float(keras.ops.convert_to_numpy(value))


def learning_rate(optimizer):
    """The learning rate the optimizer applies at its current iteration."""
    return scalar(optimizer.learning_rate)
