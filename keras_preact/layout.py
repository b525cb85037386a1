"""`Layout`: the options that exist only to match upstream checkpoints, as one value.

The paper fixes the residual unit but not where a downsampling unit strides, whether the
stem ends in BN-ReLU, which convolutions carry biases or BatchNorm's epsilon; every codebase
that published weights chose differently. A `Layout` holds those seven choices, validated
once, and has a preset per codebase:

| preset | codebase |
| --- | --- |
| `"paper"` (default) | the paper's reference code (`resnet-pre-act.lua`, fb.resnet.torch's CIFAR path) |
| `"timm"` | timm `resnetv2_{18,34,50,101}` |
| `"keras"` | keras.applications `ResNet{50,101,152}V2` |
| `"fb"` | fb.resnet.torch `models/preresnet.lua` (ImageNet) since its PR #42 |
| `"fb_legacy"` | the published fb.resnet.torch `resnet-200.t7` (`preresnet.lua` before PR #42) |

`docs/models.md` explains every option; builders take `layout=` (a preset name or a
`Layout`), and every weights record carries the `Layout` its file needs.

>>> from keras_preact import Layout
>>> Layout.get("timm").stem_norm
False
>>> Layout.get("paper").replace(stride_in="3x3") == Layout.get("fb")
True
"""

import dataclasses

#: Where convolution biases can be switched on (`conv_bias=`). The paper's code has none.
BIAS_PLACES = ("stem", "projection", "residual_last", "residual_inner")

#: The allowed values of each string option.
CHOICES = {
    "stride_in": ("first_conv", "3x3"),
    "downsample_in": ("first_unit", "last_unit"),
    "stem_pool_padding": ("zeros", "neg_inf"),
    "preact_scope": ("shared", "branch"),
}


def _bias_places(value):
    """`conv_bias=` as a frozenset of `BIAS_PLACES`: True means every place, False, None or
    an empty sequence none, a string one place, an iterable several."""
    if value is True:
        return frozenset(BIAS_PLACES)
    if value is False or value is None:
        return frozenset()
    try:
        places = frozenset((value,) if isinstance(value, str) else value)
    except TypeError:
        places = None
    if places is None or not places <= set(BIAS_PLACES):
        raise ValueError(
            f"Invalid conv_bias={value!r}. Allowed: True, False, or a subset of {BIAS_PLACES}."
        )
    return places


@dataclasses.dataclass(frozen=True)
class Layout:
    """The checkpoint-layout options of a pre-activation ResNet (defaults: the paper's code).

    Attributes:
        stride_in: which convolution of a downsampling bottleneck unit strides:
            `"first_conv"` (its first 1x1, as in [1] and the paper's CIFAR code) or `"3x3"`
            (fb.resnet.torch, timm, keras.applications). Basic units always stride their
            first 3x3.
        downsample_in: `"first_unit"` of each stage (paper) or `"last_unit"` of the previous
            stage (keras.applications ResNetV2, whose strided unit subsamples its shortcut
            with a 1x1 max-pool).
        stem_norm: whether conv1 is followed by BN-ReLU (paper: True; timm and
            keras.applications: False, and the first unit pre-activates both paths itself).
        stem_pool_padding: `"zeros"` or `"neg_inf"`: the border of the ImageNet stem's
            max-pool when the stem has no BN-ReLU (timm pools un-activated values with
            Torch's -inf padding).
        conv_bias: the subset of `BIAS_PLACES` whose convolutions carry a bias (paper: none).
            Accepts True, False, one place name or an iterable of names.
        bn_epsilon: BatchNorm epsilon (paper's code: 1e-5; keras.applications: 1.001e-5).
        preact_scope: what a unit's pre-activation feeds. `"shared"` (paper): both paths of
            a projection unit, whose bare 1x1 conv reads the pre-activated input, and the
            first unit reuses the stem's BN-ReLU. `"branch"` (the published fb ResNet-200):
            only the residual branch, in every unit including the first; projections are
            1x1 conv-BN on the un-activated unit input.

    Raises:
        ValueError: naming the option, the value received and the values allowed.
    """

    stride_in: str = "first_conv"
    downsample_in: str = "first_unit"
    stem_norm: bool = True
    stem_pool_padding: str = "zeros"
    conv_bias: frozenset = frozenset()
    bn_epsilon: float = 1e-5
    preact_scope: str = "shared"

    def __post_init__(self):
        for option, allowed in CHOICES.items():
            value = getattr(self, option)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"Invalid {option}={value!r}. Allowed: {allowed}.")
        if not isinstance(self.stem_norm, bool):
            raise ValueError(f"Invalid stem_norm={self.stem_norm!r}. Allowed: True, False.")
        eps = self.bn_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"Invalid bn_epsilon={eps!r}. Allowed: a number in (0, 1).")
        object.__setattr__(self, "bn_epsilon", float(eps))
        object.__setattr__(self, "conv_bias", _bias_places(self.conv_bias))

    @classmethod
    def get(cls, layout):
        """The `Layout` for a preset name or a `Layout` (returned as is).

        Raises:
            ValueError: for anything else, listing the presets.
        """
        if isinstance(layout, Layout):
            return layout
        if isinstance(layout, str) and layout in LAYOUTS:
            return LAYOUTS[layout]
        raise ValueError(
            f"Invalid layout={layout!r}. Allowed: a keras_preact.Layout or a preset name in "
            f"{list(LAYOUTS)}."
        )

    def replace(self, **changes):
        """A copy with some options changed (validated like the constructor)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(
                f"Unknown Layout option(s) {unknown}. Allowed: "
                f"{[f.name for f in dataclasses.fields(self)]}."
            )
        return dataclasses.replace(self, **changes)

    @property
    def name(self):
        """The preset this layout equals, or None."""
        return next((n for n, v in LAYOUTS.items() if v == self), None)

    def differences(self, other):
        """`{option: (self's value, other's value)}` for the options that differ."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        }

    def to_config(self):
        """A JSON-friendly dict (`conv_bias` as a sorted list); `Layout(**config)` reverses it."""
        config = dataclasses.asdict(self)
        config["conv_bias"] = sorted(self.conv_bias, key=BIAS_PLACES.index)
        return config

    def __repr__(self):
        if self.name is not None:
            return f"Layout.get({self.name!r})"
        options = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items())
        return f"Layout({options})"


_PAPER = Layout()

#: The named presets (see the module docstring).
LAYOUTS = {
    "paper": _PAPER,
    # Stem conv without norm, Torch max-pool (-inf border), stride on the 3x3, projection on
    # the pre-activated input, no conv biases (timm/models/resnetv2.py, PreActBottleneck).
    "timm": _PAPER.replace(stride_in="3x3", stem_norm=False, stem_pool_padding="neg_inf"),
    # keras/src/applications/resnet.py, residual_block_v2: stride in each stage's last unit
    # with a 1x1 max-pool shortcut, biases on all but the inner convolutions, epsilon 1.001e-5.
    "keras": _PAPER.replace(
        stride_in="3x3",
        downsample_in="last_unit",
        stem_norm=False,
        conv_bias=("stem", "projection", "residual_last"),
        bn_epsilon=1.001e-5,
    ),
    # preresnet.lua since PR #42: the paper's layout, but the stride on the 3x3.
    "fb": _PAPER.replace(stride_in="3x3"),
    # The published resnet-200.t7: preresnet.lua before PR #42, whose `layer()` dropped each
    # unit's type, so every unit pre-activates only its branch (docs/weights.md).
    "fb_legacy": _PAPER.replace(stride_in="3x3", preact_scope="branch"),
}
