"""Top-1 / top-5 accuracy, reading numbers back from variables, and counting FLOPs.

Labels are integers in every pipeline and both loops (label smoothing happens inside the
loss, `optimization.SparseCrossentropy`), so the metrics are always the sparse ones.
"""

import keras


class Examples(keras.metrics.Sum):
    """The number of examples seen: a sum, exact under every distribution strategy (its
    variable is summed over replicas), so `model.fit` and `model.evaluate` count like the
    other loops."""

    def __init__(self, name="examples", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = keras.ops.reshape(y_true, (-1,))
        super().update_state(keras.ops.ones_like(labels, dtype=self.dtype))


def top_k_metrics(num_classes):
    """top-1 and top-5 (top-k with k = classes when there are fewer than 5) of integer
    labels, and the `Examples` they were counted on."""
    return [
        keras.metrics.SparseCategoricalAccuracy(name="top1"),
        keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
        Examples(),
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


def multiply_adds(model):
    """Multiply-adds of one image's forward pass through the conv and dense layers.

    The usual convention (He et al. count FLOPs this way): BatchNorm, activations, pooling
    and additions are left out. A training step costs about 3x this (forward, then two
    products per layer backward), i.e. `6 * multiply_adds(model)` floating-point
    operations per image. Nested models are walked through `model.layers`.

    A net built with `scan_units=True` holds its repeated units in one `Scan` layer whose
    convolutions have no static output shapes to count: count its written-out twin
    (`scan_units=False`, same arguments otherwise), whose FLOPs are the same.

    Args:
        model: a built Functional or Sequential `keras.Model` (its layers' input and output
            shapes are read).

    Returns:
        An int.

    Raises:
        ValueError: the model contains a `keras_preact.scan.Scan` layer.

    Example:

    >>> import keras_preact
    >>> m = keras_preact.PreActResNet20(input_shape=(32, 32, 3), classes=10)
    >>> round(multiply_adds(m) / 1e6, 1)  # millions
    40.8
    """
    from keras_preact import scan

    total = 0
    for layer in model.layers:
        if isinstance(layer, scan.Scan):
            raise ValueError(
                f"multiply_adds: layer {layer.name!r} is a Scan (a net built with "
                "scan_units=True); count its written-out twin, built with scan_units=False "
                "and otherwise the same arguments: its FLOPs are the same."
            )
        if isinstance(layer, keras.Model):
            total += multiply_adds(layer)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            out, k = layer.output.shape, layer.kernel_size[0] * layer.kernel_size[1]
            total += _positions(out, layer.data_format) * _channels(out, layer.data_format) * k
        elif isinstance(layer, keras.layers.Conv2D):
            c_in = _channels(layer.input.shape, layer.data_format)
            k = layer.kernel_size[0] * layer.kernel_size[1]
            positions = _positions(layer.output.shape, layer.data_format)
            total += positions * k * (c_in // layer.groups) * layer.filters
        elif isinstance(layer, keras.layers.Dense):
            shape = layer.input.shape
            positions = 1
            for d in shape[1:-1]:
                positions *= d
            total += positions * shape[-1] * layer.units
    return int(total)


def _channels(shape, data_format):
    return shape[-1] if data_format == "channels_last" else shape[1]


def _positions(shape, data_format):
    """Output positions (height x width) of a 2-D convolution's output shape."""
    h, w = (shape[1], shape[2]) if data_format == "channels_last" else (shape[2], shape[3])
    return h * w
