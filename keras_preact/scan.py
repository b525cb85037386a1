"""`Scan`: a run of identical residual units applied as one loop over stacked weights.

A stage of PreActResNet1001 repeats one unit 110 times. Written out, every repetition is
its own piece of the traced program, and XLA's compile time grows with the program (JAX's
first training step of PreActResNet1001 takes minutes on a CPU). `Scan` builds the unit
once, as a small functional "template" model, holds each of its variables stacked along a
new leading axis (one slice per unit) and applies the template to each slice in turn with
`keras.ops.scan`: the compiled program contains one unit per stage, whatever the depth
(the idea of Flax's `nn.scan`).

What changes against the written-out units (`scan_units=True` in the builders):

- one layer, named `{first unit}_to_{last block}_out` (e.g. `conv2_block2_to_18_out`),
  replaces the units' layers, so `model.get_layer("conv2_block5_1_conv")` and the other
  per-unit names do not exist; its weights are the units' weights stacked, in the order of
  the template's variables, so `model.get_weights()` has another order and shapes;
- parameter count, outputs, gradients and BatchNorm updates are the same;
- `unit_weights` / `set_unit_weights` / `copy_weights` move weights between the two
  layouts by the per-unit layer names (`conv{s}_block{b}_*`), so a checkpoint of either
  loads into the other.

Units with random state (drop path, dropout shortcut) are refused: one template would give
every unit the same random stream.

>>> import keras
>>> from keras_preact import scan
>>> def unit(x, *, name):
...     y = keras.layers.Conv2D(4, 3, padding="same", name=f"{name}_conv")(x)
...     return keras.layers.Add(name=f"{name}_out")([x, y])
>>> inputs = keras.Input((8, 8, 4))
>>> outputs = scan.scan_units(inputs, unit, names=["s_block1", "s_block2", "s_block3"])
>>> model = keras.Model(inputs, outputs)
>>> model.layers[1].name, [tuple(w.shape) for w in model.weights]
('s_block1_to_3_out', [(3, 3, 3, 4, 4), (3, 4)])
>>> sorted(scan.unit_weights(model))
['s_block1_conv', 's_block2_conv', 's_block3_conv']
"""

import re

import keras
import numpy as np
from keras import ops

_PACKAGE = "keras_preact"

#: The unit prefix the template's layers are built with (`unit_1_conv`, ...).
TEMPLATE_PREFIX = "unit"


class _Hidden:
    """Keeps the template out of Keras' tracking: its variables are not the layer's own
    (the stacked ones are), so they must not be counted, trained or saved."""

    def __init__(self, model):
        self.model = model


def _variable_layers(template):
    """`{id(variable): (layer, variable)}` for every variable of the template."""
    return {id(v): (layer, v) for layer in template.layers for v in layer.weights}


def _check_template(template):
    if not isinstance(template, keras.Model):
        raise TypeError(
            f"Scan needs a keras.Model template (one unit built on a symbolic input); "
            f"received template={template!r}."
        )
    if len(template.inputs) != 1 or len(template.outputs) != 1:
        raise ValueError(
            f"Scan's template {template.name!r} must have one input and one output; it has "
            f"{len(template.inputs)} and {len(template.outputs)}."
        )
    in_shape = tuple(template.inputs[0].shape[1:])
    out_shape = tuple(template.outputs[0].shape[1:])
    if in_shape != out_shape:
        raise ValueError(
            f"Scan repeats a unit on its own output, so the template {template.name!r} must "
            f"keep its input shape; it maps {in_shape} to {out_shape} (a strided or "
            "projection unit cannot be scanned)."
        )
    random = [v.path for v in template.non_trainable_variables if "seed_generator" in v.path]
    if random:
        raise ValueError(
            f"Scan cannot repeat a unit with random state ({random[0]}): every unit would "
            "draw the same random numbers. Build without drop path and without the dropout "
            "shortcut, or without scan_units."
        )
    owners = _variable_layers(template)
    for v in template.weights:
        layer, _ = owners[id(v)]
        if not layer.name.startswith(TEMPLATE_PREFIX):
            raise ValueError(
                f"Scan's template layer {layer.name!r} is not named from the unit prefix "
                f"{TEMPLATE_PREFIX!r}; the per-unit weight names could not be derived."
            )


def _stacked_initializer(layer, variable, count):
    """Draws `count` independent values of a template variable from its layer's initializer."""
    init = getattr(layer, f"{variable.name}_initializer", None)
    if init is None:
        raise ValueError(
            f"Scan cannot find how layer {layer.name!r} initializes {variable.name!r} (no "
            f"`{variable.name}_initializer` attribute); build that unit without scan_units."
        )
    init = keras.initializers.get(init)

    def initializer(shape, dtype=None):
        # One copy per unit: an unseeded Keras initializer fixes its seed when created and
        # repeats its values, while each written-out layer has its own (a seeded one keeps
        # its seed in the copy, as written-out layers sharing it would).
        copies = [type(init).from_config(init.get_config()) for _ in range(count)]
        return ops.stack([c(tuple(shape[1:]), dtype=dtype) for c in copies])

    return initializer


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Scan(keras.layers.Layer):
    """Applies one unit `len(unit_names)` times, each time with its own slice of weights.

    Args:
        template: a `keras.Model` of one unit, built on a symbolic input of the unit's
            input shape, its layers named from `TEMPLATE_PREFIX` (a serialized model
            dict is accepted, as `from_config` passes it).
        unit_names: the prefix each repetition has in the written-out network
            (`["conv2_block2", ..., "conv2_block18"]`), in order; their number is the number
            of repetitions. Used to convert weights (`unit_weights`).
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`).

    Variables: for each template variable (trainable first, in the template's order, then
    non-trainable), one variable of shape `(len(unit_names), *shape)`; slice `i` belongs to
    `unit_names[i]`. Each slice is drawn from the template layer's own initializer.
    """

    def __init__(self, template, unit_names, **kwargs):
        super().__init__(**kwargs)
        if isinstance(template, dict):
            template = keras.saving.deserialize_keras_object(template)
        _check_template(template)
        if isinstance(unit_names, str) or len(unit_names) < 1:
            raise ValueError(
                f"unit_names={unit_names!r} must be a non-empty list of unit prefixes."
            )
        self._template = _Hidden(template)
        self.unit_names = tuple(str(n) for n in unit_names)
        self.supports_masking = False

    def get_template(self):
        """The template unit model (its own variables are unused: the stacks hold the values)."""
        return self._template.model

    def build(self, input_shape):
        template = self.get_template()
        expected = tuple(template.inputs[0].shape[1:])
        if len(input_shape) != len(expected) + 1 or any(
            e is not None and s is not None and e != s for e, s in zip(expected, input_shape[1:])
        ):
            raise ValueError(
                f"Scan {self.name!r}: input shape {tuple(input_shape)} does not fit the "
                f"template's input {(None, *expected)}."
            )
        owners = _variable_layers(template)
        count = len(self.unit_names)
        self._stacks = []
        for v in template.trainable_variables + template.non_trainable_variables:
            layer, _ = owners[id(v)]
            self._stacks.append(
                self.add_weight(
                    shape=(count, *v.shape),
                    initializer=_stacked_initializer(layer, v, count),
                    dtype=v.dtype,
                    trainable=v.trainable,
                    # The template's layers cast their slices as their own variables would
                    # (BatchNorm keeps float32 statistics under mixed precision).
                    autocast=False,
                    name=f"{layer.name}_{v.name}",
                )
            )
        self._n_trainable = len(template.trainable_variables)

    def call(self, inputs, training=None):
        template = self.get_template()
        training = bool(training)
        count = len(self.unit_names)
        values = [v.value for v in self._stacks]
        trainable, non_trainable = values[: self._n_trainable], values[self._n_trainable :]

        def body(carry, xs):
            x, statistics = carry
            index, t, nt = xs
            y, nt = template.stateless_call(t, nt, x, training=training)
            if training:
                # BatchNorm's moving statistics of this unit, written into its slice. A
                # select, not `slice_update`: TensorFlow has no gradient for the latter inside
                # a loop, even one that is never used.
                mine = ops.equal(ops.arange(count), index)
                statistics = [
                    ops.where(ops.reshape(mine, (count,) + (1,) * (len(s.shape) - 1)), u[None], s)
                    for s, u in zip(statistics, nt)
                ]
            return (y, statistics), None

        carry = (inputs, list(non_trainable) if training else [])
        backend = keras.backend.backend()
        if backend == "torch":
            # torch's ops.scan is a Python loop that also stacks a placeholder output per step.
            for i in range(count):
                xs = (i, [w[i] for w in trainable], [w[i] for w in non_trainable])
                carry, _ = body(carry, xs)
        elif backend == "tensorflow":
            carry = _tf_loop(body, carry, trainable, non_trainable, count)
        else:
            # The statistics travel in the carry, not as scan outputs, like the TF loop's.
            carry, _ = ops.scan(body, carry, (ops.arange(count), trainable, non_trainable))
        outputs, statistics = carry
        if training:
            for v, new in zip(self._stacks[self._n_trainable :], statistics):
                v.assign(new)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "template": keras.saving.serialize_keras_object(self.get_template()),
            "unit_names": list(self.unit_names),
        }

    def unit_weights(self):
        """`{unscanned layer name: [numpy weights]}` for every repetition of the unit."""
        template = self.get_template()
        index = {
            id(v): i
            for i, v in enumerate(template.trainable_variables + template.non_trainable_variables)
        }
        stacks = [keras.ops.convert_to_numpy(v) for v in self._stacks]
        out = {}
        for layer in template.layers:
            if not layer.weights:
                continue
            suffix = layer.name[len(TEMPLATE_PREFIX) :]
            for i, unit in enumerate(self.unit_names):
                out[unit + suffix] = [stacks[index[id(v)]][i] for v in layer.weights]
        return out

    def set_unit_weights(self, weights, *, source="weights"):
        """Sets the stacks from `{unscanned layer name: [numpy weights]}`; returns the keys used."""
        template = self.get_template()
        order = template.trainable_variables + template.non_trainable_variables
        index = {id(v): i for i, v in enumerate(order)}
        new = [None] * len(order)
        used = []
        for layer in template.layers:
            if not layer.weights:
                continue
            suffix = layer.name[len(TEMPLATE_PREFIX) :]
            names = [unit + suffix for unit in self.unit_names]
            missing = [n for n in names if n not in weights]
            if missing:
                raise ValueError(
                    f"{source} has no weights for layer {missing[0]!r} ({len(missing)} of the "
                    f"{len(names)} units of {self.name!r} missing)."
                )
            for j, v in enumerate(layer.weights):
                values = []
                for n in names:
                    if len(weights[n]) != len(layer.weights):
                        raise ValueError(
                            f"{source}: layer {n!r} has {len(weights[n])} weights; "
                            f"{self.name!r} expects {len(layer.weights)}."
                        )
                    w = np.asarray(weights[n][j])
                    if w.shape != tuple(v.shape):
                        raise ValueError(
                            f"{source}: {n}/{v.name} has shape {w.shape}; {self.name!r} "
                            f"expects {tuple(v.shape)}."
                        )
                    values.append(w)
                new[index[id(v)]] = np.stack(values)
            used += names
        for v, value in zip(self._stacks, new):
            v.assign(value)
        return used


def _tf_loop(body, carry, trainable, non_trainable, count):
    """`body` applied `count` times in a `tf.while_loop` with `maximum_iterations`.

    Not Keras' TensorFlow `ops.scan`: its outputs must have the carry's structure
    (keras-team/keras#19681), and its loop has no `maximum_iterations`, without which
    XLA (`jit_compile=True`, Keras' default on GPUs) cannot compile the gradient.
    """
    import tensorflow as tf

    def step(i, carry):
        xs = (i, [w[i] for w in trainable], [w[i] for w in non_trainable])
        carry, _ = body(carry, xs)
        return i + 1, carry

    _, carry = tf.while_loop(
        lambda i, _: i < count, step, (tf.constant(0), carry), maximum_iterations=count
    )
    return carry


def scan_units(x, unit, *, names, name=None, **unit_kwargs):
    """Applies `len(names)` identical units to `x` as one `Scan` layer.

    Builds the template by calling `unit(input, name=TEMPLATE_PREFIX, **unit_kwargs)` once on
    a symbolic input shaped like `x`; `names` are the units' prefixes in the written-out
    network. The units must keep the shape of `x` and have no random layers.

    Args:
        x: the symbolic input of the first unit.
        unit: a unit function `unit(x, *, name, **unit_kwargs) -> tensor` (see
            `keras_preact.units`).
        names: the unit prefixes, `["conv2_block2", ..., "conv2_block18"]`.
        name: the layer's name; default `"{names[0]}_to_{last block number}_out"`.
        **unit_kwargs: the other keyword arguments of `unit`, the same for every unit.

    Returns:
        The output of the last unit.
    """
    names = list(names)
    if name is None:
        last = re.search(r"(\d+)$", names[-1])
        name = f"{names[0]}_to_{last.group(1) if last else names[-1]}_out"
    template_input = keras.Input(shape=tuple(x.shape[1:]), dtype=x.dtype)
    template_output = unit(template_input, name=TEMPLATE_PREFIX, **unit_kwargs)
    template = keras.Model(template_input, template_output, name=f"{name}_template")
    return Scan(template, names, name=name)(x)


def unit_weights(model):
    """Every weighted layer's weights, keyed by its name in the written-out network.

    Plain layers give `{layer.name: layer.get_weights()}`; a `Scan` layer gives one entry per
    repetition and template layer (`conv2_block7_1_conv`, ...), so the result is the same for
    a model built with or without `scan_units`.
    """
    out = {}
    for layer in model.layers:
        if isinstance(layer, Scan):
            out.update(layer.unit_weights())
        elif layer.weights:
            out[layer.name] = layer.get_weights()
    return out


def set_unit_weights(model, weights, *, source="weights"):
    """Sets every weight of `model` from `{written-out layer name: [numpy weights]}`.

    The inverse of `unit_weights`: works for models with and without `Scan` layers. Raises a
    `ValueError` naming the first layer that is missing, has the wrong number or shape of
    weights, or (for entries the model does not use) has no place in the model.
    """
    used = set()
    for layer in model.layers:
        if isinstance(layer, Scan):
            used.update(layer.set_unit_weights(weights, source=source))
        elif layer.weights:
            if layer.name not in weights:
                raise ValueError(f"{source} has no weights for layer {layer.name!r}.")
            values = weights[layer.name]
            shapes = [tuple(np.shape(w)) for w in values]
            expected = [tuple(w.shape) for w in layer.weights]
            if shapes != expected:
                raise ValueError(
                    f"{source}: layer {layer.name!r} has weights of shapes {shapes}; the model "
                    f"expects {expected}."
                )
            layer.set_weights(values)
            used.add(layer.name)
    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(
            f"{source} has weights for layers the model does not have, first {unused[0]!r} "
            f"({len(unused)} in all): another depth, layout or unit."
        )


def copy_weights(source, target):
    """Copies every weight from `source` to `target`, with or without `Scan` layers on
    either side, matching by the written-out layer names (`conv{s}_block{b}_*`).

    Example: `copy_weights(PreActResNet1001(), PreActResNet1001(scan_units=True))`.
    """
    set_unit_weights(target, unit_weights(source), source=f"model {source.name!r}")
