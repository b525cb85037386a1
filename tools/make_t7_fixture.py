r"""Writes the fb.resnet.torch fixture: a small preresnet.lua-shaped network in Torch7 format.

`tests/fixtures/fb_preresnet_tiny.t7` holds an `nn.Sequential` with the module types, field
names and nesting of `models/preresnet.lua` (facebookarchive/fb.resnet.torch, ImageNet
branch: stem conv-BN-ReLU-maxpool, "both_preact" first units with a bare 1x1 projection,
final BN-ReLU, average pool, View, Linear; plus the `nn.Copy` older checkpoints carry),
at 1/8 width with (2, 2, 1, 1) bottleneck units and random weights, serialized by
`tools/torch7_reference.py`'s writer. `tests/fixtures/fb_preresnet_tiny.npz` holds an input
batch and the logits of an independent forward pass: `torch7_reference.forward`, a small
interpreter of the Torch modules written with torch.nn.functional, walking the same module
tree as Lua would.

`fb_preresnet_legacy_tiny.{t7,npz}` is the same network with the structure of the published
`resnet-200.t7` (preresnet.lua before PR #42): every unit, the first included, pre-activates
inside its branch, and projections are 1x1 conv + BN on the un-activated unit input.

    python tools/make_t7_fixture.py
    python tools/make_t7_fixture.py --resnet200 /tmp/fb/resnet-200.t7  # full size, random
"""

import importlib.util
import os
import sys

import numpy as np
import torch


def _sibling(name):
    """`tools/<name>.py` as a module: the tools are scripts, not a package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_t7 = _sibling("torch7_reference")  # the Torch7 writer and the reference forward pass
T7Module, forward, write = _t7.T7Module, _t7.forward, _t7.write

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "tests", "fixtures")
STAGES = (2, 2, 1, 1)
WIDTHS = (8, 16, 32, 64)  # bottleneck inner widths: preresnet.lua's 64..512 over 8
CLASSES = 10
SIZE = 64

rng = np.random.default_rng(7)


def conv(n_in, n_out, k, stride=1, pad=0, zero_bias=False):
    fan_in = n_in * k * k
    w = (rng.standard_normal((n_out, n_in, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    fields = {"nInputPlane": n_in, "nOutputPlane": n_out, "kW": k, "kH": k, "dW": stride,
              "dH": stride, "padW": pad, "padH": pad, "weight": w, "train": False}  # fmt: skip
    if zero_bias:  # cuDNN < 4 kept a zeroed bias (ConvInit); the converter must accept it
        fields["bias"] = np.zeros(n_out, np.float32)
    return T7Module("cudnn.SpatialConvolution", fields)


def bn(n):
    return T7Module("nn.SpatialBatchNormalization", {
        "weight": (1 + 0.2 * rng.standard_normal(n)).astype(np.float32),
        "bias": (0.2 * rng.standard_normal(n)).astype(np.float32),
        "running_mean": (0.2 * rng.standard_normal(n)).astype(np.float32),
        "running_var": rng.uniform(0.5, 1.5, n).astype(np.float32),
        "eps": 1e-5, "momentum": 0.1, "affine": True, "nDim": 4, "train": False,
    })  # fmt: skip


def relu():
    return T7Module("cudnn.ReLU", {"inplace": True, "train": False})


def seq(*modules, kind="nn.Sequential"):
    return T7Module(kind, {"modules": list(modules), "train": False})


def bottleneck(n_in, n, stride, kind, legacy=False):
    """One unit; `legacy`: preresnet.lua before PR #42, whose `layer()` passed no `kind`,
    and whose projection shortcut was conv-BN (the published resnet-200.t7)."""
    s = []
    block = []
    if kind == "both_preact" and not legacy:
        block += [bn(n_in), relu()]
    elif kind != "no_preact" or legacy:
        s += [bn(n_in), relu()]
    s += [conv(n_in, n, 1), bn(n), relu(), conv(n, n, 3, stride, 1), bn(n), relu(),
          conv(n, 4 * n, 1)]  # fmt: skip
    if n_in == 4 * n:
        shortcut = T7Module("nn.Identity", {"train": False})
    elif legacy:
        shortcut = seq(conv(n_in, 4 * n, 1, stride), bn(4 * n))
    else:
        shortcut = seq(conv(n_in, 4 * n, 1, stride, zero_bias=True))
    block += [
        seq(seq(*s), shortcut, kind="nn.ConcatTable"),
        T7Module("nn.CAddTable", {"inplace": True}),
    ]
    return seq(*block)


def network(legacy=False, stages=STAGES, widths=WIDTHS, classes=CLASSES, size=SIZE):
    mods = [conv(3, 64, 7, 2, 3), bn(64), relu(),
            T7Module("nn.SpatialMaxPooling", {"kW": 3, "kH": 3, "dW": 2, "dH": 2, "padW": 1, "padH": 1})]  # fmt: skip
    n_in = 64
    for s, (count, n) in enumerate(zip(stages, widths)):
        units = []
        for i in range(count):
            kind = ("no_preact" if s == 0 else "both_preact") if i == 0 else None
            stride = (1 if s == 0 else 2) if i == 0 else 1
            units.append(bottleneck(n_in, n, stride, kind, legacy))
            n_in = 4 * n
        mods.append(seq(*units))
    side = size // 32
    mods += [T7Module("nn.Copy", {}), bn(n_in), relu(),
             T7Module("cudnn.SpatialAveragePooling", {"kW": side, "kH": side, "dW": 1, "dH": 1}),
             T7Module("nn.View", {"size": [n_in], "numInputDims": 3}),
             T7Module("nn.Linear", {
                 "weight": (rng.standard_normal((classes, n_in)) / np.sqrt(n_in)).astype(np.float32),
                 "bias": (0.1 * rng.standard_normal(classes)).astype(np.float32)})]  # fmt: skip
    return seq(*mods)


def main():
    global rng
    if len(sys.argv) == 3 and sys.argv[1] == "--resnet200":
        # A full-size ResNet-200 with the published file's structure and random weights,
        # for an end-to-end check of tools/convert_weights.py without the real download.
        rng = np.random.default_rng(200)
        net = network(True, (3, 24, 36, 3), (64, 128, 256, 512), 1000, 224)
        x = rng.uniform(-2, 2, (8, 3, 28, 28)).repeat(8, axis=2).repeat(8, axis=3)
        with torch.no_grad():
            forward(net, torch.from_numpy(x.astype(np.float32)), calibrate=True)
        write(sys.argv[2], net)
        print("wrote", sys.argv[2], os.path.getsize(sys.argv[2]), "bytes")
        return
    for name, legacy, seed in (("fb_preresnet_tiny", False, 7),
                               ("fb_preresnet_legacy_tiny", True, 8)):  # fmt: skip
        rng = np.random.default_rng(seed)
        net = network(legacy)
        x = rng.uniform(-2, 2, (2, 3, SIZE, SIZE)).astype(np.float32)
        with torch.no_grad():
            logits = forward(net, torch.from_numpy(x)).numpy()
        write(os.path.join(FIXTURES, f"{name}.t7"), net)
        np.savez_compressed(os.path.join(FIXTURES, f"{name}.npz"), x_nchw=x, logits=logits)
        print(name, "logits", logits.shape, "max |logit|", float(np.abs(logits).max()))


if __name__ == "__main__":
    main()
