"""A run's configuration: one frozen, typed dataclass per trainer, presets as code.

`CifarConfig` (in-memory data sets) and `ImagenetConfig` (ImageNet-format data) share the
fields of `TrainConfig`. A config is built once, from the command line
(`from_flags`), from a preset (`get_config("paper")`) or from values, and never changes;
`derive` returns a copy with the values computed from the data and the weights (steps per
epoch, base learning rate, normalization, ...), each marked `"derived"` in `origins`.
Every value records where it came from: `"flag"`, `"preset"`, `"default"` or
`"derived"`. `config.json` holds `record()`.

The learning-rate boundaries are in **epochs** for every trainer (the paper's CIFAR
32k/48k of 64k iterations at 400 steps per epoch are epochs 80 and 120).

Example:

>>> cfg = get_config("paper", "cifar", epochs=1)
>>> cfg.epochs, cfg.lr_boundaries, cfg.origins["epochs"], cfg.origins["lr_boundaries"]
(1, (80.0, 120.0), 'flag', 'preset')
>>> cfg.derive(steps_per_epoch=400).total_steps
400
"""

import dataclasses
import types
from collections.abc import Mapping

#: The named shortcuts of `keras_preact.shortcuts` and the parameter options each takes.
SHORTCUT_PARAMS = {
    "identity": (),
    "constant_scaling": ("shortcut_scale", "residual_scale"),
    "exclusive_gating": ("gate_bias",),
    "shortcut_only_gating": ("gate_bias",),
    "conv1x1": (),
    "dropout": ("shortcut_dropout_rate",),
}
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
#: `fit`: `model.fit`; `custom`: the tf.distribute `strategy.run` loop; `jax`: a jitted
#: JAX step loop; `torch`: PyTorch's DistributedDataParallel over a torchrun launch; `auto`:
#: `jax` under JAX, `torch` under torchrun, `custom` under TensorFlow's
#: multi_worker_mirrored, else `fit`.
LOOPS = ("auto", "fit", "custom", "jax", "torch")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network's options (the keras_preact builder's), and the machinery every config
    shares. Field names are the command-line flags' names."""

    trainer = None
    model: str = "PreActResNet20"
    unit: str = "full_preact"
    shortcut: str = "identity"
    shortcut_scale: float | None = None
    residual_scale: float | None = None
    gate_bias: float | None = None
    shortcut_dropout_rate: float | None = None
    layout: object = None  # a preset name, or a `Layout.to_config()` dict once derived
    width_multiplier: float = 1.0
    zero_init_residual: bool = False
    drop_path_rate: float = 0.0
    scan_units: bool = False
    weights: str | None = None
    origins: Mapping = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if hasattr(self, "lr_boundaries"):
            object.__setattr__(self, "lr_boundaries", tuple(float(b) for b in self.lr_boundaries))
        origins = {f: "default" for f in self.option_names()} | dict(self.origins)
        object.__setattr__(self, "origins", types.MappingProxyType(origins))

    @classmethod
    def option_names(cls):
        return [f.name for f in dataclasses.fields(cls) if f.name != "origins"]

    @property
    def values(self):
        """Every option's value, read-only."""
        return types.MappingProxyType({n: getattr(self, n) for n in self.option_names()})

    @classmethod
    def from_values(cls, values=None, *, explicit=(), preset=None):
        """A config from values, the names given explicitly and a preset's values.

        A preset supplies the values of the options not given explicitly; an explicit
        value always wins (`--preset=paper --epochs=1` runs one epoch).
        """
        values, preset = dict(values or {}), dict(preset or {})
        names = set(cls.option_names())
        unknown = sorted((set(values) | set(preset)) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no options {unknown}; options: {sorted(names)}.")
        merged, origins = {}, {}
        for name in names:
            if name in explicit and name in values:
                merged[name], origins[name] = values[name], "flag"
            elif name in preset:
                merged[name], origins[name] = preset[name], "preset"
            elif name in values:
                merged[name], origins[name] = values[name], "default"
        return cls(**merged, origins=origins)

    @classmethod
    def from_flags(cls, flag_values):
        """The config of parsed command-line flags (absl's `FLAGS`), `--preset` applied.

        Only options with a flag of the same name are read; the others keep their
        defaults.
        """
        names = [n for n in cls.option_names() if n in flag_values]
        values = {n: flag_values[n].value for n in names}
        explicit = {n for n in names if flag_values[n].present}
        preset = PRESETS.get(cls.trainer, {}).get(values.get("preset")) or {}
        return cls.from_values(values, explicit=explicit, preset=preset)

    def derive(self, **values):
        """A copy with values computed from the others (steps per epoch, base lr, ...).

        A derived value only fills an option that is unset (None) or `"auto"`: it never
        overrides what a flag or preset said. `total_steps` follows from `epochs` and
        `steps_per_epoch` once both are known.
        """
        for name, value in values.items():
            if name not in self.values:
                raise ValueError(f"{type(self).__name__} has no option {name!r}.")
            current = self.values[name]
            if current not in (None, "auto") and current != value:
                raise ValueError(
                    f"cannot derive {name}={value!r}: it is already {current!r} "
                    f"(from the {self.origins[name]})."
                )
        origins = dict(self.origins)
        for name in values:
            if self.values[name] in (None, "auto"):
                origins[name] = "derived"
        out = dataclasses.replace(self, **values, origins=origins)
        if getattr(out, "steps_per_epoch", None) and out.total_steps is None:
            out = out.derive(total_steps=out.steps_per_epoch * out.epochs)
        return out

    def with_flags(self, **values):
        """A copy with options set as if given on the command line."""
        origins = {**self.origins, **{n: "flag" for n in values}}
        return dataclasses.replace(self, **values, origins=origins)

    def boundary_steps(self):
        """`lr_boundaries` (epochs) as optimizer steps."""
        return [int(round(b * self.steps_per_epoch)) for b in self.lr_boundaries]

    def record(self):
        """The JSON-ready record of `config.json`: each value, and `origins`."""
        out = {n: v for n, v in self.values.items()}
        for name in ("lr_boundaries", "class_names"):
            if out.get(name) is not None:
                out[name] = list(out[name])
        for name in ("mean", "std"):
            if out.get(name) is not None:
                out[name] = [float(v) for v in out[name]]
        return {**out, "trainer": self.trainer, "origins": dict(self.origins)}


@dataclasses.dataclass(frozen=True)
class TrainConfig(ModelConfig):
    """The options every trainer has."""

    preset: str | None = None
    model_dir: str | None = None
    strategy: str = "default"
    tpu: str = ""
    coordinator_address: str = ""
    num_processes: int | None = None
    process_id: int | None = None
    loop: str = "auto"
    batch_size: int = 128
    epochs: int = 160
    steps_per_epoch: int | None = None
    max_steps: int | None = None
    time_budget: float | None = None
    allow_changes: tuple = ()
    restart_optimizer: bool = False
    # Optimization.
    lr_schedule: str = "step"
    base_lr: float | None = None
    lr_boundaries: tuple = ()
    warmup_steps: int = 0
    warmup: str = "linear"
    warmup_lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    weight_decay_on: str = "kernels"
    label_smoothing: float = 0.0
    # Fine-tuning.
    freeze_stages: int = 0
    freeze_batchnorm: bool = False
    backbone_lr_scale: float = 1.0
    # Execution.
    mixed_precision: bool = False
    jit_compile: bool | None = None  # None: on under JAX only (`distribution.setup`)
    compilation_cache: bool = True
    seed: int = 0
    deterministic: bool = False
    normalize_on_device: bool = True
    verbose: int = 1
    # Derived by `derive` (None until then).
    total_steps: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    decayed_weights: int | None = None  # weights (scalars) under weight decay


@dataclasses.dataclass(frozen=True)
class CifarConfig(TrainConfig):
    """`cifar.py`: CIFAR-10/100 or Fashion-MNIST, in memory."""

    trainer = "cifar"
    dataset: str = "cifar10"
    source: str = "tfds"
    data_dir: str | None = None
    pipeline: str = "auto"
    flip: bool = True
    padding: int = 4
    erasing: float = 0.0
    eval_examples: int | None = None
    eval_batch_size: int | None = None
    num_train: int | None = None
    num_test: int | None = None


@dataclasses.dataclass(frozen=True)
class ImagenetConfig(TrainConfig):
    """`imagenet.py`: ImageNet-format TFRecords or TFDS, through tf.data."""

    trainer = "imagenet"
    model: str = "PreActResNet50"
    batch_size: int = 256
    epochs: int = 90
    dataset: str = "imagenet"
    source: str = "tfrecord"
    data_dir: str | None = None
    validation_split: float | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    bad_images: str = "skip"
    bad_labels: str = "stop"
    num_classes: int | None = None
    num_train_examples: int | None = None
    num_eval_examples: int | None = None
    train_crop: str = "auto"
    color_augmentation: bool = False
    fused_decode: bool = True
    image_size: int | None = None
    eval_resize: int | None = None
    eval_size: int | None = None
    shuffle_buffer: int = 10_000
    label_offset: int = 1
    # Derived from the data (None until then).
    class_names: tuple | None = None
    channels: int | None = None


@dataclasses.dataclass(frozen=True)
class EvalConfig(ModelConfig):
    """`evaluate.py`: a weights file or record on a test set."""

    trainer = "evaluate"
    model: str | None = None
    config: str | None = None
    dataset: str = "imagenet"
    source: str | None = None
    data_dir: str | None = None
    split: str = "validation"
    num_classes: int | None = None
    eval_resize: int = 256
    eval_size: int = 224
    ten_crop: bool = False
    batch_size: int = 100
    label_offset: int = 1
    max_batches: int | None = None
    output: str | None = None


CONFIGS = {"cifar": CifarConfig, "imagenet": ImagenetConfig}

#: The trainers' presets: `--preset=NAME` fills the options not given on the command line.
PRESETS = {
    "cifar": {
        # Sec. 4 and the appendix: batch 128, lr 0.1 / 10 at 32k and 48k iterations, stop at
        # 64k (160 epochs of 400 steps), lr 0.01 for the first 400 iterations.
        "paper": {
            "batch_size": 128,
            "steps_per_epoch": 400,
            "epochs": 160,
            "lr_schedule": "step",
            "lr_boundaries": (80, 120),
            "warmup_steps": 400,
            "warmup": "constant",
            "warmup_lr": 0.01,
            "base_lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 1e-4,
        },
    },
    "imagenet": {
        # He et al. 2015's ImageNet schedule, 90 epochs (fb.resnet.torch's length).
        "paper": {
            "batch_size": 256,
            "epochs": 90,
            "lr_schedule": "step",
            "lr_boundaries": (30, 60),
            "momentum": 0.9,
            "weight_decay": 1e-4,
        },
    },
}


def get_config(name=None, trainer="cifar", **options):
    """The config of preset `name` (None: the defaults) for `trainer`, with `options` set.

    Args:
        name: a preset of `PRESETS[trainer]`, or None.
        trainer: `"cifar"` or `"imagenet"`.
        **options: values that win over the preset (recorded as given by flag).
    """
    if trainer not in CONFIGS:
        raise ValueError(f"trainer={trainer!r}; allowed: {sorted(CONFIGS)}.")
    presets = PRESETS[trainer]
    if name is not None and name not in presets:
        raise ValueError(f"preset={name!r} for {trainer}; allowed: {sorted(presets)}.")
    preset = dict(presets.get(name, {}))
    if name is not None:
        options.setdefault("preset", name)
    return CONFIGS[trainer].from_values(options, explicit=set(options), preset=preset)
