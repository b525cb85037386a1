"""A run's configuration: the trainers' flags, their checks, presets, and one frozen `Config`.

Flags are parsed once. `from_flags` turns them into a `Config`: every value of the flags
the script itself defines (not TensorFlow's or absl's own), the preset's values for the
flags not given on the command line, and where each value came from (`"flag"`,
`"preset"`, `"default"`, or `"derived"` for values computed later, such as the steps per
epoch). Every function of the trainers takes the `Config` it needs; nothing reads the
global `FLAGS` after `main()` has built it.

Bad values fail while the flags are parsed, before any data or model work: each flag
carries its own check (absl validators), and checks across flags are multi-flag
validators registered next to the flags they read.

Example:

>>> cfg = Config.from_values({"epochs": 1, "batch_size": 128}, explicit={"epochs"},
...                          preset={"epochs": 160, "steps_per_epoch": 400})
>>> cfg.epochs, cfg.steps_per_epoch, cfg.origins["epochs"], cfg.origins["steps_per_epoch"]
(1, 400, 'flag', 'preset')
"""

import dataclasses
import os
import sys
import types
from collections.abc import Mapping

from absl import flags

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
#: The named shortcuts of `keras_preact.shortcuts` and the parameter flags each takes.
SHORTCUT_PARAMS = {
    "identity": (),
    "constant_scaling": ("shortcut_scale", "residual_scale"),
    "exclusive_gating": ("gate_bias",),
    "shortcut_only_gating": ("gate_bias",),
    "conv1x1": (),
    "dropout": ("shortcut_dropout_rate",),
}
#: Where each value of a `Config` came from.
ORIGINS = ("flag", "preset", "default", "derived")


# ----------------------------------------------------------------------------
# The frozen configuration.


@dataclasses.dataclass(frozen=True)
class Config:
    """A run's settings, read-only: `cfg.batch_size`, `cfg.origins["batch_size"]`.

    Attributes:
        values: option name -> value (flag values after the preset, then derived values).
        origins: option name -> `"flag"`, `"preset"`, `"default"` or `"derived"`.
    """

    values: Mapping
    origins: Mapping

    @classmethod
    def from_values(cls, values, *, explicit=(), preset=None):
        """A `Config` from parsed values, the names given explicitly and a preset.

        A preset supplies the values of the options not given explicitly; an explicit
        value always wins (`--preset=paper --epochs=1` runs one epoch).
        """
        preset = dict(preset or {})
        unknown = sorted(set(preset) - set(values))
        if unknown:
            raise ValueError(f"preset sets unknown options {unknown}.")
        merged, origins = {}, {}
        for name, value in values.items():
            if name in explicit:
                merged[name], origins[name] = value, "flag"
            elif name in preset:
                merged[name], origins[name] = preset[name], "preset"
            else:
                merged[name], origins[name] = value, "default"
        return cls(types.MappingProxyType(merged), types.MappingProxyType(origins))

    def __getattr__(self, name):
        if name.startswith("__") or name in ("values", "origins"):
            raise AttributeError(name)
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(
                f"Config has no option {name!r}; options: {sorted(self.values)}."
            ) from None

    def derive(self, **values):
        """A copy with values computed from the others (steps per epoch, base lr, ...).

        A derived value only fills an option that is new, unset (None) or `"auto"`: it
        never overrides what a flag or preset said.
        """
        for name, value in values.items():
            if self.values.get(name) not in (None, "auto") and self.values[name] != value:
                raise ValueError(
                    f"cannot derive {name}={value!r}: it is already {self.values[name]!r} "
                    f"(from the {self.origins[name]})."
                )
        merged = {**self.values, **values}
        origins = {**self.origins}
        for name in values:
            if self.values.get(name) in (None, "auto"):
                origins[name] = "derived"
        return Config(types.MappingProxyType(merged), types.MappingProxyType(origins))

    def record(self):
        """The JSON-ready record of `config.json`: each value, and `origins`."""
        return {**self.values, "origins": dict(self.origins)}


def from_flags(flag_values, presets=None):
    """The `Config` of the running script: its own flags, with `--preset` applied.

    "Its own flags" are absl's key flags of the main module: those it defines and those
    it adopts from `training/config.py`; TensorFlow's and absl's flags are not in it.
    """
    names = sorted({f.name for f in flag_values.get_key_flags_for_module(sys.argv[0])})
    values = {n: flag_values[n].value for n in names}
    explicit = {n for n in names if flag_values[n].present}
    preset_name = values.get("preset")
    preset = (presets or {}).get(preset_name, {}) if preset_name else {}
    return Config.from_values(values, explicit=explicit, preset=preset)


# ----------------------------------------------------------------------------
# Flag definitions shared by the scripts.


def _positive(value):
    return value is None or value > 0


def _non_negative(value):
    return value is None or value >= 0


def _fraction(value):
    return value is None or 0.0 <= value < 1.0


def _numbers(values):
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def define_model_flags(*, model, weights_help):
    """The architecture flags: everything the keras_preact builders take.

    Used by both trainers and by `evaluate.py` (which reads them from a run's
    `config.json` when it has one).
    """
    import keras_preact

    flags.DEFINE_enum("model", model, keras_preact.list_models(), "Builder name.")
    flags.DEFINE_enum(
        "unit",
        "full_preact",
        list(keras_preact.units.UNITS),
        "Residual unit of the paper's Fig. 4: original (a), bn_after_add (b), "
        "relu_before_add (c), relu_preact (d), full_preact (e, the paper's choice).",
    )
    flags.DEFINE_enum(
        "shortcut",
        "identity",
        list(SHORTCUT_PARAMS),
        "Shortcut of the paper's Fig. 2 (Table 1), replacing the identity shortcuts.",
    )
    flags.DEFINE_float(
        "shortcut_scale", None, "constant_scaling: lambda, the factor on the shortcut (0.5)."
    )
    flags.DEFINE_float(
        "residual_scale",
        None,
        "constant_scaling: the factor on the residual branch (0.5; 1.0 is Table 1's 'F unscaled').",
    )
    flags.DEFINE_float(
        "gate_bias", None, "exclusive_gating / shortcut_only_gating: initial gate bias (-6)."
    )
    flags.DEFINE_float("shortcut_dropout_rate", None, "dropout shortcut: drop rate (0.5).")
    flags.register_validator("shortcut_dropout_rate", _fraction, message="must be in [0, 1).")
    flags.DEFINE_string(
        "layout",
        None,
        "Checkpoint layout preset (keras_preact.LAYOUTS: paper, timm, keras, fb, "
        "fb_legacy). Default: the weights record's, else the paper's.",
    )
    flags.register_validator(
        "layout",
        lambda v: v is None or v in layout_names(),
        message=f"must be one of {layout_names()}.",
    )
    flags.DEFINE_float("width_multiplier", 1.0, "Multiplies every stage width (wide ResNets).")
    flags.register_validator("width_multiplier", _positive, message="must be > 0.")
    flags.DEFINE_bool(
        "zero_init_residual", False, "Start every residual branch at zero (beyond the paper)."
    )
    flags.DEFINE_string("weights", None, weights_help)

    def known_weights(value):
        if value is None or os.path.isfile(value):
            return True
        records = sorted({r.name for r in keras_preact.weights.RECORDS})
        datasets = sorted({r.dataset for r in keras_preact.weights.RECORDS})
        if value in records or value in datasets:
            return True
        raise flags.ValidationError(
            f"is neither a file nor a weights record; records: {datasets + records}."
        )

    flags.register_validator("weights", known_weights)

    def shortcut_params_match(values):
        wanted = SHORTCUT_PARAMS[values["shortcut"]]
        given = [p for p in _all_shortcut_params() if values[p] is not None]
        stray = [p for p in given if p not in wanted]
        if stray:
            raise flags.ValidationError(
                f"--{stray[0]} is a parameter of --shortcut="
                f"{[s for s, ps in SHORTCUT_PARAMS.items() if stray[0] in ps]}, not of "
                f"--shortcut={values['shortcut']} (which takes {list(wanted) or 'none'})."
            )
        return True

    flags.register_multi_flags_validator(
        ["shortcut", *_all_shortcut_params()], shortcut_params_match
    )


def _all_shortcut_params():
    return sorted({p for ps in SHORTCUT_PARAMS.values() for p in ps})


def layout_names():
    """The layout presets of the model library."""
    import keras_preact

    return list(getattr(keras_preact, "LAYOUTS", ("paper", "timm", "keras", "fb", "fb_legacy")))


def define_train_flags(*, model, batch_size, epochs, lr_schedule, presets):
    """The flags both trainers share, with per-script defaults and presets.

    Args:
        model: default `--model`.
        batch_size: default global batch size.
        epochs: default number of epochs.
        lr_schedule: default schedule.
        presets: `{name: {option: value}}`; `--preset=name` supplies these values for
            the options not given on the command line.
    """
    flags.DEFINE_enum(
        "preset",
        None,
        list(presets),
        "Recipe whose values fill every flag not given on the command line: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
            for name, values in presets.items()
        ),
    )
    define_model_flags(
        model=model,
        weights_help="Start from these weights (fine-tuning): a keras_preact weights record "
        "(imagenet, imagenet:fb_torch, fashion_mnist, ...) or a weights file. With another "
        "number of classes, every layer but the classifier is loaded.",
    )
    flags.DEFINE_string("model_dir", None, "Where the run writes everything.", required=True)
    flags.DEFINE_enum("strategy", "default", STRATEGIES, "Distribution strategy.")
    flags.DEFINE_string("tpu", "", "TPU name or grpc:// address for --strategy=tpu.")
    flags.DEFINE_integer(
        "batch_size", batch_size, "Global batch size (all replicas).", lower_bound=1
    )
    flags.DEFINE_integer("epochs", epochs, "Number of Keras epochs.", lower_bound=1)
    flags.DEFINE_integer(
        "steps_per_epoch",
        None,
        "Steps per Keras epoch (default: one pass over the data).",
        lower_bound=1,
    )
    flags.DEFINE_enum(
        "lr_schedule",
        lr_schedule,
        ["step", "cosine", "constant"],
        "step: divide by 10 at --lr_boundaries; cosine: cosine decay to 0.",
    )
    flags.DEFINE_float(
        "base_lr",
        None,
        "Peak learning rate (default: 0.1 * batch / 256 for ImageNet, 0.1 for CIFAR).",
    )
    flags.register_validator("base_lr", _positive, message="must be > 0.")
    flags.DEFINE_list(
        "lr_boundaries",
        [],
        "Steps (CIFAR) or epochs (ImageNet) at which "
        "the step schedule divides the learning rate by 10.",
    )
    flags.register_validator(
        "lr_boundaries",
        lambda v: _numbers(v) is not None and all(b >= 0 for b in _numbers(v)),
        message="must be a comma-separated list of non-negative numbers.",
    )
    flags.DEFINE_integer("warmup_steps", 0, "Warm-up steps.", lower_bound=0)
    flags.DEFINE_enum(
        "warmup",
        "linear",
        ["linear", "constant"],
        "linear: ramp from 0 to base_lr; constant: hold --warmup_lr "
        "(the paper's 0.01 for the first 400 iterations).",
    )
    flags.DEFINE_float("warmup_lr", 0.01, "Learning rate of a constant warm-up.")
    flags.register_validator("warmup_lr", _non_negative, message="must be >= 0.")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.register_validator("momentum", _fraction, message="must be in [0, 1).")
    flags.DEFINE_bool("nesterov", False, "Nesterov momentum.")
    flags.DEFINE_float("weight_decay", 1e-4, "L2 coefficient (gradient += wd * w).")
    flags.register_validator("weight_decay", _non_negative, message="must be >= 0.")
    flags.DEFINE_enum(
        "weight_decay_on",
        "kernels",
        ["kernels", "all"],
        "kernels: conv and dense kernels only; all: every trainable "
        "weight, as the paper's Torch code does.",
    )
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing (0 in the paper).")
    flags.register_validator("label_smoothing", _fraction, message="must be in [0, 1).")
    flags.DEFINE_bool("mixed_precision", False, "float16 compute on GPU, bfloat16 on TPU/CPU.")
    flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step.")
    flags.DEFINE_bool(
        "compilation_cache",
        True,
        "JAX backend: keep XLA's compiled programs in MODEL_DIR/jax_cache, so a resumed "
        "or repeated run skips the compile (JAX's persistent compilation cache).",
    )
    flags.DEFINE_integer("seed", 0, "Seed for initialization and the input pipeline.")
    flags.DEFINE_bool("deterministic", False, "Deterministic input order and ops (slower).")
    flags.DEFINE_enum(
        "loop",
        "auto",
        ["auto", "fit", "custom"],
        "auto: model.fit, except a strategy.run loop under "
        "multi_worker_mirrored (Keras 3 fit fails there). custom needs the TensorFlow "
        "backend (tf.distribute).",
    )
    flags.DEFINE_float("drop_path_rate", 0.0, "Stochastic depth rate (0 in the paper).")
    flags.register_validator("drop_path_rate", _fraction, message="must be in [0, 1).")
    flags.DEFINE_bool(
        "normalize_on_device",
        True,
        "Ship uint8 batches; the model normalizes them as its first layer "
        "(include_preprocessing=True), on the accelerator: 4x less host-to-device traffic.",
    )
    flags.DEFINE_integer(
        "verbose", 1, "Keras progress bar: 0 silent, 1 bar, 2 line per epoch.", lower_bound=0
    )
    flags.DEFINE_integer(
        "max_steps", None, "Stop after this many steps in total (smoke tests).", lower_bound=1
    )

    def tpu_named(values):
        if values["strategy"] == "tpu" and not values["tpu"]:
            raise flags.ValidationError(
                "--strategy=tpu needs --tpu=NAME (a Cloud TPU name or grpc://host:8470)."
            )
        return True

    flags.register_multi_flags_validator(["strategy", "tpu"], tpu_named)

    def loop_has_backend(values):
        import keras

        backend = keras.backend.backend()
        custom = values["loop"] == "custom" or (
            values["loop"] == "auto" and values["strategy"] == "multi_worker_mirrored"
        )
        if custom and backend != "tensorflow":
            raise flags.ValidationError(
                f"--loop=custom (the strategy.run loop, also chosen by --loop=auto with "
                f"--strategy=multi_worker_mirrored) needs tf.distribute, i.e. "
                f"KERAS_BACKEND=tensorflow; got KERAS_BACKEND={backend}. Use --loop=fit."
            )
        return True

    flags.register_multi_flags_validator(["loop", "strategy"], loop_has_backend)

    def strategy_has_backend(strategy):
        import keras

        backend = keras.backend.backend()
        allowed = {"tensorflow": STRATEGIES, "jax": ("default", "one_device", "mirrored")}
        allowed = allowed.get(backend, ("default", "one_device"))
        if strategy not in allowed:
            raise flags.ValidationError(
                f"--strategy={strategy} is not available with KERAS_BACKEND={backend}; "
                f"allowed: {list(allowed)} (every strategy runs under tensorflow)."
            )
        return True

    flags.register_validator("strategy", strategy_has_backend)


def lr_boundaries(cfg):
    """`--lr_boundaries` as numbers (steps for CIFAR, epochs for ImageNet)."""
    return [float(b) for b in cfg.lr_boundaries]
