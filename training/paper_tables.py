r"""The paper's Tables 1 and 2 on Fashion-MNIST: every shortcut and unit variant, one schedule.

He et al. 2016, Table 1 (ResNet-110 with the original unit, Fig. 2's shortcuts) and Table 2
(ResNet-110 and ResNet-164, Fig. 4's units), trained on Fashion-MNIST with one schedule for
all, on the JAX backend and the numpy input pipeline (no TensorFlow). Results go beside the
paper's CIFAR-10 numbers. The work is cut into parts that each fit one command of a GPU
machine lent for short sessions (at most 9 minutes of an H100, by the estimate in
docs/gpu.md); a part that is cut off resumes where it stopped when run again.

    KERAS_BACKEND=jax python training/paper_tables.py --part=1 \
        --data_dir=/usr/share/datasets/fashion-mnist --model_dir=runs/paper_tables

Parts (18 runs per seed; Table 2's ResNet-110 "original" row is Table 1's identity run):
1 = Table 1's first 7 shortcuts (identity, constant scaling, both gatings); 2 = Table 1's
1x1-conv and dropout shortcuts and Table 2's four other units at ResNet-110; 3 = Table 2's
five units at ResNet-164. `--part=2,3` runs two in one command, `--part=all` everything;
`--part=report` only rewrites the outputs from the results already in `--model_dir`.

Schedule (all variants): SGD momentum 0.9, batch 128, weight decay 1e-4 on conv and dense
kernels, lr 0.01 for the first 400 steps (the paper's warm-up for ResNet-110), then 0.1,
divided by 10 at 50 % and 75 % of `--epochs` (the paper's 32k/48k of 64k steps); 4-pixel
padding, random 28x28 crop, horizontal flip; bf16 compute (`mixed_bfloat16`).

Outputs in `--model_dir` (and copied to `--out`, at most 8 files): `paper_tables.csv` (final
test error per variant and seed), `paper_tables_curves.csv` (training loss every 50 steps,
test error every epoch), `paper_tables.md` (both tables beside the paper's numbers),
`paper_tables_table1.png` and `paper_tables_table2.png` (curves in the manner of the paper's
Figs. 3 and 6), `status.json`. Results already in `paper_tables.csv` are kept: a variant and
seed listed there is not trained again, so parts run on different machines merge when their
`paper_tables*.csv` files are copied into one `--model_dir`.

Several variants share the GPU at once: `--procs` worker processes take the part's
variants in turn (compilation of one overlaps training of another; the XLA compilation
cache in `--model_dir/jax_cache` serves later seeds of a variant). `--time_budget_s` stops
every worker before the command limit with a checkpoint per variant (every epoch), and the
same command resumes. `--smoke` trains tiny networks for a few steps on CPU (CI).
"""

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time

START = time.time()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import xla_env  # noqa: E402  (sets no JAX state until called)

#: name -> (table, depth, unit, shortcut label, shortcut factory args, paper CIFAR-10 error).
#: The paper's numbers: Table 1 (ResNet-110, original unit) and Table 2 (ResNet-110/164).
# fmt: off
VARIANTS = {
    "r110_identity": (1, 110, "original", "identity", ("identity",), "6.61"),
    "r110_constant_0.5": (1, 110, "original", "constant scaling 0.5, F x0.5",
                          ("constant_scaling", 0.5, 0.5), "12.35"),
    "r110_constant_0.5_f1": (1, 110, "original", "constant scaling 0.5, F x1",
                             ("constant_scaling", 0.5, 1.0), "fail"),
    "r110_exclusive_gating_b-6": (1, 110, "original", "exclusive gating, b_g=-6",
                                  ("exclusive_gating", -6.0), "8.70"),
    "r110_exclusive_gating_b0": (1, 110, "original", "exclusive gating, b_g=0",
                                 ("exclusive_gating", 0.0), "fail"),
    "r110_shortcut_only_gating_b-6": (1, 110, "original", "shortcut-only gating, b_g=-6",
                                      ("shortcut_only_gating", -6.0), "6.91"),
    "r110_shortcut_only_gating_b0": (1, 110, "original", "shortcut-only gating, b_g=0",
                                     ("shortcut_only_gating", 0.0), "12.86"),
    "r110_conv1x1": (1, 110, "original", "1x1 conv", ("conv1x1",), "12.22"),
    "r110_dropout_0.5": (1, 110, "original", "dropout 0.5", ("dropout", 0.5), "fail"),
    "r110_bn_after_add": (2, 110, "bn_after_add", "identity", ("identity",), "8.17"),
    "r110_relu_before_add": (2, 110, "relu_before_add", "identity", ("identity",), "7.84"),
    "r110_relu_preact": (2, 110, "relu_preact", "identity", ("identity",), "6.71"),
    "r110_full_preact": (2, 110, "full_preact", "identity", ("identity",), "6.37"),
    "r164_original": (2, 164, "original", "identity", ("identity",), "5.93"),
    "r164_bn_after_add": (2, 164, "bn_after_add", "identity", ("identity",), "6.50"),
    "r164_relu_before_add": (2, 164, "relu_before_add", "identity", ("identity",), "6.14"),
    "r164_relu_preact": (2, 164, "relu_preact", "identity", ("identity",), "5.91"),
    "r164_full_preact": (2, 164, "full_preact", "identity", ("identity",), "5.46"),
}
#: Table 2's ResNet-110 "original" row is Table 1's identity row: one run serves both.
TABLE2_ROWS = {
    110: ["r110_identity", "r110_bn_after_add", "r110_relu_before_add", "r110_relu_preact",
          "r110_full_preact"],
    164: ["r164_original", "r164_bn_after_add", "r164_relu_before_add", "r164_relu_preact",
          "r164_full_preact"],
}
# fmt: on
UNIT_LABELS = {
    "original": "original (Fig. 4a)",
    "bn_after_add": "BN after addition (4b)",
    "relu_before_add": "ReLU before addition (4c)",
    "relu_preact": "ReLU-only pre-activation (4d)",
    "full_preact": "full pre-activation (4e)",
}
#: The parts, each sized for one 9-minute command on an H100 by the estimate in docs/gpu.md:
#: 7 and 6 ResNet-110 runs, then the 5 ResNet-164 runs (about 1.6x a ResNet-110 run each).
TABLE1 = [v for v, spec in VARIANTS.items() if spec[0] == 1]
PARTS = {
    "1": TABLE1[:7],
    "2": TABLE1[7:] + [v for v, spec in VARIANTS.items() if spec[0] == 2 and spec[1] == 110],
    "3": [v for v, spec in VARIANTS.items() if spec[0] == 2 and spec[1] == 164],
}
#: Smoke runs replace the depths by the smallest of each block kind (CPU, seconds).
SMOKE_DEPTH = {110: 8, 164: 11}
#: Smoke runs train one variant of each table (a random layer, a bottleneck pre-activation).
SMOKE_VARIANTS = ["r110_dropout_0.5", "r164_full_preact"]
RESULT_FIELDS = [
    "table",
    "variant",
    "depth",
    "unit",
    "shortcut",
    "seed",
    "epochs",
    "steps",
    "final_test_error",
    "best_test_error",
    "final_train_loss",
    "status",
    "train_seconds",
    "paper_cifar10_error",
]
CURVE_FIELDS = ["variant", "seed", "kind", "epoch", "step", "lr", "train_loss", "test_error"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", default="1", help="1, 2, 3, a comma list, all, or report")
    p.add_argument(
        "--data_dir",
        default="/usr/share/datasets/fashion-mnist",
        help="folder of the four Fashion-MNIST IDX files (.gz or not)",
    )
    p.add_argument("--model_dir", default="runs/paper_tables")
    p.add_argument("--out", default=None, help="also copy the outputs here (e.g. $OUT)")
    p.add_argument("--seeds", default="0", help="comma list of seeds per variant")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--base_lr", type=float, default=0.1)
    p.add_argument("--warmup_steps", type=int, default=400)
    p.add_argument("--warmup_lr", type=float, default=0.01)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--procs", type=int, default=2, help="worker processes sharing the device")
    p.add_argument(
        "--time_budget_s",
        type=float,
        default=540.0,
        help="stop cleanly (checkpointed) before this many seconds; 0: no limit",
    )
    p.add_argument(
        "--start_margin_s",
        type=float,
        default=90.0,
        help="start no new run with less time left (compile + first epoch)",
    )
    p.add_argument("--log_every", type=int, default=50, help="training-loss log interval, steps")
    p.add_argument("--smoke", action="store_true", help="tiny networks, few steps, CPU (CI)")
    # Internal: a worker process trains the variants it is given.
    p.add_argument("--worker_variants", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part not in ("all", "report"):
        bad = [x for x in args.part.split(",") if x not in PARTS]
        if bad:
            p.error(
                f"--part={args.part!r}: unknown part(s) {bad}; allowed: "
                f"{sorted(PARTS)}, a comma list of them, 'all' or 'report'."
            )
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds={args.seeds!r} must be a comma list of integers.")
    if args.procs < 1:
        p.error(f"--procs={args.procs} must be >= 1.")
    if args.smoke:
        # Tiny and quick: 3 variants, 2 epochs of 3 steps, small data subsets.
        args.epochs, args.batch_size, args.warmup_steps = 2, 16, 2
        args.log_every, args.start_margin_s = 2, 0.0
    return args


def config_of(args):
    """The settings every result in one `--model_dir` shares (checked on resume and merge)."""
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "base_lr": args.base_lr,
        "warmup_steps": args.warmup_steps,
        "warmup_lr": args.warmup_lr,
        "weight_decay": args.weight_decay,
        "precision": args.precision,
        "smoke": bool(args.smoke),
    }


def variants_of(args):
    if args.part == "report":
        return []
    names = (
        list(VARIANTS)
        if args.part == "all"
        else [v for part in args.part.split(",") for v in PARTS[part]]
    )
    if args.smoke:
        names = [v for v in names if v in SMOKE_VARIANTS] or SMOKE_VARIANTS[:1]
    return names


# -- Results files ----------------------------------------------------------------------


def _read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path, fields, rows):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def run_dir(args, variant, seed):
    return os.path.join(args.model_dir, "runs", variant, f"seed{seed}")


def collect(args):
    """Merges results and curves: the CSVs in `--model_dir` and every finished run folder.

    Returns `(results, curves)`, keyed by (variant, seed); a run folder wins over a CSV row.
    """
    results = {
        (r["variant"], int(r["seed"])): r
        for r in _read_csv(os.path.join(args.model_dir, "paper_tables.csv"))
    }
    curves = {}
    for r in _read_csv(os.path.join(args.model_dir, "paper_tables_curves.csv")):
        curves.setdefault((r["variant"], int(r["seed"])), []).append(r)
    for variant in VARIANTS:
        for seed_dir in sorted(_glob_dirs(os.path.join(args.model_dir, "runs", variant))):
            final = os.path.join(seed_dir, "final.json")
            if not os.path.exists(final):
                continue
            with open(final) as f:
                rec = json.load(f)
            key = (variant, int(rec["result"]["seed"]))
            results[key] = rec["result"]
            curves[key] = rec["curves"]
    return results, curves


def _glob_dirs(path):
    if not os.path.isdir(path):
        return []
    return [os.path.join(path, d) for d in os.listdir(path) if d.startswith("seed")]


def check_config(args):
    """Records the run's settings in `--model_dir/config.json`, or refuses a different one."""
    path = os.path.join(args.model_dir, "config.json")
    cfg = config_of(args)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = {k: (saved.get(k), v) for k, v in cfg.items() if saved.get(k) != v}
        if diff:
            raise SystemExit(
                f"{args.model_dir} holds results of other settings "
                + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                + ". Use another --model_dir or the same settings."
            )
        return
    os.makedirs(args.model_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)


# -- Training one variant (worker) ------------------------------------------------------


def train_variants(args, names):
    """Trains each (variant, seed) in turn in this process, until done or out of time."""
    import keras

    import keras_preact
    from keras_preact import shortcuts
    from keras_preact.data import idx
    from training import jax_loop

    guard = jax_loop.TimeGuard(None)
    if args.deadline:
        guard.deadline = args.deadline
    keras.config.set_dtype_policy("mixed_bfloat16" if args.precision == "bf16" else "float32")
    (x_train, y_train), (x_test, y_test) = idx.load_fashion_mnist(args.data_dir)
    if args.smoke:
        x_train, y_train, x_test, y_test = x_train[:96], y_train[:96], x_test[:40], y_test[:40]
    steps_per_epoch = len(x_train) // args.batch_size
    if args.smoke:
        steps_per_epoch = 3
    total = args.epochs * steps_per_epoch
    augment = jax_loop.Augment(padding=4, flip=True)
    # The paper's schedule: 0.01 warm-up, then 0.1 divided by 10 at 32k and 48k of 64k steps.
    schedule = jax_loop.Schedule(
        args.base_lr,
        decay="step",
        boundaries=(0.5, 0.75),
        warmup_steps=args.warmup_steps,
        warmup="constant",
        warmup_lr=args.warmup_lr,
    )
    for variant in names:
        table, depth, unit, _, factory, paper = VARIANTS[variant]
        if args.smoke:
            depth = SMOKE_DEPTH[depth]
        model = step = eval_step = None
        for seed in args.seed_list:
            folder = run_dir(args, variant, seed)
            if os.path.exists(os.path.join(folder, "final.json")):
                continue
            # Compilation and a first epoch must fit before a run starts.
            if not guard.fits(args.start_margin_s):
                print(f"[{variant} seed {seed}] not started: the time budget is spent", flush=True)
                return False
            keras.utils.set_random_seed(seed)
            shortcut = getattr(shortcuts, factory[0])(*factory[1:])
            built = keras_preact.PreActResNet(
                depth=depth,
                family="cifar",
                block="basic" if VARIANTS[variant][1] == 110 else "bottleneck",
                unit=unit,
                shortcut=shortcut,
                input_shape=(28, 28, 1),
                classes=10,
                classifier_activation=None,
                include_preprocessing=True,  # uint8 batches; the model normalizes on the device
                preprocessing="fashion_mnist",
                seed=seed,
            )
            optimizer = keras.optimizers.SGD(args.base_lr, momentum=0.9)
            state = jax_loop.init_state(built, optimizer, total_steps=total)
            if model is None:  # later seeds reuse the compiled step (same structure)
                model = built
                step = jax_loop.make_train_step(
                    model, optimizer, schedule=schedule, weight_decay=args.weight_decay
                )
                eval_step = jax_loop.make_eval_step(model)
            spec = jax_loop.RunSpec(
                batch_size=args.batch_size,
                epochs=args.epochs,
                steps_per_epoch=steps_per_epoch,
                seed=seed,
                log_every=args.log_every,
                eval_batch_size=min(500, len(x_test)),
            )
            out = jax_loop.fit(
                state=state,
                train_step=step,
                eval_step=eval_step,
                data=((x_train, y_train), (x_test, y_test)),
                spec=spec,
                augment=augment,
                run_dir=folder,
                guard=guard,
                config={"variant": variant, **config_of(args)},
                schedule=schedule,
                iteration_index=jax_loop.iteration_index(optimizer),
                label=f"[{variant} seed {seed}] ",
            )
            if out["status"] == "stopped":
                print(
                    f"[{variant} seed {seed}] stopped at epoch {out['epoch']} by the time "
                    "budget; run the same command again to continue",
                    flush=True,
                )
                return False
            epochs = [r for r in out["rows"] if r["kind"] == "epoch"]
            errors = [r["test_error"] for r in epochs if r.get("test_error") is not None]
            result = {
                "table": table,
                "variant": variant,
                "depth": depth,
                "unit": unit,
                "shortcut": factory[0],
                "seed": seed,
                "epochs": out["epoch"],
                "steps": out["epoch"] * steps_per_epoch,
                "final_test_error": errors[-1] if errors else float("nan"),
                "best_test_error": min(errors)
                if errors and out["status"] == "done"
                else float("nan"),
                "final_train_loss": epochs[-1]["train_loss"] if epochs else float("nan"),
                "status": out["status"],
                "train_seconds": round(out["train_seconds"], 1),
                "paper_cifar10_error": paper,
            }
            curves = [
                {"variant": variant, "seed": seed, **{k: r.get(k) for k in CURVE_FIELDS[2:]}}
                for r in out["rows"]
            ]
            jax_loop._write_json(
                os.path.join(folder, "final.json"), {"result": result, "curves": curves}
            )
            for ckpt in os.listdir(folder):  # the result is kept; the weights are not needed
                if ckpt.startswith("ckpt-"):
                    shutil.rmtree(os.path.join(folder, ckpt), ignore_errors=True)
    return True


# -- Report -----------------------------------------------------------------------------


def _fmt_err(values):
    finite = [v for v in values if math.isfinite(v)]
    if not values:
        return ""
    if not finite:
        return "diverged"
    mean = sum(finite) / len(finite)
    text = f"{100 * mean:.2f}"
    if len(finite) > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
        text += f" ± {100 * sd:.2f}"
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)} diverged)"
    return text


def markdown(results, args):
    by_variant = {}
    for (variant, _), r in sorted(results.items()):
        by_variant.setdefault(variant, []).append(r)

    def cell(variant):
        rows = by_variant.get(variant, [])
        errs = [float(r["final_test_error"]) for r in rows if r["status"] in ("done", "diverged")]
        seeds = ",".join(str(r["seed"]) for r in rows)
        return _fmt_err(errs), seeds

    lines = [
        "Fashion-MNIST test error (%) after the last epoch, mean ± standard deviation over "
        "seeds, beside the paper's CIFAR-10 test error (%). Settings: "
        + ", ".join(f"{k}={v}" for k, v in config_of(args).items())
        + ".",
        "",
        "Table 1 (ResNet-110, original unit; shortcuts of Fig. 2):",
        "",
        "| shortcut | paper CIFAR-10 | Fashion-MNIST | seeds |",
        "| --- | --- | --- | --- |",
    ]
    for variant in TABLE1:
        err, seeds = cell(variant)
        lines.append(f"| {VARIANTS[variant][3]} | {VARIANTS[variant][5]} | {err} | {seeds} |")
    lines += [
        "",
        "Table 2 (units of Fig. 4; identity shortcuts):",
        "",
        "| unit | paper ResNet-110 | Fashion-MNIST ResNet-110 | paper ResNet-164 | "
        "Fashion-MNIST ResNet-164 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a, b in zip(TABLE2_ROWS[110], TABLE2_ROWS[164]):
        unit = VARIANTS[b][2]
        paper_a = "6.61" if a == "r110_identity" else VARIANTS[a][5]
        lines.append(
            f"| {UNIT_LABELS[unit]} | {paper_a} | {cell(a)[0]} | {VARIANTS[b][5]} | {cell(b)[0]} |"
        )
    missing = [v for v in VARIANTS if v not in by_variant]
    if missing:
        lines += ["", f"Not yet run: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def plot(curves, variants, path, title, args):
    """Training loss (dashed) and test error (solid) against steps, as the paper's Figs. 3/6."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_shortcut = isinstance(variants, list)  # Table 1: one panel pair, labelled by shortcut
    groups = [(title, variants)] if by_shortcut else list(variants.items())
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    for (name, names), (ax_loss, ax_err) in zip(groups, axes):
        for i, variant in enumerate(names):
            color = plt.cm.tab10(i % 10)
            label = VARIANTS[variant][3] if by_shortcut else UNIT_LABELS[VARIANTS[variant][2]]
            for (v, seed), rows in sorted(curves.items()):
                if v != variant:
                    continue
                train = [
                    (int(r["step"]), float(r["train_loss"]))
                    for r in rows
                    if r["kind"] == "train" and _finite(r["train_loss"])
                ]
                test = [
                    (int(r["step"]), 100 * float(r["test_error"]))
                    for r in rows
                    if r["kind"] == "epoch" and _finite(r.get("test_error"))
                ]
                lab = label if seed == min(s for vv, s in curves if vv == variant) else None
                if train:
                    ax_loss.plot(*zip(*train), "--", color=color, lw=1, label=lab)
                if test:
                    ax_err.plot(*zip(*test), "-", color=color, lw=1.5, label=lab)
        ax_loss.set(
            xlabel="iterations",
            ylabel="training loss (cross-entropy)",
            yscale="log",
            title=f"{name}: training loss",
        )
        ax_err.set(xlabel="iterations", ylabel="test error (%)", title=f"{name}: test error")
        ax_err.set_ylim(bottom=0)
        for ax in (ax_loss, ax_err):
            ax.grid(alpha=0.3)
        ax_err.legend(fontsize=7)
    fig.suptitle(f"Fashion-MNIST, {args.epochs} epochs, batch {args.batch_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _finite(value):
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def write_outputs(args, status):
    results, curves = collect(args)
    d = args.model_dir
    rows = [results[k] for k in sorted(results)]
    _write_csv(os.path.join(d, "paper_tables.csv"), RESULT_FIELDS, rows)
    curve_rows = [r for k in sorted(curves) for r in curves[k]]
    _write_csv(os.path.join(d, "paper_tables_curves.csv"), CURVE_FIELDS, curve_rows)
    with open(os.path.join(d, "paper_tables.md"), "w") as f:
        f.write(markdown(results, args))
    plot(curves, TABLE1, os.path.join(d, "paper_tables_table1.png"), "Table 1 (ResNet-110)", args)
    plot(
        curves,
        {"Table 2, ResNet-110": TABLE2_ROWS[110], "Table 2, ResNet-164": TABLE2_ROWS[164]},
        os.path.join(d, "paper_tables_table2.png"),
        "Table 2",
        args,
    )
    status = {**status, "results": len(rows), "elapsed_s": round(time.time() - START, 1)}
    with open(os.path.join(d, "status.json"), "w") as f:
        json.dump(status, f, indent=1)
    names = [
        "paper_tables.csv",
        "paper_tables_curves.csv",
        "paper_tables.md",
        "paper_tables_table1.png",
        "paper_tables_table2.png",
        "status.json",
        "config.json",
    ]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for n in names:
            shutil.copy(os.path.join(d, n), os.path.join(args.out, n))
    print(markdown(results, args), flush=True)


# -- Main -------------------------------------------------------------------------------


def main():
    args = parse_args()
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    if backend != "jax":
        raise SystemExit(
            f"paper_tables.py runs on JAX; KERAS_BACKEND={backend!r}. Unset it "
            "or set KERAS_BACKEND=jax."
        )
    if args.smoke:
        xla_env.smoke_environment()
    if args.worker_variants is not None:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        _jax_cache(args)
        done = train_variants(args, args.worker_variants.split(","))
        sys.exit(0 if done else 3)

    # 1. Settings: one model_dir holds the results of one schedule.
    if args.part == "report":
        with open(os.path.join(args.model_dir, "config.json")) as f:
            saved = json.load(f)
        for k, v in saved.items():
            setattr(args, k, v)
        write_outputs(args, {"part": "report", "complete": None})
        return
    check_config(args)
    names = variants_of(args)
    results, _ = collect(args)
    todo = [v for v in names if any((v, s) not in results for s in args.seed_list)]
    deadline = START + args.time_budget_s - 15.0 if args.time_budget_s else None
    print(
        f"part {args.part}: {len(names)} variants x {len(args.seed_list)} seed(s); "
        f"{len(todo)} to train; {args.procs} worker(s)",
        flush=True,
    )

    # 2. Workers: each trains its share of the variants in turn (costliest first).
    todo.sort(key=lambda v: -VARIANTS[v][1])
    shares = [todo[i :: args.procs] for i in range(args.procs)]
    shares = [s for s in shares if s]
    complete = True
    if len(shares) == 1 and args.procs == 1:
        _jax_cache(args)
        args.deadline = deadline
        complete = train_variants(args, shares[0])
    elif shares:
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        base = [a for a in sys.argv[1:] if not a.startswith("--worker_variants")]
        procs = []
        for share in shares:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                *base,
                f"--worker_variants={','.join(share)}",
            ]
            if deadline:
                cmd.append(f"--deadline={deadline}")
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
        if any(c not in (0, 3) for c in codes):
            print(f"WARNING: worker exit codes {codes}; finished results are kept", flush=True)
        complete = all(c == 0 for c in codes)

    # 3. Outputs: every result in model_dir, finished or merged from earlier parts.
    results, _ = collect(args)
    missing = [f"{v}:seed{s}" for v in names for s in args.seed_list if (v, s) not in results]
    complete = complete and not missing
    write_outputs(args, {"part": args.part, "complete": complete, "missing": missing})
    print(
        ("COMPLETE" if complete else "INCOMPLETE: run the same command again to continue")
        + f": part {args.part}, {time.time() - START:.0f} s",
        flush=True,
    )


def _jax_cache(args):
    if args.smoke:
        return  # writing the cache costs a smoke run more than it saves
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(args.model_dir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


if __name__ == "__main__":
    main()
