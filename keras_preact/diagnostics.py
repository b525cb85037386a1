"""Gradient diagnostics: how the loss gradient reaches each unit (the paper's Eqns. 5 and 8).

Eqn. 5: with identity shortcuts, dE/dx_l = dE/dx_L (1 + d/dx_l sum F), so the gradient of
the deep units reaches every shallow unit directly. Eqn. 8: with `x_{l+1} = lambda_l x_l + F`,
the direct term becomes prod(lambda_i) dE/dx_L, exponentially small (lambda < 1) or large
(lambda > 1) in the depth. `unit_gradient_norms` measures ||dL/dx_l|| for every unit output
`x_l` of a network with `probed_unit` units.

Gradients w.r.t. intermediate tensors need each backend's autodiff: every probed unit ends
with a `Probe` layer adding a zero trainable variable `delta` of the activation's full shape
(fixed batch), and dL/d(delta) = dL/dx_l, taken with `tf.GradientTape`, `jax.grad` over
`model.stateless_call` or torch autograd.

>>> import numpy as np, keras_preact
>>> from keras_preact import diagnostics
>>> model = keras_preact.PreActResNet(depth=14, block="basic", input_shape=(8, 8, 3),
...     unit=diagnostics.probed_unit("full_preact", batch_size=4), classifier_activation=None)
>>> x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype("float32")
>>> norms = diagnostics.unit_gradient_norms(model, x, np.array([0, 1, 2, 3]))
>>> [name for name, _ in norms][:2]
['conv2_block1', 'conv2_block2']
"""

import keras
import numpy as np
from keras import ops

from keras_preact import units


class Probe(keras.layers.Layer):
    """`x + delta`, `delta` a zero trainable variable of x's full shape: dL/d(delta) = dL/dx.

    Diagnostic only (its variable fixes the batch size); not registered for saving.

    Args:
        batch_size: the batch size the probed model will be called with.
    """

    def __init__(self, batch_size, **kwargs):
        super().__init__(**kwargs)
        self.batch_size = int(batch_size)

    def build(self, input_shape):
        self.delta = self.add_weight(
            shape=(self.batch_size, *input_shape[1:]), initializer="zeros", name="delta"
        )

    def call(self, x):
        return x + ops.cast(self.delta, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def probed_unit(unit, batch_size):
    """Wraps a unit (a Fig. 4 name or a callable) so its output passes through a `Probe`."""
    inner = units.make_unit(unit)

    def probed(x, *, name, **kwargs):
        return Probe(batch_size, name=f"{name}_probe")(inner(x, name=name, **kwargs))

    probed.head = getattr(inner, "head", None)
    return probed


def _loss(y, logits):
    return ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


def _probe_gradients(model, probes, x, y, training):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = _loss(y, model(x, training=training))
        return tape.gradient(loss, [p.delta.value for p in probes])
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        index = [next(i for i, v in enumerate(model.trainable_variables) if v is p.delta)
                 for p in probes]  # fmt: skip

        def loss_of_probes(deltas):
            values = list(trainable)
            for i, d in zip(index, deltas):
                values[i] = d
            logits, _ = model.stateless_call(values, non_trainable, x, training=training)
            return _loss(y, logits)

        return jax.grad(loss_of_probes)([trainable[i] for i in index])
    if backend == "torch":
        for p in probes:
            p.delta.value.grad = None
        loss = _loss(y, model(x, training=training))
        loss.backward()
        return [p.delta.value.grad for p in probes]
    raise NotImplementedError(f"unit_gradient_norms does not support backend {backend!r}.")


def unit_gradient_norms(model, x, y, *, training=True):
    """`[(unit_name, ||dL/dx_l||), ...]` for every `Probe` of `model`, in network order.

    L is the mean sparse cross-entropy of the model's logits (build it with
    `classifier_activation=None`) on `(x, y)`; the norm is over the whole batch tensor.

    Args:
        model: a model whose units come from `probed_unit`.
        x: a batch of inputs with exactly the probes' batch size.
        y: integer labels.
        training: True uses BatchNorm's batch statistics (as during SGD, the regime the
            paper's argument is about); False uses its moving statistics, which at
            initialization are the identity, i.e. a network without normalization.
    """
    probes = [layer for layer in model.layers if isinstance(layer, Probe)]
    if not probes:
        raise ValueError(f"Model {model.name!r} has no Probe layers; build it with probed_unit.")
    grads = _probe_gradients(model, probes, x, y, training)
    return [
        (p.name[: -len("_probe")], float(np.linalg.norm(ops.convert_to_numpy(g))))
        for p, g in zip(probes, grads)
    ]
