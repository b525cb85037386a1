r"""The paper's Tables 1 and 2 on Fashion-MNIST: every shortcut and unit variant, one schedule.

He et al. 2016, Table 1 (ResNet-110, original unit, the shortcuts of Fig. 2) and Table 2
(ResNet-110 and -164, the units of Fig. 4), on Fashion-MNIST beside the paper's CIFAR-10
errors. Each (variant, seed) is one run of the package's trainer, `python -m
keras_preact.train.cifar --loop=jax --pipeline=numpy` (no TensorFlow needed) by default, in
`MODEL_DIR/runs/VARIANT/seedN`, `--procs` at a time on the one device, with one compilation
cache (a variant's second seed skips the compile). On a GPU box, a cloud VM or a cluster job:

    pip install -e . "jax[cuda12]" absl-py h5py matplotlib
    sudo apt-get install dataset-fashion-mnist   # or the four IDX files in any folder
    python training/paper_tables.py --part=all --seeds=0,1 --procs=2 \
        --data_dir=/usr/share/datasets/fashion-mnist --model_dir=runs/paper_tables

`--part` (a comma list): 1 = Table 1; 2 = Table 2's ResNet-110 units (its "original" row is
Table 1's identity run); 3 = its ResNet-164 units; a name in `VARIANTS`; `all`; `report`
only rewrites the outputs from the runs in `--model_dir` (copy several machines' `runs/`
into one to merge them, or name earlier reports' `paper_tables.csv` files in `--merge`).
`--model=PreActResNet56` replaces every variant's network; `--backend=tensorflow` (or
`torch`) trains with Keras `model.fit` instead of the jitted JAX loop (on some CPUs the
faster one); other flags go to every trainer (`--scan_units` compiles deep nets faster;
`--mixed_precision`; `--steps_per_epoch` for shorter epochs).
Schedule, the paper's in `--epochs`: SGD momentum 0.9, batch 128, weight decay 1e-4, lr 0.01
for 400 steps, then 0.1, divided by 10 at 50 % and 75 % of the epochs; random crop and flip.

`--time_budget=SECONDS` bounds the command: each run gets what is left and stops at a step
with a checkpoint, none starts with under a minute left, the report is written in time.
Run the same command again to go on: runs with a `summary.json` and diverged ones (a
non-finite loss) are final, the others resume. Outputs in `--model_dir`, copied to `--out`:
`paper_tables.csv` (per run: final and best test error, final training loss, status, wall
time, the paper's error), `paper_tables_curves.csv` (per epoch), `paper_tables.md` (both
tables), `paper_tables_table1.png` and `paper_tables_table2.png` (training loss dashed, test
error solid, as the paper's Fig. 6). `--smoke`: a variant per table, PreActResNet20, two
epochs of three steps, on the CPU.
"""

import argparse
import csv
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean, stdev
from typing import NamedTuple

from keras_preact.train import allocator
from keras_preact.train.config import SHORTCUT_PARAMS
from keras_preact.train.fs import (
    WriteError,
    write_atomic,
    write_json_atomic,
    write_text_atomic,
)

START = time.time()


class Variant(NamedTuple):
    table: int
    depth: int  # of the PreActResNet
    unit: str
    label: str  # its row in Table 1 (the shortcut) or Table 2 (the unit)
    shortcut: dict  # the trainer's --shortcut flag and its parameters
    paper: str  # the paper's CIFAR-10 test error (%), or "fail"


def _t1(label, paper, shortcut="identity", *values):
    """A row of Table 1: ResNet-110, the original unit, a shortcut of Fig. 2."""
    flags = {"shortcut": shortcut, **dict(zip(SHORTCUT_PARAMS[shortcut], values))}
    return Variant(1, 110, "original", label, flags, paper)


VARIANTS = {
    "r110_identity": _t1("identity", "6.61"),
    "r110_constant_0.5": _t1("constant scaling 0.5, F x0.5", "12.35", "constant_scaling", 0.5, 0.5),
    "r110_constant_0.5_f1": _t1("constant scaling 0.5, F x1", "fail", "constant_scaling", 0.5, 1),
    "r110_exclusive_gating_b-6": _t1("exclusive gating, b_g=-6", "8.70", "exclusive_gating", -6),
    "r110_exclusive_gating_b0": _t1("exclusive gating, b_g=0", "fail", "exclusive_gating", 0),
    "r110_shortcut_only_gating_b-6": _t1(
        "shortcut-only gating, b_g=-6", "6.91", "shortcut_only_gating", -6
    ),
    "r110_shortcut_only_gating_b0": _t1(
        "shortcut-only gating, b_g=0", "12.86", "shortcut_only_gating", 0
    ),
    "r110_conv1x1": _t1("1x1 conv", "12.22", "conv1x1"),
    "r110_dropout_0.5": _t1("dropout 0.5", "fail", "dropout", 0.5),
}
TABLE1 = list(VARIANTS)
#: Table 2 (identity shortcuts): unit: (label, the paper's error on ResNet-110, on ResNet-164).
UNITS = {
    "original": ("original (Fig. 4a)", "6.61", "5.93"),
    "bn_after_add": ("BN after addition (4b)", "8.17", "6.50"),
    "relu_before_add": ("ReLU before addition (4c)", "7.84", "6.14"),
    "relu_preact": ("ReLU-only pre-activation (4d)", "6.71", "5.91"),
    "full_preact": ("full pre-activation (4e)", "6.37", "5.46"),
}
#: Table 2's columns; its ResNet-110 "original" row is Table 1's identity run.
TABLE2 = {depth: [f"r{depth}_{unit}" for unit in UNITS] for depth in (110, 164)}
TABLE2[110][0] = "r110_identity"
VARIANTS.update(
    (name, Variant(2, depth, unit, row[0], {"shortcut": "identity"}, row[i]))
    for i, (depth, names) in enumerate(TABLE2.items(), 1)
    for name, (unit, row) in zip(names, UNITS.items())
    if name not in VARIANTS
)
PARTS = {"1": TABLE1, "2": TABLE2[110][1:], "3": TABLE2[164]}
SMOKE_VARIANTS = ["r110_dropout_0.5", "r164_full_preact"]  # a random shortcut; a 4e unit
SCHEDULE = (  # the paper's: lr 0.01 for 400 steps, then 0.1, / 10 at 32k and 48k of 64k steps
    "--batch_size=128 --lr_schedule=step --warmup_steps=400 --warmup=constant --warmup_lr=0.01 "
    "--base_lr=0.1 --weight_decay=1e-4 --verbose=2"
).split()
SMOKE_FLAGS = "--batch_size=16 --steps_per_epoch=3 --eval_examples=40 --nocompilation_cache"
#: No run starts with less than this left of `--time_budget`; the report's time is kept.
START_MARGIN_S, REPORT_RESERVE_S = 60.0, 20.0
RESULT_FIELDS = "table variant model unit shortcut seed epochs final_test_error".split()
RESULT_FIELDS += "best_test_error final_train_loss status wall_time_s paper_cifar10_error".split()
RESULT_FIELDS += ["cpu"]
CURVE_FIELDS = ["variant", "seed", "epoch", "lr", "train_loss", "test_error", "epoch_time_s"]
OUTPUTS = [f"paper_tables{s}" for s in (".csv", "_curves.csv", ".md", "_table1.png", "_table2.png")]
BACKENDS = ("jax", "tensorflow", "torch")  # jax: the jitted loop; the others: model.fit
RUN_RECORD = "paper_tables_run.json"  # this script's record of a run: status, wall time, CPU


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--part", default="all", help="1, 2, 3, variants, a comma list, all, report")
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--model_dir", default="runs/paper_tables")
    p.add_argument("--out", default=None, help="also copy the outputs here")
    p.add_argument("--seeds", default=[0], type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--model", default=None, help="replaces every variant's network")
    p.add_argument("--procs", type=int, default=2, help="trainer processes at once")
    p.add_argument(
        "--backend",
        default="jax",
        choices=BACKENDS,
        help="the trainers' Keras backend: jax (--loop=jax) or tensorflow, torch (--loop=fit)",
    )
    p.add_argument("--time_budget", type=float, default=None, help="seconds for the command")
    p.add_argument("--smoke", action="store_true", help="PreActResNet20, 2 x 3 steps, CPU")
    p.add_argument(
        "--allocator",
        default="auto",
        choices=("auto", "system", *allocator.ALLOCATORS),
        help="the trainers' malloc (LD_PRELOAD): auto = tcmalloc or jemalloc where installed "
        "under --backend=tensorflow (about 2x faster steps on a 2-core CPU), else the system's",
    )
    p.add_argument(
        "--merge",
        default=[],
        type=lambda s: [x for x in s.split(",") if x],
        help="earlier reports' paper_tables.csv files (a comma list; each one's _curves.csv "
        "beside it): their runs join the report where --model_dir has none of the same "
        "variant and seed",
    )
    args, args.trainer_flags = p.parse_known_args(argv)
    parts = ("1,2,3" if args.part in ("all", "report") else args.part).split(",")
    if unknown := [x for x in parts if x not in PARTS and x not in VARIANTS]:
        p.error(f"--part: {unknown} are none of {[*PARTS, 'all', 'report', *VARIANTS]}.")
    args.variants = [n for n in VARIANTS if any(n in PARTS.get(x, [x]) for x in parts)]
    if args.allocator not in ("auto", "system") and not allocator.find(args.allocator):
        p.error(f"--allocator={args.allocator}: no lib{args.allocator} is installed.")
    if missing := [x for x in args.merge if not os.path.isfile(x)]:
        p.error(f"--merge: {missing} are not files (an earlier report's paper_tables.csv).")
    if args.smoke:  # PreActResNet20: the smallest named builder
        args.variants = [n for n in args.variants if n in SMOKE_VARIANTS] or args.variants[:1]
        args.model, args.epochs = args.model or "PreActResNet20", 2
    return args


def _read_json(path):
    return json.loads(Path(path).read_text()) if os.path.exists(path) else {}


def run_dir(model_dir, variant, seed):
    return os.path.join(model_dir, "runs", variant, f"seed{seed}")


def run_status(folder):
    """done (it has a `summary.json`), stopped, diverged, failed, or pending."""
    if os.path.exists(os.path.join(folder, "summary.json")):
        return "done"
    default = "stopped" if os.path.exists(os.path.join(folder, "log.csv")) else "pending"
    return _read_json(os.path.join(folder, RUN_RECORD)).get("status", default)


def trainer_command(args, variant, seed, budget_s=math.inf):
    """The trainer's command line of one run (it resumes by itself from its folder)."""
    v, epochs = VARIANTS[variant], args.epochs
    loop = "jax" if args.backend == "jax" else "fit"
    return [
        *(sys.executable, "-m", "keras_preact.train.cifar", "--dataset=fashion_mnist"),
        *("--source=files", f"--data_dir={args.data_dir}", f"--loop={loop}", "--pipeline=numpy"),
        *(f"--model={args.model or f'PreActResNet{v.depth}'}", f"--unit={v.unit}"),
        *(f"--{k}={x}" for k, x in v.shortcut.items()),
        *(f"--model_dir={run_dir(args.model_dir, variant, seed)}", f"--seed={seed}", *SCHEDULE),
        *(f"--epochs={epochs}", f"--lr_boundaries={0.5 * epochs:g},{0.75 * epochs:g}"),
        *(SMOKE_FLAGS.split() if args.smoke else ()),
        *([f"--time_budget={budget_s:.0f}"] if budget_s < math.inf else []),
        *args.trainer_flags,  # last: the trainer takes the last value of a flag
    ]


def pending(args):
    """The runs neither done nor diverged, seed by seed, the deepest networks first."""
    order = sorted(args.variants, key=lambda n: -VARIANTS[n].depth)
    runs = [(v, s) for s in args.seeds for v in order]
    return [k for k in runs if run_status(run_dir(args.model_dir, *k)) not in ("done", "diverged")]


def cpu_kind(cpuinfo="/proc/cpuinfo"):
    """The CPU's model and widest vector extension, e.g. "AMD EPYC, AVX-512". A seed fixes
    a run on one kind of CPU only: oneDNN picks its kernels by instruction set, their
    float32 sums round differently, and 1,000 steps carry that into another run
    (docs/paper_tables.md)."""
    try:
        with open(cpuinfo) as f:
            info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    except OSError:
        return platform.machine()
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    return f"{info.get('model name', platform.processor() or 'CPU')}, {isa}"


def record_run(folder, code, seconds, log_offset):
    """Records a run's status, total wall time and the CPUs it ran on beside the trainer's
    files; returns the status. `log_offset`: where this attempt's output starts in the
    run's `train.log`."""
    tail = Path(folder, "train.log").read_bytes()[log_offset:].decode(errors="replace")[-20000:]
    done = os.path.exists(os.path.join(folder, "summary.json"))
    diverged = "Diverged: " in tail  # the trainer stopped it (exit code 3)
    status = "done" if done else "stopped" if code == 0 else "diverged" if diverged else "failed"
    record = _read_json(os.path.join(folder, RUN_RECORD))
    wall = round(record.get("wall_time_s", 0) + seconds, 1)
    cpus = list(dict.fromkeys([*record.get("cpus", []), cpu_kind()]))  # a resume may move
    write_json_atomic(os.path.join(folder, RUN_RECORD),
                      {"status": status, "wall_time_s": wall, "cpus": cpus})  # fmt: skip
    if status == "failed":
        print("\n".join(tail.splitlines()[-25:]), flush=True)
    return status


def trainer_env(args, environ=None):
    """The trainers' environment: the backend, and `--allocator`'s malloc preloaded."""
    env = {**(os.environ if environ is None else environ), "KERAS_BACKEND": args.backend}
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if args.allocator == "auto" and args.backend == "tensorflow":
        env = allocator.preload_env(env, allocator.ALLOCATORS)
    elif args.allocator not in ("auto", "system"):
        env = allocator.preload_env(env, [args.allocator])
    return env


def train(args, todo):
    """Runs `todo`'s trainers, `--procs` at a time, while `--time_budget` allows."""
    deadline = START + args.time_budget - REPORT_RESERVE_S if args.time_budget else math.inf
    env = trainer_env(args)
    if todo:
        name = allocator.preloaded(env)
        print(f"Trainers' malloc: {name or 'the system allocator'}", flush=True)
    if args.backend == "jax" and args.smoke:  # a smoke run's cost is compilation: little XLA
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
        env.setdefault("JAX_PLATFORMS", "cpu")
    elif args.backend == "jax":  # the trainers' one cache: a variant's second seed compiles nothing
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(f"{args.model_dir}/jax_cache")

    def run(variant, seed):
        if deadline - time.time() < START_MARGIN_S:
            return
        folder, began = run_dir(args.model_dir, variant, seed), time.time()
        os.makedirs(folder, exist_ok=True)
        cmd = trainer_command(args, variant, seed, deadline - began)
        with open(os.path.join(folder, "train.log"), "a") as log:
            print(f"\n$ {' '.join(cmd)}", file=log, flush=True)
            print(f"[{variant} seed {seed}] started; log: {log.name}", flush=True)
            offset = log.tell()
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        status = record_run(folder, code, time.time() - began, offset)
        print(f"[{variant} seed {seed}] {status} after {time.time() - began:.0f} s", flush=True)

    with ThreadPoolExecutor(args.procs) as pool:
        list(pool.map(lambda key: run(*key), todo))


def read_run(model_dir, variant, seed):
    """`(result, curve rows)` of one run folder, from its `log.csv` and `summary.json`."""
    v, folder = VARIANTS[variant], run_dir(model_dir, variant, seed)
    log_csv = os.path.join(folder, "log.csv")
    with open(log_csv, newline="") if os.path.exists(log_csv) else io.StringIO() as f:
        log = [{k: float(x) if x else math.nan for k, x in r.items()} for r in csv.DictReader(f)]
    summary = _read_json(os.path.join(folder, "summary.json"))
    record = _read_json(os.path.join(folder, RUN_RECORD))
    wall = record.get("wall_time_s")
    model = _read_json(os.path.join(folder, "config.json")).get("model", f"PreActResNet{v.depth}")
    status, errors = run_status(folder), [1.0 - r["val_top1"] for r in log]
    final = 1.0 - summary["test_top1"] if summary else (errors or [math.nan])[-1]
    result = {
        "table": v.table, "variant": variant, "model": model, "unit": v.unit,
        "shortcut": v.shortcut["shortcut"], "seed": seed, "epochs": len(log),
        "final_test_error": math.nan if status == "diverged" else final,
        "best_test_error": min(errors, default=math.nan),
        "final_train_loss": log[-1]["loss"] if log else math.nan, "status": status,
        "wall_time_s": wall or summary.get("wall_time_s", ""), "paper_cifar10_error": v.paper,
        "cpu": " + ".join(record.get("cpus", [])),
    }  # fmt: skip
    curves = [
        dict(zip(CURVE_FIELDS, (variant, seed, int(r["epoch"]) + 1, r.get("lr"), r["loss"],
                                1.0 - r["val_top1"], r.get("epoch_time_s"))))
        for r in log
    ]  # fmt: skip
    return result, curves


def _number(text):
    return float(text) if text not in ("", None) else math.nan


def read_report(path):
    """An earlier report's runs: `({(variant, seed): result}, {...: curves})` from its
    `paper_tables.csv` at `path` and the `_curves.csv` beside it (none if that is missing)."""

    def rows(name):
        with open(name, newline="") as f:
            return list(csv.DictReader(f))

    results, curves = {}, {}
    for r in rows(path):
        if r["variant"] not in VARIANTS:
            raise ValueError(f"{path}: variant {r['variant']!r} is none of {list(VARIANTS)}.")
        key = r["variant"], int(r["seed"])
        results[key] = {
            **r, "table": int(r["table"]), "seed": key[1], "epochs": int(r["epochs"]),
            **{k: _number(r[k]) for k in ("final_test_error", "best_test_error",
                                          "final_train_loss")},
            "wall_time_s": _number(r["wall_time_s"]) if r["wall_time_s"] else "",
            "cpu": r.get("cpu") or "",  # reports written before the column have none
        }  # fmt: skip
        curves[key] = []
    curves_path = path[: -len(".csv")] + "_curves.csv" if path.endswith(".csv") else None
    for r in rows(curves_path) if curves_path and os.path.exists(curves_path) else ():
        key = r["variant"], int(r["seed"])
        if key in curves:
            numbers = {k: _number(r[k]) for k in CURVE_FIELDS[3:]}
            curves[key].append({**r, "seed": key[1], "epoch": int(r["epoch"]), **numbers})
    return results, curves


def collect(model_dir, merge=()):
    """Every run folder under `model_dir/runs`: `({(variant, seed): result}, {...: curves})`;
    then the runs of the earlier reports `merge` (paper_tables.csv paths) that `model_dir`
    does not have."""
    results, curves = {}, {}
    for variant in VARIANTS:
        folder = os.path.join(model_dir, "runs", variant)
        seeds = os.listdir(folder) if os.path.isdir(folder) else []
        for seed in sorted(int(s[4:]) for s in seeds if s.startswith("seed") and s[4:].isdigit()):
            results[variant, seed], curves[variant, seed] = read_run(model_dir, variant, seed)
    for path in merge:
        earlier, earlier_curves = read_report(path)
        for key in earlier.keys() - results.keys():
            results[key], curves[key] = earlier[key], earlier_curves[key]
    order = {v: i for i, v in enumerate(VARIANTS)}
    ordered = sorted(results, key=lambda k: (order[k[0]], k[1]))
    return {k: results[k] for k in ordered}, {k: curves[k] for k in ordered}


def _error_cell(rows):
    """The mean (%) over the finished seeds, then each seed's value in seed order (with the
    standard deviation from three seeds on); diverged runs counted apart."""
    done = [100 * r["final_test_error"] for r in sorted(rows, key=lambda r: r["seed"])
            if r["status"] == "done"]  # fmt: skip
    diverged = sum(r["status"] == "diverged" for r in rows)
    if not done:
        return "diverged" if diverged else ""
    text = f"{mean(done):.2f}" + (f" ± {stdev(done):.2f}" if len(done) > 2 else "")
    text += f" ({', '.join(f'{e:.2f}' for e in done)})" if len(done) > 1 else ""
    return text + (f" ({diverged} diverged)" if diverged else "")


def _paper_error(variant):
    """The paper's error of a variant as a number; a run that failed to converge is worse
    than any number, None where the paper gives none."""
    paper = VARIANTS[variant].paper
    return math.inf if paper == "fail" else float(paper) if paper else None


def orderings(results, names):
    """Each pair of `names` that the paper orders (a's error below b's) with finished runs
    here: `(a, b, seeds where a < b here too, seeds where both finished, a < b on the means)`."""
    done = {}
    for (variant, seed), r in results.items():
        if r["status"] == "done" and variant in names:
            done.setdefault(variant, {})[seed] = r["final_test_error"]
    ranked = sorted((n for n in names if n in done and _paper_error(n) is not None),
                    key=_paper_error)  # fmt: skip
    pairs = []
    for i, a in enumerate(ranked):
        for b in ranked[i + 1 :]:
            seeds = sorted(done[a].keys() & done[b].keys())
            if _paper_error(a) == _paper_error(b) or not seeds:
                continue
            holds = [s for s in seeds if done[a][s] < done[b][s]]
            on_means = mean(done[a][s] for s in seeds) < mean(done[b][s] for s in seeds)
            pairs.append((a, b, holds, seeds, on_means))
    return pairs


def _orderings_lines(results, names, label):
    """The paper's orderings of `names` and on which seeds each holds here."""
    pairs = orderings(results, names)
    if not pairs:
        return []
    lines = [
        "| the paper's order | holds on seeds | of | on the means |",
        "| --- | --- | --- | --- |",
    ]
    for a, b, holds, seeds, on_means in pairs:
        lines.append(f"| {label(a)} < {label(b)} | {','.join(map(str, holds)) or 'none'} | "
                     f"{','.join(map(str, seeds))} | {'yes' if on_means else 'no'} |")  # fmt: skip
    return lines + ["", orderings_statement(pairs, label)]


def orderings_statement(pairs, label):
    """`orderings`' pairs in words: those whose order holds on every seed where both variants
    finished, on some of those seeds (which), and on none.

    >>> pairs = [("e", "a", [0, 1], [0, 1], True), ("e", "d", [1], [0, 1], True),
    ...          ("a", "d", [], [0], False)]
    >>> print(orderings_statement(pairs, str.upper))
    The paper's order holds on every seed where both finished for: E < A (seeds 0,1). On some seeds only: E < D (seed 1 of 0,1). On none: A < D (seed 0).
    """
    seeds = lambda xs: f"seed{'s' * (len(xs) > 1)} {','.join(map(str, xs))}"  # noqa: E731
    groups = {"all": [], "some": [], "none": []}
    for a, b, holds, ran, _ in pairs:
        kind = "all" if holds == ran else "some" if holds else "none"
        where = f"{seeds(holds)} of {','.join(map(str, ran))}" if kind == "some" else seeds(ran)
        groups[kind].append(f"{label(a)} < {label(b)} ({where})")
    text = lambda kind: "; ".join(groups[kind]) or "none"  # noqa: E731
    return (f"The paper's order holds on every seed where both finished for: {text('all')}. "
            f"On some seeds only: {text('some')}. On none: {text('none')}.")  # fmt: skip


def _loss_cell(rows):
    """The final training loss, mean over the finished seeds."""
    done = [r["final_train_loss"] for r in rows if r["status"] == "done"]
    return f"{mean(done):.3f}" if done else ""


def networks(results, names):
    """The networks (sorted `--model` names) of the runs in `results` of variants `names`."""
    return sorted({r["model"] for (v, _), r in results.items() if v in names})


def markdown(results):
    """Both tables, the Fashion-MNIST errors beside the paper's CIFAR-10 ones."""
    runs = {n: [r for (v, _), r in results.items() if v == n] for n in VARIANTS}
    cell = lambda n: _error_cell(runs[n])  # noqa: E731
    models = ", ".join(networks(results, VARIANTS)) or "none yet"

    def column(depth):  # the networks that ran Table 2's ResNet-`depth` column
        ran = networks(results, TABLE2[depth])
        return f" ({', '.join(ran)})" if ran else ""

    lines = [
        "Fashion-MNIST test error (%) after the last epoch, the mean over the finished seeds "
        "and, in brackets, each seed's value in seed order (from three seeds on, mean ± "
        "standard deviation), beside the paper's CIFAR-10 test error (%); Table 1 also gives "
        f"the last epoch's training loss (mean over the finished seeds). Networks: {models}.",
        "", "Table 1 (ResNet-110, original unit; shortcuts of Fig. 2):", "",
        "| shortcut | paper CIFAR-10 | Fashion-MNIST | training loss | seeds |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {VARIANTS[n].label} | {VARIANTS[n].paper} | {cell(n)} | {_loss_cell(runs[n])} | "
          f"{','.join(str(r['seed']) for r in runs[n])} |" for n in TABLE1),
        "", "Table 2 (units of Fig. 4; identity shortcuts):", "",
        f"| unit | paper ResNet-110 | Fashion-MNIST{column(110)} | paper ResNet-164 | "
        f"Fashion-MNIST{column(164)} |", "| --- | --- | --- | --- | --- |",
        *(f"| {row[0]} | {VARIANTS[a].paper} | {cell(a)} | {VARIANTS[b].paper} | {cell(b)} |"
          for row, a, b in zip(UNITS.values(), *TABLE2.values())),
    ]  # fmt: skip
    unit_label = lambda n: UNITS[VARIANTS[n].unit][0]  # noqa: E731
    for title, names, label in [
        ("Table 1", TABLE1, lambda n: VARIANTS[n].label),
        *((f"Table 2, ResNet-{d}", names, unit_label) for d, names in TABLE2.items()),
    ]:
        if order := _orderings_lines(results, names, label):
            lines += ["", f"{title}: the paper's orderings (lower error first) here, by seed:", ""]
            lines += order
    return "\n".join(lines + _runs_lines(results))


def _runs_lines(results):
    """Every run: its errors, final training loss, epochs, status, wall time and CPU."""
    if not results:
        return []
    lines = ["", "Runs:", "", "| table | variant | network | seed | test error (%) | best (%) | "
             "training loss | epochs | status | wall time (s) | CPU |", "|" + " --- |" * 11]  # fmt: skip
    pct = lambda x: "" if math.isnan(x) else f"{100 * x:.2f}"  # noqa: E731
    for (variant, seed), r in results.items():
        wall = r.get("wall_time_s", "")
        wall = f"{wall:.0f}" if isinstance(wall, (int, float)) and not math.isnan(wall) else ""
        loss = "" if math.isnan(r["final_train_loss"]) else f"{r['final_train_loss']:.3f}"
        lines.append(
            f"| {VARIANTS[variant].table} | {variant} | {r['model']} | {seed} | "
            f"{pct(r['final_test_error'])} | {pct(r.get('best_test_error', math.nan))} | {loss} | "
            f"{r.get('epochs', '')} | {r['status']} | {wall} | {r.get('cpu', '')} |"
        )
    return lines


def plot(curves, panels, path, label):
    """Training loss (dashed) and test error (solid) against epochs, as the paper's Fig. 6:
    a row of two panels per `panels` item (title: variants); `label(variant)` names a line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2 * len(panels)), layout="tight")
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for (name, variants), (ax_loss, ax_err) in zip(panels.items(), axes):
        for i, variant in enumerate(variants):
            runs = [rows for (n, _), rows in curves.items() if n == variant and rows]
            for k, rows in enumerate(runs):
                epochs = [r["epoch"] for r in rows]
                kw = dict(color=f"C{i}", label=None if k else label(variant))
                ax_loss.plot(epochs, [r["train_loss"] for r in rows], "--", lw=1, **kw)
                ax_err.plot(epochs, [100 * r["test_error"] for r in rows], "-", lw=1.5, **kw)
        ax_loss.set(xlabel="epochs", ylabel="training loss", yscale="log", title=f"{name}: loss")
        ax_err.set(xlabel="epochs", ylabel="test error (%)", title=f"{name}: test error")
        ax_err.set_ylim(bottom=0)
        if ax_err.get_legend_handles_labels()[0]:
            ax_err.legend(fontsize=7)
    fig.suptitle("Fashion-MNIST")
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=90), "wb")


def write_report(args):
    """The CSVs, tables and figures of every run in `--model_dir`, copied to `--out`."""
    results, curves = collect(args.model_dir, args.merge)
    os.makedirs(args.model_dir, exist_ok=True)
    path = lambda name: os.path.join(args.model_dir, name)  # noqa: E731
    rows = [r for c in curves.values() for r in c]
    csvs = {OUTPUTS[0]: (RESULT_FIELDS, results.values()), OUTPUTS[1]: (CURVE_FIELDS, rows)}
    for name, (fields, table) in csvs.items():
        text, lines = io.StringIO(), [fields, *([r[k] for k in fields] for r in table)]
        csv.writer(text, lineterminator="\n").writerows(lines)
        write_text_atomic(path(name), text.getvalue())
    text = markdown(results)
    write_text_atomic(path(OUTPUTS[2]), text + "\n")

    def ran(title, names):  # the panel's title names the networks that ran it
        models = networks(results, names)
        return f"{title} ({', '.join(models)})" if models else title

    plot(curves, {ran("Table 1", TABLE1): TABLE1}, path(OUTPUTS[3]), lambda n: VARIANTS[n].label)
    # Table 2's columns with runs (all of them when none has): no empty row of panels.
    columns = [names for names in TABLE2.values() if any(k[0] in names for k in results)]
    table2 = {ran(f"Table 2, ResNet-{VARIANTS[names[-1]].depth} column", names): names
              for names in columns or TABLE2.values()}  # fmt: skip
    plot(curves, table2, path(OUTPUTS[4]), lambda n: UNITS[VARIANTS[n].unit][0])
    for name in OUTPUTS if args.out else ():
        os.makedirs(args.out, exist_ok=True)
        with open(path(name), "rb") as src:
            write_atomic(os.path.join(args.out, name), lambda f: shutil.copyfileobj(src, f), "wb")
    print(text, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.part == "report":
        write_report(args)
        return 0
    # 1. Training: each run resumes from its own folder.
    todo = pending(args)
    runs = f"{len(args.variants)} variant(s) x {len(args.seeds)} seed(s)"
    print(f"{runs}: {len(todo)} run(s) to train, {args.procs} at a time", flush=True)
    train(args, todo)
    # 2. Report: every run in --model_dir, this command's and earlier ones'.
    write_report(args)
    left = {k: run_status(run_dir(args.model_dir, *k)) for k in pending(args)}
    runs = ", ".join(f"{v}:seed{s} ({status})" for (v, s), status in left.items())
    done = f"COMPLETE after {time.time() - START:.0f} s"
    print(f"INCOMPLETE: {runs}. Run the same command again." if left else done, flush=True)
    return 1 if "failed" in left.values() else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except WriteError as e:  # a full disk: one line, not a traceback
        sys.exit(f"WriteError: {e}")
