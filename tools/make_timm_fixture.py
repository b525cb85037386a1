r"""Writes the timm golden-output fixtures: small random-weight timm ResNetV2 networks.

For each configuration: `tests/fixtures/timm_<name>.safetensors` (the state dict, as timm
writes it to the hub) and `tests/fixtures/timm_<name>.npz` (input batch, timm's eval-mode
logits, the versions used). `tests/test_weights.py` converts the safetensors through
`keras_preact.convert.timm` and compares logits.

timm imports torchvision at module level; torchvision has no CPU wheel on the dev machine,
so this script stubs the `torchvision` modules it never calls (data transforms only), on
the import path of this process only. The networks themselves are plain torch.

    pip install --no-deps timm==1.0.31
    python tools/make_timm_fixture.py            # rewrites tests/fixtures/timm_*
"""

import importlib.abc
import importlib.machinery
import os
import sys
import types

import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "tests", "fixtures")

#: name -> timm ResNetV2 kwargs. Widths are the PreActResNet ImageNet widths times 1/8,
#: with timm's 64-channel stem, so `PreActResNet(width_multiplier=0.125, ...)` matches.
CONFIGS = {
    "basic": dict(layers=(2, 1, 1, 1), channels=(8, 16, 32, 64), basic=True, bottle_ratio=1.0),
    "bottleneck": dict(layers=(1, 2, 1, 1), channels=(32, 64, 128, 256)),
}
NUM_CLASSES = 10
INPUT = (2, 3, 64, 64)


class _StubModule(types.ModuleType):
    """A module whose every attribute is a do-nothing class (with class attributes)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        class _Meta(type):
            def __getattr__(cls, attr):
                if attr.startswith("__"):
                    raise AttributeError(attr)
                return f"{cls.__name__}.{attr}"

        cls = _Meta(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, cls)
        return cls


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def main():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        sys.meta_path.insert(0, _StubFinder())
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2

    torch.manual_seed(0)
    for name, kwargs in CONFIGS.items():
        model = ResNetV2(
            num_classes=NUM_CLASSES, conv_layer=create_conv2d, norm_layer=BatchNormAct2d, **kwargs
        ).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for key, t in model.state_dict().items():
                if key.endswith("num_batches_tracked"):
                    continue
                if key.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
                elif t.ndim == 4:  # fan-in scaled conv weights keep activations O(1)
                    fan_in = t.shape[1] * t.shape[2] * t.shape[3]
                    t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
            x = torch.rand(INPUT, generator=gen) * 2 - 1
            logits = model(x)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(FIXTURES, f"timm_{name}.safetensors"))
        np.savez_compressed(
            os.path.join(FIXTURES, f"timm_{name}.npz"),
            x_nchw=x.numpy(),
            logits=logits.numpy(),
            versions=np.array(f"timm {timm.__version__}, torch {torch.__version__}"),
        )
        print(name, "logits", tuple(logits.shape), "max |logit|", float(logits.abs().max()))


if __name__ == "__main__":
    main()
