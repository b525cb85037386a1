"""Torch7 for tests and tools: a writer of the binary format and a reference interpreter.

`write` serializes a module tree of `T7Module`s as Torch7 does (`torch.save` in Lua), so
tests and `tools/make_t7_fixture.py` can make `.t7` files without Lua. `forward` runs such a
tree with torch.nn.functional, module type by module type, in eval mode: the independent
reference the converter (`keras_preact/convert/torch7.py`) is checked against, by the
fixtures and by `tools/convert_weights.py` on real checkpoints (`from_torchfile` turns a
`torchfile.load`ed tree into `T7Module`s).

Not part of the package: the library only reads `.t7` files.
"""

import struct

import numpy as np


class T7Module:
    """A Torch class instance to serialize: `T7Module("nn.ReLU", {"inplace": True})`."""

    def __init__(self, typename, fields):
        self.typename = typename
        self.fields = fields


def write(path, obj):
    """Serializes numbers, strings, booleans, dicts, lists (1-based tables), float32 numpy
    arrays (`torch.FloatTensor`) and `T7Module`s in the Torch7 binary format."""
    out = []
    counter = [0]

    def put(fmt, *v):
        out.append(struct.pack(fmt, *v))

    def raw_string(s):
        b = s.encode("utf8")
        put("<i", len(b))
        out.append(b)

    def index():
        counter[0] += 1
        put("<i", counter[0])

    def obj_(x):
        if x is None:
            put("<i", 0)
        elif isinstance(x, bool):
            put("<ii", 5, int(x))
        elif isinstance(x, (int, float)):
            put("<id", 1, float(x))
        elif isinstance(x, str):
            put("<i", 2)
            raw_string(x)
        elif isinstance(x, np.ndarray):
            a = np.ascontiguousarray(x, np.float32)
            put("<i", 4)
            index()
            raw_string("V 1")
            raw_string("torch.FloatTensor")
            put("<i", a.ndim)
            strides = [s // 4 for s in a.strides]
            put(f"<{a.ndim}q", *a.shape)
            put(f"<{a.ndim}q", *strides)
            put("<q", 1)
            put("<i", 4)
            index()
            raw_string("V 1")
            raw_string("torch.FloatStorage")
            put("<q", a.size)
            out.append(a.tobytes())
        elif isinstance(x, T7Module):
            put("<i", 4)
            index()
            raw_string("V 1")
            raw_string(x.typename)
            obj_(x.fields)
        elif isinstance(x, (dict, list)):
            items = list(x.items()) if isinstance(x, dict) else list(enumerate(x, start=1))
            put("<i", 3)
            index()
            put("<i", len(items))
            for k, v in items:
                obj_(k)
                obj_(v)
        else:
            raise TypeError(f"Cannot serialize {type(x).__name__} to Torch7.")

    obj_(obj)
    with open(path, "wb") as f:
        f.write(b"".join(out))


def from_torchfile(obj):
    """A `torchfile.load`ed module tree as `T7Module`s, so `forward` runs real checkpoints
    (tools/convert_weights.py). torchfile keeps a module's fields in `_obj`, keyed by bytes;
    a field-less module (an `nn.Copy`) comes back with an empty list there."""
    raw = obj._obj if isinstance(obj._obj, dict) else {}
    fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    if fields.get("modules") is not None:
        modules = fields["modules"]
        children = list(modules.values()) if isinstance(modules, dict) else list(modules)
        fields["modules"] = [from_torchfile(c) for c in children]
    return T7Module(obj.torch_typename().decode(), fields)


def forward(m, x, calibrate=False):
    """Torch7 semantics of each module type, in eval mode (NCHW).

    With `calibrate`, every BatchNorm first sets its running statistics to those of its
    input batch, so that a deep random network keeps activations of order one.
    """
    kind = m.typename.rpartition(".")[2]
    f = m.fields
    import torch
    import torch.nn.functional as F

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
    if kind == "Sequential":
        for child in f["modules"]:
            x = forward(child, x, calibrate)
        return x
    if kind == "ConcatTable":
        return [forward(child, x, calibrate) for child in f["modules"]]
    if kind == "CAddTable":
        return sum(x)
    if kind == "SpatialConvolution":
        shape = [int(f[k]) for k in ("nOutputPlane", "nInputPlane", "kH", "kW")]
        b = t(f["bias"]) if f.get("bias") is not None else None
        return F.conv2d(x, t(f["weight"]).reshape(shape), b, stride=int(f["dW"]),
                        padding=int(f.get("padW") or 0))  # fmt: skip
    if kind == "SpatialBatchNormalization":
        if calibrate:
            f["running_mean"] = x.mean((0, 2, 3)).numpy().astype(np.float32)
            f["running_var"] = x.var((0, 2, 3)).numpy().astype(np.float32)
        return F.batch_norm(x, t(f["running_mean"]), t(f["running_var"]), t(f["weight"]),
                            t(f["bias"]), False, 0.0, float(f["eps"]))  # fmt: skip
    if kind == "ReLU":
        return F.relu(x)
    if kind == "SpatialMaxPooling":  # Torch7 pads max-pooling with -inf, as PyTorch does
        return F.max_pool2d(x, int(f["kW"]), int(f["dW"]), int(f.get("padW") or 0))
    if kind == "SpatialAveragePooling":
        return F.avg_pool2d(x, int(f["kW"]), int(f["dW"]))
    if kind in ("Identity", "Copy", "Dropout", "SpatialDropout"):
        return x
    if kind in ("View", "Reshape"):
        return x.reshape(x.shape[0], -1)
    if kind == "Linear":
        return F.linear(x, t(f["weight"]), t(f["bias"]))
    raise ValueError(f"No reference for Torch module {kind}.")
