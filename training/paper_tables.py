r"""The paper's Tables 1 and 2 on Fashion-MNIST: every shortcut and unit variant, one schedule.

He et al. 2016, Table 1 (ResNet-110 with the original unit, the shortcuts of Fig. 2) and
Table 2 (ResNet-110 and ResNet-164, the units of Fig. 4), trained on Fashion-MNIST and set
beside the paper's CIFAR-10 numbers. Each (variant, seed) is one run of the package's
trainer, `python -m keras_preact.train.cifar --loop=jax --pipeline=numpy` (JAX; no
TensorFlow needed), in its own folder `MODEL_DIR/runs/VARIANT/seedN`; this script starts
the runs, `--procs` at a time, and reports on them.

On a GPU box, a cloud VM or in a cluster job:

    pip install -e . "jax[cuda12]" absl-py h5py matplotlib
    sudo apt-get install dataset-fashion-mnist   # or the four IDX files in any folder
    python training/paper_tables.py --part=all --seeds=0,1 --procs=2 \
        --data_dir=/usr/share/datasets/fashion-mnist --model_dir=runs/paper_tables

Parts (`--part`, a comma list; 18 runs per seed): 1 = Table 1's nine shortcuts on
ResNet-110; 2 = Table 2's other four units on ResNet-110 (its "original" row is Table 1's
identity run); 3 = Table 2's five units on ResNet-164; `all`; a variant's name (`VARIANTS`)
runs that variant alone; `report` only rewrites the outputs from the runs in `--model_dir`.
`--model=PreActResNet56` replaces the table's network in every variant (e.g. Table 1 at a
depth a CPU can train: `--part=1 --model=PreActResNet56`); it makes Table 2's ResNet-110
and ResNet-164 columns the same network, so use it with one of them. Any other flag is
passed to every trainer as given (`--scan_units` compiles deep nets much faster).

Schedule (every variant, the paper's shape in `--epochs`): SGD momentum 0.9, batch 128,
weight decay 1e-4 on conv and dense kernels, lr 0.01 for the first 400 steps (the paper's
warm-up of ResNet-110), then 0.1, divided by 10 at 50 % and 75 % of the epochs (32k and 48k
of 64k iterations in the paper); 4-pixel padding, random crop, horizontal flip; float32
(`--mixed_precision` passes the trainer's mixed precision). Concurrent runs share the
device (JAX allocates memory on demand) and one compilation cache, `MODEL_DIR/jax_cache`,
so a second seed of a variant skips the compile.

Time-limited jobs: `--time_budget=SECONDS` is the whole command's budget. Each run gets
what is left of it as its own `--time_budget` and stops at an epoch end with a checkpoint;
no run starts with less than a minute left, and the report is written before the budget
ends. Run the same command again (in the next job) to resume: a run with a `summary.json`
is finished and not started again, a run that diverged (a non-finite loss) is recorded as
such, every other run resumes from its last epoch. To merge runs made on several machines,
copy their `runs/` folders into one `--model_dir` and run `--part=report`.

Outputs in `--model_dir` (copied to `--out` when given): `paper_tables.csv` (final test
error per variant and seed, best test error, final training loss, status, wall time, the
paper's CIFAR-10 error), `paper_tables_curves.csv` (training loss and test error after every
epoch), `paper_tables.md` (both tables beside the paper's numbers), `paper_tables_table1.png`
and `paper_tables_table2.png` (training loss dashed and test error solid against epochs, as
the paper's Fig. 6). Each run's own files (`log.csv`, `summary.json`, weights, `train.log`)
stay in its folder. `--smoke` trains PreActResNet20 for two epochs of three steps on the CPU
(CI): one variant of each table.
"""

import argparse
import csv
import io
import json
import math
import os
import subprocess
import sys
import time
from typing import NamedTuple

START = time.time()


class Variant(NamedTuple):
    table: int
    model: str
    unit: str
    label: str
    shortcut: dict  # the trainer's --shortcut flag and its parameters
    paper: str  # the paper's CIFAR-10 test error (%), or "fail"


def _v(table, depth, unit, label, shortcut, paper, **params):
    return Variant(
        table, f"PreActResNet{depth}", unit, label, {"shortcut": shortcut, **params}, paper
    )


#: The paper's Table 1 (ResNet-110, original unit) and Table 2 (ResNet-110 and -164).
# fmt: off
VARIANTS = {
    "r110_identity": _v(1, 110, "original", "identity", "identity", "6.61"),
    "r110_constant_0.5": _v(1, 110, "original", "constant scaling 0.5, F x0.5",
                            "constant_scaling", "12.35", shortcut_scale=0.5, residual_scale=0.5),
    "r110_constant_0.5_f1": _v(1, 110, "original", "constant scaling 0.5, F x1",
                               "constant_scaling", "fail", shortcut_scale=0.5, residual_scale=1.0),
    "r110_exclusive_gating_b-6": _v(1, 110, "original", "exclusive gating, b_g=-6",
                                    "exclusive_gating", "8.70", gate_bias=-6.0),
    "r110_exclusive_gating_b0": _v(1, 110, "original", "exclusive gating, b_g=0",
                                   "exclusive_gating", "fail", gate_bias=0.0),
    "r110_shortcut_only_gating_b-6": _v(1, 110, "original", "shortcut-only gating, b_g=-6",
                                        "shortcut_only_gating", "6.91", gate_bias=-6.0),
    "r110_shortcut_only_gating_b0": _v(1, 110, "original", "shortcut-only gating, b_g=0",
                                       "shortcut_only_gating", "12.86", gate_bias=0.0),
    "r110_conv1x1": _v(1, 110, "original", "1x1 conv", "conv1x1", "12.22"),
    "r110_dropout_0.5": _v(1, 110, "original", "dropout 0.5", "dropout", "fail",
                           shortcut_dropout_rate=0.5),
    "r110_bn_after_add": _v(2, 110, "bn_after_add", "identity", "identity", "8.17"),
    "r110_relu_before_add": _v(2, 110, "relu_before_add", "identity", "identity", "7.84"),
    "r110_relu_preact": _v(2, 110, "relu_preact", "identity", "identity", "6.71"),
    "r110_full_preact": _v(2, 110, "full_preact", "identity", "identity", "6.37"),
    "r164_original": _v(2, 164, "original", "identity", "identity", "5.93"),
    "r164_bn_after_add": _v(2, 164, "bn_after_add", "identity", "identity", "6.50"),
    "r164_relu_before_add": _v(2, 164, "relu_before_add", "identity", "identity", "6.14"),
    "r164_relu_preact": _v(2, 164, "relu_preact", "identity", "identity", "5.91"),
    "r164_full_preact": _v(2, 164, "full_preact", "identity", "identity", "5.46"),
}
# fmt: on
TABLE1 = [name for name, v in VARIANTS.items() if v.table == 1]
#: Table 2's rows per column; its ResNet-110 "original" row is Table 1's identity run.
TABLE2 = {
    "ResNet-110": ["r110_identity"]
    + [n for n, v in VARIANTS.items() if n.startswith("r110_") and v.table == 2],
    "ResNet-164": [n for n in VARIANTS if n.startswith("r164_")],
}
PARTS = {"1": TABLE1, "2": TABLE2["ResNet-110"][1:], "3": TABLE2["ResNet-164"]}
UNIT_LABELS = {
    "original": "original (Fig. 4a)",
    "bn_after_add": "BN after addition (4b)",
    "relu_before_add": "ReLU before addition (4c)",
    "relu_preact": "ReLU-only pre-activation (4d)",
    "full_preact": "full pre-activation (4e)",
}
#: `--smoke` trains one variant of each table (a random shortcut; a pre-activation unit).
SMOKE_VARIANTS = ["r110_dropout_0.5", "r164_full_preact"]
SMOKE_MODEL = "PreActResNet20"  # the smallest named builder
#: No run starts with less than this left of `--time_budget` (start-up, compile, one epoch);
#: the report's time is kept at the end.
START_MARGIN_S, REPORT_RESERVE_S = 60.0, 20.0
RESULT_FIELDS = (
    "table variant model unit shortcut seed epochs final_test_error best_test_error "
    "final_train_loss status wall_time_s paper_cifar10_error"
).split()
CURVE_FIELDS = ["variant", "seed", "epoch", "lr", "train_loss", "test_error", "epoch_time_s"]
OUTPUTS = [f"paper_tables{s}" for s in (".csv", "_curves.csv", ".md", "_table1.png", "_table2.png")]
RUN_RECORD = "paper_tables_run.json"  # this script's record of a run: status, wall time


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    p.add_argument(
        "--part", default="all", help="1, 2, 3, variant names, a comma list, all, report"
    )
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--model_dir", default="runs/paper_tables")
    p.add_argument("--out", default=None, help="also copy the outputs here")
    p.add_argument("--seeds", default="0", help="comma list of seeds per variant")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--model", default=None, help="replaces every variant's network")
    p.add_argument("--mixed_precision", action="store_true")
    p.add_argument("--procs", type=int, default=2, help="trainer processes at once")
    p.add_argument("--time_budget", type=float, default=None, help="seconds for the command")
    p.add_argument("--smoke", action="store_true", help="PreActResNet20, 2 x 3 steps, CPU")
    args, args.trainer_flags = p.parse_known_args(argv)
    names = list(VARIANTS) if args.part in ("all", "report") else []
    for part in args.part.split(",") if not names else []:
        if part not in PARTS and part not in VARIANTS:
            p.error(
                f"--part={args.part!r}: {part!r} is neither a part {sorted(PARTS)} nor a "
                f"variant {list(VARIANTS)}; or use 'all' or 'report'."
            )
        names += PARTS.get(part, [part])
    args.variants = [n for n in VARIANTS if n in names]
    if args.smoke:
        args.variants = [n for n in args.variants if n in SMOKE_VARIANTS] or args.variants[:1]
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds={args.seeds!r} must be a comma list of integers.")
    if args.procs < 1 or args.epochs < 1:
        p.error(f"--procs={args.procs} and --epochs={args.epochs} must be >= 1.")
    if args.smoke:
        args.model, args.epochs = args.model or SMOKE_MODEL, 2
    return args


def settings(args):
    """What every run in one `--model_dir` shares (checked when runs are added)."""
    keys = ("epochs", "model", "mixed_precision", "smoke", "trainer_flags")
    return {k: getattr(args, k) for k in keys}


def check_settings(args):
    """Records the settings in `--model_dir`, or refuses to mix runs of other settings."""
    from keras_preact.train.checkpoints import write_json_atomic

    path = os.path.join(args.model_dir, "paper_tables_settings.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = {k: (saved.get(k), v) for k, v in settings(args).items() if saved.get(k) != v}
        if diff:
            raise SystemExit(
                f"{args.model_dir} holds runs of other settings ("
                + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                + "). Use another --model_dir or the same settings."
            )
    os.makedirs(args.model_dir, exist_ok=True)
    write_json_atomic(path, settings(args))


def run_dir(model_dir, variant, seed):
    return os.path.join(model_dir, "runs", variant, f"seed{seed}")


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# -- Training: one trainer process per (variant, seed) ------------------------------------


def trainer_command(args, variant, seed, budget_s):
    """The trainer's command line of one run (it resumes by itself from its folder)."""
    v, epochs = VARIANTS[variant], args.epochs
    cmd = [
        *(sys.executable, "-m", "keras_preact.train.cifar"),
        *("--dataset=fashion_mnist", "--source=files", f"--data_dir={args.data_dir}"),
        *("--loop=jax", "--pipeline=numpy", f"--model={args.model or v.model}"),
        f"--unit={v.unit}",
        *(f"--{k}={x}" for k, x in v.shortcut.items()),
        f"--model_dir={run_dir(args.model_dir, variant, seed)}",
        *(f"--seed={seed}", f"--epochs={epochs}", f"--batch_size={16 if args.smoke else 128}"),
        # The paper's schedule: 0.01 for 400 steps, then 0.1 / 10 at 32k and 48k of 64k steps.
        *("--lr_schedule=step", f"--lr_boundaries={0.5 * epochs:g},{0.75 * epochs:g}"),
        *("--warmup_steps=400", "--warmup=constant", "--warmup_lr=0.01", "--base_lr=0.1"),
        *("--weight_decay=1e-4", "--verbose=2", "--nocompilation_cache"),
        "--mixed_precision" if args.mixed_precision else "",
        *(("--steps_per_epoch=3", "--eval_examples=40") if args.smoke else ()),
        f"--time_budget={budget_s:.0f}" if budget_s else "",
        *args.trainer_flags,
    ]
    return [c for c in cmd if c]


def trainer_env(args):
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if args.smoke:  # a smoke run's cost is compilation: the CPU, little XLA optimization
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
    else:  # one cache for all runs: a variant's second seed compiles nothing
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(
            os.path.join(args.model_dir, "jax_cache")
        )
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def pending(args):
    """The (variant, seed) runs still to train: seed by seed (later seeds find their
    programs compiled), the costliest variants first."""
    todo = []
    for seed in args.seed_list:
        for variant in sorted(
            args.variants, key=lambda n: -_depth(args.model or VARIANTS[n].model)
        ):
            folder = run_dir(args.model_dir, variant, seed)
            record = _read_json(os.path.join(folder, RUN_RECORD)) or {}
            finished = os.path.exists(os.path.join(folder, "summary.json"))
            if not finished and record.get("status") != "diverged":
                todo.append((variant, seed))
    return todo


def _depth(model):
    return int("".join(filter(str.isdigit, model)) or 0)


def record_run(folder, code, seconds, log_offset):
    """Writes the run's status and accumulated wall time beside the trainer's files.

    `log_offset`: where this attempt's output starts in the run's `train.log`.
    """
    from keras_preact.train.checkpoints import write_json_atomic

    with open(os.path.join(folder, "train.log"), errors="replace") as f:
        f.seek(log_offset)
        tail = f.read()[-20000:]
    if os.path.exists(os.path.join(folder, "summary.json")):
        status = "done"
    elif code == 0:
        status = "stopped"  # by its time budget, checkpointed
    else:
        status = "diverged" if "FloatingPointError" in tail else "failed"
    record = _read_json(os.path.join(folder, RUN_RECORD)) or {}
    record = {
        "status": status,
        "returncode": code,
        "attempts": record.get("attempts", 0) + 1,
        "wall_time_s": round(record.get("wall_time_s", 0.0) + seconds, 1),
    }
    write_json_atomic(os.path.join(folder, RUN_RECORD), record)
    if status == "failed":
        print("\n".join(tail.splitlines()[-25:]), flush=True)
    return status


def train(args, todo):
    """Runs `todo`'s trainers, `--procs` at a time; returns the runs left unstarted."""
    deadline = START + args.time_budget - REPORT_RESERVE_S if args.time_budget else None
    waiting, running = list(todo), {}
    while waiting or running:
        while waiting and len(running) < args.procs:
            left = None if deadline is None else deadline - time.time()
            if left is not None and left < START_MARGIN_S:
                break
            variant, seed = waiting.pop(0)
            folder = run_dir(args.model_dir, variant, seed)
            os.makedirs(folder, exist_ok=True)
            log = open(os.path.join(folder, "train.log"), "a")  # noqa: SIM115 - closed below
            cmd = trainer_command(args, variant, seed, left)
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            offset = log.tell()
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=trainer_env(args)
            )
            running[(variant, seed)] = (proc, log, time.time(), offset)
            print(f"[{variant} seed {seed}] started; log: {log.name}", flush=True)
        if not running:
            break
        time.sleep(0.5)
        for (variant, seed), (proc, log, began, offset) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[(variant, seed)]
            folder = run_dir(args.model_dir, variant, seed)
            status = record_run(folder, proc.returncode, time.time() - began, offset)
            print(
                f"[{variant} seed {seed}] {status} after {time.time() - began:.0f} s "
                f"(exit {proc.returncode})",
                flush=True,
            )
    return waiting


# -- Report -------------------------------------------------------------------------------


def read_run(model_dir, variant, seed):
    """`(result, curve rows)` of one run folder from its `log.csv` and `summary.json`."""
    v, folder = VARIANTS[variant], run_dir(model_dir, variant, seed)
    log = []
    if os.path.exists(os.path.join(folder, "log.csv")):
        with open(os.path.join(folder, "log.csv"), newline="") as f:
            log = [
                {k: float(x) if x else math.nan for k, x in r.items()} for r in csv.DictReader(f)
            ]
    summary = _read_json(os.path.join(folder, "summary.json"))
    record = _read_json(os.path.join(folder, RUN_RECORD)) or {}
    config = _read_json(os.path.join(folder, "config.json")) or {}
    errors = [1.0 - r["val_top1"] for r in log]
    status = "done" if summary else record.get("status", "stopped" if log else "pending")
    final = 1.0 - summary["test_top1"] if summary else (errors[-1] if errors else math.nan)
    result = {
        "table": v.table,
        "variant": variant,
        "model": config.get("model", v.model),
        "unit": v.unit,
        "shortcut": v.shortcut["shortcut"],
        "seed": seed,
        "epochs": len(log),
        "final_test_error": math.nan if status == "diverged" else final,
        "best_test_error": min(errors, default=math.nan),
        "final_train_loss": log[-1]["loss"] if log else math.nan,
        "status": status,
        "wall_time_s": record.get("wall_time_s", (summary or {}).get("wall_time_s", "")),
        "paper_cifar10_error": v.paper,
    }
    curves = [
        {"variant": variant, "seed": seed, "epoch": int(r["epoch"]) + 1, "lr": r.get("lr"),
         "train_loss": r["loss"], "test_error": 1.0 - r["val_top1"],
         "epoch_time_s": r.get("epoch_time_s")}
        for r in log
    ]  # fmt: skip
    return result, curves


def collect(model_dir):
    """Every run folder under `model_dir/runs`: `({(variant, seed): result}, {...: curves})`."""
    results, curves = {}, {}
    for variant in VARIANTS:
        folder = os.path.join(model_dir, "runs", variant)
        seeds = os.listdir(folder) if os.path.isdir(folder) else []
        for seed in sorted(int(s[4:]) for s in seeds if s.startswith("seed") and s[4:].isdigit()):
            results[variant, seed], curves[variant, seed] = read_run(model_dir, variant, seed)
    return results, curves


def _error_cell(rows):
    """Mean ± standard deviation (%) over the finished seeds; diverged runs counted apart."""
    done = [r["final_test_error"] for r in rows if r["status"] == "done"]
    diverged = sum(r["status"] == "diverged" for r in rows)
    if not done:
        return "diverged" if diverged else ""
    mean = sum(done) / len(done)
    text = f"{100 * mean:.2f}"
    if len(done) > 1:
        sd = math.sqrt(sum((e - mean) ** 2 for e in done) / (len(done) - 1))
        text += f" ± {100 * sd:.2f}"
    return text + (f" ({diverged} diverged)" if diverged else "")


def markdown(results, saved):
    by_variant = {}
    for (variant, _), r in sorted(results.items()):
        by_variant.setdefault(variant, []).append(r)
    cell = lambda n: _error_cell(by_variant.get(n, []))  # noqa: E731
    seeds = lambda n: ",".join(str(r["seed"]) for r in by_variant.get(n, []))  # noqa: E731
    models = sorted({r["model"] for r in results.values()})
    lines = [
        "Fashion-MNIST test error (%) after the last epoch, mean ± standard deviation over "
        "the finished seeds, beside the paper's CIFAR-10 test error (%). Networks: "
        f"{', '.join(models) or 'none yet'}. Settings: "
        + ", ".join(f"{k}={v}" for k, v in saved.items())
        + ".",
        "",
        "Table 1 (ResNet-110, original unit; shortcuts of Fig. 2):",
        "",
        "| shortcut | paper CIFAR-10 | Fashion-MNIST | seeds |",
        "| --- | --- | --- | --- |",
        *(
            f"| {VARIANTS[n].label} | {VARIANTS[n].paper} | {cell(n)} | {seeds(n)} |"
            for n in TABLE1
        ),
        "",
        "Table 2 (units of Fig. 4; identity shortcuts):",
        "",
        "| unit | paper ResNet-110 | Fashion-MNIST ResNet-110 | paper ResNet-164 | "
        "Fashion-MNIST ResNet-164 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a, b in zip(*TABLE2.values()):
        lines.append(
            f"| {UNIT_LABELS[VARIANTS[b].unit]} | {VARIANTS[a].paper} | {cell(a)} | "
            f"{VARIANTS[b].paper} | {cell(b)} |"
        )
    missing = [n for n in VARIANTS if not any(r["status"] == "done" for r in by_variant.get(n, []))]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def plot(curves, groups, path, title):
    """Training loss (dashed) and test error (solid) against epochs, as the paper's Fig. 6:
    one row of two panels per group of variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    for (name, (names, label)), (ax_loss, ax_err) in zip(groups.items(), axes):
        for i, variant in enumerate(names):
            runs = sorted((s, rows) for (v, s), rows in curves.items() if v == variant and rows)
            for k, (_, rows) in enumerate(runs):
                epochs = [r["epoch"] for r in rows]
                kw = dict(color=plt.cm.tab10(i % 10), label=None if k else label(variant))
                ax_loss.plot(epochs, [r["train_loss"] for r in rows], "--", lw=1, **kw)
                ax_err.plot(epochs, [100 * r["test_error"] for r in rows], "-", lw=1.5, **kw)
        ax_loss.set(xlabel="epochs", ylabel="training loss", yscale="log", title=f"{name}: loss")
        ax_err.set(xlabel="epochs", ylabel="test error (%)", title=f"{name}: test error")
        ax_err.set_ylim(bottom=0)
        for ax in (ax_loss, ax_err):
            ax.grid(alpha=0.3)
        if ax_err.get_legend_handles_labels()[0]:
            ax_err.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    plt.close(fig)


def _csv_text(fields, rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_report(args):
    """The CSVs, tables and figures of every run in `--model_dir`; copied to `--out`."""
    import shutil

    from keras_preact.train.checkpoints import write_text_atomic

    results, curves = collect(args.model_dir)
    saved = _read_json(os.path.join(args.model_dir, "paper_tables_settings.json")) or {}
    path = lambda name: os.path.join(args.model_dir, name)  # noqa: E731
    write_text_atomic(path(OUTPUTS[0]), _csv_text(RESULT_FIELDS, results.values()))
    rows = [r for k in sorted(curves) for r in curves[k]]
    write_text_atomic(path(OUTPUTS[1]), _csv_text(CURVE_FIELDS, rows))
    write_text_atomic(path(OUTPUTS[2]), markdown(results, saved))
    epochs = f"Fashion-MNIST, {saved.get('epochs', '?')} epochs"
    by_shortcut = lambda n: VARIANTS[n].label  # noqa: E731
    by_unit = lambda n: UNIT_LABELS[VARIANTS[n].unit]  # noqa: E731
    plot(curves, {"Table 1": (TABLE1, by_shortcut)}, path(OUTPUTS[3]), epochs)
    table2 = {f"Table 2, {col}": (names, by_unit) for col, names in TABLE2.items()}
    plot(curves, table2, path(OUTPUTS[4]), epochs)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name in OUTPUTS:
            tmp = os.path.join(args.out, f".{name}.tmp-{os.getpid()}")
            shutil.copyfile(path(name), tmp)
            os.replace(tmp, os.path.join(args.out, name))
    print(markdown(results, saved), flush=True)
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.part == "report":
        write_report(args)
        return 0
    # 1. Settings: one --model_dir holds the runs of one schedule.
    check_settings(args)
    todo = pending(args)
    print(
        f"{len(args.variants)} variant(s) x {len(args.seed_list)} seed(s): {len(todo)} run(s) "
        f"to train, {args.procs} at a time",
        flush=True,
    )
    # 2. Training: each run resumes from its own folder.
    unstarted = train(args, todo)
    # 3. Report: every run in --model_dir, this command's and earlier ones'.
    results = write_report(args)
    wanted = [(v, s) for v in args.variants for s in args.seed_list]
    status = {k: results[k]["status"] if k in results else "pending" for k in wanted}
    open_runs = [
        f"{v}:seed{s} ({st})" for (v, s), st in status.items() if st not in ("done", "diverged")
    ]
    if not open_runs:
        print(f"COMPLETE: {len(wanted)} run(s), {time.time() - START:.0f} s", flush=True)
        return 0
    print(
        f"INCOMPLETE after {time.time() - START:.0f} s: {', '.join(open_runs)}"
        + (f"; {len(unstarted)} not started for lack of time" if unstarted else "")
        + ". Run the same command again to continue.",
        flush=True,
    )
    return 1 if any(st == "failed" for st in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
