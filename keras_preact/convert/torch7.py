"""fb.resnet.torch `.t7` checkpoints (Torch7 serialization of an `nn.Sequential`).

The network `models/preresnet.lua` builds for ImageNet (facebookarchive/fb.resnet.torch):

    conv 7x7/2 - BN - ReLU - max-pool 3x3/2 - 4 stages - BN - ReLU - avg-pool - View - Linear

Each unit is `Sequential[(BN, ReLU)?, ConcatTable[branch, shortcut], CAddTable]`. Two unit
structures exist, and `read` accepts either (one per network):

- since PR #42 (`preact_scope="shared"`): the first unit of a stage has its BN-ReLU outside
  the ConcatTable ("both_preact": the projection, a bare 1x1 conv, reads the pre-activated
  input), the others inside the branch (identity shortcut), and the network's first unit
  has none (it reuses the stem's BN-ReLU);
- before PR #42, the published `resnet-200.t7` (`preact_scope="branch"`): `layer()` dropped
  the unit type (issue #36), so every unit, the first included, has its BN-ReLU inside the
  branch, and projections are 1x1 conv + BN on the un-activated unit input.

Both are `PreActResNet(stem_norm=True, stride_in="3x3", preact_scope=...)`; `preact_scope`
tells which a converted file has. `read` walks the module tree, maps every tensor to its
layer name, and refuses what no option expresses (a unit without pre-activation after the
first, a bare projection on the un-activated input, a non-zero conv bias, a mix of the two
structures), naming the module.

The file is read with the `torchfile` package (pure Python); no Torch install is needed.
Its tensors and storages are read by `_CheckedReader`, which bounds every tensor by its
storage and every storage by the file before making an array: torchfile's own reader makes
a strided view from whatever sizes and strides the file declares, so a hostile file could
read process memory, or crash the process.
"""

import os
import struct

import numpy as np

from keras_preact._optional import require

#: Torch7 tensor and storage classes -> element type.
_TENSORS = {f"torch.{k}Tensor".encode(): v for k, v in (
    ("Byte", np.uint8), ("Char", np.int8), ("Short", np.int16), ("Int", np.int32),
    ("Long", np.int64), ("Float", np.float32), ("Double", np.float64), ("Cuda", np.float32),
    ("CudaDouble", np.float64),
)}  # fmt: skip
_STORAGES = {k.replace(b"Tensor", b"Storage"): v for k, v in _TENSORS.items()}
_MAX_DIMS = 8  # a network's tensors have at most 5 (volumetric conv weights)
_TYPE_TORCH = 4  # torchfile.TYPE_TORCH


def _checked_reader_class():
    torchfile = require("torchfile")

    class _CheckedReader(torchfile.T7Reader):
        """A `torchfile.T7Reader` that reads tensors and storages itself, checked.

        Every other object goes to torchfile's reader (the file is seeked back to it).
        Errors are ValueErrors naming the file, the tensor (its class, the field it is
        the value of, and its byte offset) and the bound it breaks.
        """

        def __init__(self, f, path):
            super().__init__(f)
            self.path = path
            self.file_size = os.fstat(f.fileno()).st_size
            self.last_key = None  # the last string read: the field name of what follows

        def fail(self, what, at, problem):
            raise ValueError(
                f"{self.path!r}: {what} (field {self.last_key!r}, at byte {at}) {problem}. "
                "The file is corrupt or hostile; nothing of it was used."
            )

        def read_obj(self):
            at = self.f.tell()
            if self.read_int() != _TYPE_TORCH:
                self.f.seek(at)
                obj = super().read_obj()
                if isinstance(obj, (bytes, str)):
                    self.last_key = obj.decode("utf8", "replace") if isinstance(obj, bytes) else obj
                return obj
            index = self.read_int()
            if index in self.objects:
                return self.objects[index]
            version = self.read_string(disable_utf8=True)
            name = self.read_string(disable_utf8=True) if version.startswith(b"V ") else version
            if name in _TENSORS:
                reader = self.tensor
            elif name in _STORAGES:
                reader = self.storage
            else:
                self.f.seek(at)
                return super().read_obj()
            self.objects[index] = None
            self.objects[index] = obj = reader(name, at)
            return obj

        def storage(self, name, at):
            dtype = np.dtype(_STORAGES[name])
            size = self.read_long()
            left = self.file_size - self.f.tell()
            if size < 0 or size * dtype.itemsize > left:
                self.fail(
                    f"{name.decode()} of {size} elements", at,
                    f"is larger than the {left} bytes left in the file",
                )  # fmt: skip
            data = np.fromfile(self.f, dtype=dtype, count=size)
            if data.size != size:
                self.fail(f"{name.decode()} of {size} elements", at, "is cut short")
            return data

        def tensor(self, name, at):
            what = name.decode()
            ndim = self.read_int()
            if not 0 <= ndim <= _MAX_DIMS:
                self.fail(what, at, f"has {ndim} dimensions; allowed: 0 to {_MAX_DIMS}")
            size = self.read_long_array(ndim)
            stride = self.read_long_array(ndim)
            offset = self.read_long() - 1  # Torch counts from 1
            storage = self.read_obj()
            what = f"{what} of size {size}, stride {stride}, storage offset {offset + 1}"
            if storage is None or ndim == 0:
                return np.empty(0, _TENSORS[name])
            if not isinstance(storage, np.ndarray) or storage.dtype != _TENSORS[name]:
                self.fail(what, at, f"has a {type(storage).__name__} storage, not its own type")
            if min(size) < 0 or min(stride) < 0 or offset < 0:
                self.fail(what, at, "has a negative size, stride or offset")
            if min(size) == 0:
                return np.empty(size, storage.dtype)
            last = offset + sum((n - 1) * st for n, st in zip(size, stride))
            if last >= storage.size:
                self.fail(what, at, f"reaches element {last} of a storage of {storage.size}")
            if int(np.prod(size, dtype=object)) > storage.size:
                self.fail(what, at, f"has more elements than its storage of {storage.size} "
                          "(an expanded view; a saved network has none)")  # fmt: skip
            return np.lib.stride_tricks.as_strided(
                storage[offset:], shape=size, strides=[st * storage.itemsize for st in stride]
            )

    return _CheckedReader


def _kind(module):
    return module.torch_typename().decode("utf8").rpartition(".")[2]


def _children(module):
    modules = module["modules"] or []
    return list(modules.values()) if isinstance(modules, dict) else list(modules)


class _Converter:
    def __init__(self):
        self.tensors = {}
        self.eps = set()
        self.scope = None  # (preact_scope, the unit that showed it first)

    def conv(self, module, layer, where):
        w = np.asarray(module["weight"], np.float32)
        n_out, n_in = int(module["nOutputPlane"]), int(module["nInputPlane"])
        kh, kw = int(module["kH"]), int(module["kW"])
        if w.size != n_out * n_in * kh * kw:
            raise ValueError(
                f"{where}: conv weight of {w.size} values does not fit {n_out}x{n_in}x{kh}x{kw}."
            )
        self.tensors[layer] = {"kernel": w.reshape(n_out, n_in, kh, kw).transpose(2, 3, 1, 0)}
        bias = module["bias"]
        # preresnet.lua's ConvInit removes conv biases under cuDNN >= 4; a zero bias from
        # older cuDNN changes nothing, any other bias has no place in this layout.
        if bias is not None and np.asarray(bias).size and np.any(np.asarray(bias) != 0):
            raise ValueError(f"{where}: convolution {layer} has a non-zero bias; layout has none.")

    def bn(self, module, layer):
        gamma = np.asarray(module["weight"], np.float32)
        eps = float(module["eps"] if module["eps"] is not None else 1e-5)
        self.eps.add(eps)
        if module["running_var"] is not None:
            var = np.asarray(module["running_var"], np.float32)
        else:  # nn before 2016 stored 1 / sqrt(var + eps)
            std = np.asarray(module["running_std"], np.float64)
            var = (1.0 / std**2 - eps).astype(np.float32)
        self.tensors[layer] = {
            "gamma": gamma,
            "beta": np.asarray(module["bias"], np.float32),
            "moving_mean": np.asarray(module["running_mean"], np.float32),
            "moving_variance": var,
        }

    def unit(self, block, prefix, first):
        mods = _children(block)
        kinds = [_kind(m) for m in mods]
        outer_preact = kinds[:2] == ["SpatialBatchNormalization", "ReLU"]
        if outer_preact:
            self.bn(mods[0], f"{prefix}_preact_bn")
            mods, kinds = mods[2:], kinds[2:]
        if kinds[:2] != ["ConcatTable", "CAddTable"]:
            raise ValueError(f"{prefix}: expected ConcatTable + CAddTable, found {kinds}.")
        branch, shortcut = _children(mods[0])
        layers = _children(branch)
        inner_preact = [_kind(m) for m in layers[:2]] == ["SpatialBatchNormalization", "ReLU"]
        if inner_preact:
            if outer_preact:
                raise ValueError(f"{prefix}: the unit pre-activates twice.")
            self.bn(layers[0], f"{prefix}_preact_bn")
            layers = layers[2:]
        if not first and not (outer_preact or inner_preact):
            raise ValueError(
                f"{prefix}: unit without pre-activation (an early preresnet.lua variant); "
                "not expressible with PreActResNet options."
            )
        convs = 0
        for m in layers:
            kind = _kind(m)
            if kind == "SpatialConvolution":
                convs += 1
                if int(m["kW"]) == 1 and int(m["dW"] or 1) != 1:
                    raise ValueError(f"{prefix}: stride on a 1x1 conv; layout has stride_in='3x3'.")
                self.conv(m, f"{prefix}_{convs}_conv", prefix)
            elif kind == "SpatialBatchNormalization":
                self.bn(m, f"{prefix}_{convs}_bn")
            elif kind not in ("ReLU", "Dropout", "SpatialDropout"):
                raise ValueError(f"{prefix}: unexpected module {kind} in the residual branch.")
        sc_kind = _kind(shortcut)
        if sc_kind == "Identity":
            if outer_preact:
                raise ValueError(f"{prefix}: identity shortcut on the pre-activated input.")
            if first:  # a basic first unit: its branch alone tells the structure
                self.observe("branch" if inner_preact else "shared", prefix)
            return
        sc_layers = _children(shortcut) if sc_kind == "Sequential" else [shortcut]
        sc_kinds = [_kind(m) for m in sc_layers]
        if sc_kinds == ["SpatialConvolution"] and not inner_preact:
            # Current preresnet.lua: a bare projection on the shared pre-activation (or, in
            # the first unit, on the stem's BN-ReLU output).
            self.observe("shared", prefix)
        elif sc_kinds == ["SpatialConvolution", "SpatialBatchNormalization"] and inner_preact:
            # The published ResNet-200: conv-BN on the un-activated unit input.
            self.observe("branch", prefix)
            self.bn(sc_layers[1], f"{prefix}_0_bn")
        else:
            reads = "pre-activated" if outer_preact else "un-activated"
            raise ValueError(
                f"{prefix}: shortcut {sc_kinds} on the {reads} input, with the branch "
                f"{'pre-activating itself' if inner_preact else 'not pre-activating'}; "
                "PreActResNet expresses a bare 1x1 conv on the shared pre-activation "
                "(preact_scope='shared') or a 1x1 conv-BN on the raw input with a "
                "branch-only pre-activation (preact_scope='branch')."
            )
        self.conv(sc_layers[0], f"{prefix}_0_conv", prefix)

    def observe(self, scope, prefix):
        """Records which `preact_scope` a unit shows; every unit must show the same."""
        if self.scope is None:
            self.scope = (scope, prefix)
        elif self.scope[0] != scope:
            raise ValueError(
                f"{prefix} has the preact_scope={scope!r} structure but {self.scope[1]} has "
                f"preact_scope={self.scope[0]!r}; one network cannot mix them."
            )

    def network(self, model):
        mods = _children(model)
        stage = 0
        seen_conv = False
        for m in mods:
            kind = _kind(m)
            if kind == "SpatialConvolution" and not seen_conv:
                self.conv(m, "conv1_conv", "stem")
                seen_conv = True
            elif kind == "SpatialBatchNormalization":
                self.bn(m, "conv1_bn" if stage == 0 else "post_bn")
            elif kind == "Sequential":
                stage += 1
                for b, block in enumerate(_children(m)):
                    self.unit(block, f"conv{stage + 1}_block{b + 1}", first=stage == 1 and b == 0)
            elif kind == "Linear":
                self.tensors["predictions"] = {
                    "kernel": np.asarray(m["weight"], np.float32).T,
                    "bias": np.asarray(m["bias"], np.float32),
                }
            elif kind not in ("ReLU", "SpatialMaxPooling", "SpatialAveragePooling", "Copy",
                              "View", "Reshape", "Dropout"):  # fmt: skip
                raise ValueError(f"Unexpected top-level module {kind} in the .t7 network.")
        if stage == 0:
            raise ValueError("No residual stages (nn.Sequential of units) in the .t7 network.")
        return self.tensors


def convert_module(model):
    """Maps a torchfile-loaded `nn.Sequential` to the neutral form; returns (tensors, eps set)."""
    conv = _Converter()
    tensors = conv.network(model)
    return tensors, conv.eps


def preact_scope(tensors):
    """The `preact_scope` of a network `read` converted: `"branch"` where its units have
    conv-BN projections or the first unit pre-activates after the stem's BN-ReLU."""
    branch = "conv1_bn" in tensors and "conv2_block1_preact_bn" in tensors
    return "branch" if branch or any(k.endswith("_0_bn") for k in tensors) else "shared"


def read(path):
    torchfile = require("torchfile")

    try:
        with open(path, "rb") as f:
            model = _checked_reader_class()(f, path).read_obj()
    except ValueError as e:
        if str(e).startswith(f"{path!r}:"):  # the checked reader's own: names the tensor
            raise
        raise ValueError(f"{path!r} is not a readable Torch7 file (truncated?): {e}") from e
    except (struct.error, EOFError, torchfile.T7ReaderException, RecursionError,
            MemoryError, OverflowError) as e:  # fmt: skip
        raise ValueError(f"{path!r} is not a readable Torch7 file (truncated?): {e}") from e
    tensors, eps = convert_module(model)
    if eps - {1e-5}:
        raise ValueError(f"{path!r}: BatchNorm eps {sorted(eps)}; the layout expects 1e-5.")
    return tensors
