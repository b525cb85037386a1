"""Start-up time of the deepest nets: build, trace, compile and first training step.

Each (backend, model, variant) runs in a fresh Python process, so no trace, compilation or
persistent cache leaks from one measurement to the next. A child reports each phase as it
ends; one that is still running when `--timeout` expires is recorded as "did not finish in
N s" instead of hanging the run.

    python benchmarks/startup.py --backends jax --models 164,1001 --timeout 600
    python benchmarks/startup.py --backends jax,tensorflow,torch --scan both --json out.json

Phases (batch `--batch` of `--size` px images, `--classes` classes, SGD with momentum,
sparse cross-entropy on logits):
    build    the builder call (`keras_preact.PreActResNet1001(...)`), optimizer built
    trace    jax: `jax.jit(step).lower(...)` of a step written with `model.stateless_call`,
             `jax.value_and_grad` and `optimizer.stateless_apply` (what Keras' JAX trainer
             jits); tensorflow: the `tf.function` concrete-function trace of a
             `GradientTape` step; torch: none (eager)
    compile  jax: `lowered.compile()`; tensorflow with `--tf_jit` (XLA, what `model.fit`'s
             `jit_compile="auto"` picks): first call minus the second; torch: none
    step1    the first call of the compiled step (jax), the first call (tensorflow: includes
             its XLA compile), the first eager step (torch)
    first    trace + compile + step1 for jax, trace + step1 for tensorflow, step1 for torch:
             what a user waits for between the built model and the first finished step
    step2    the second step, for reference (steady state)

`--scan` picks the builder's `scan_units=` (`off`, `on` or `both`); `--cache DIR` enables
JAX's persistent compilation cache in DIR (run twice to time a resumed run).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("build", "trace", "compile", "step1", "first", "step2")


# ---------------------------------------------------------------------------------------------
# Child: one measurement in this process.


class _Clock:
    """Reports each phase's wall-clock and CPU seconds (CPU time is what a compile costs;
    wall time also counts other jobs on a shared machine)."""

    def __init__(self):
        print(json.dumps({"at": time.time()}), flush=True)  # imports done: the clock starts
        self.times = {}
        self.start()

    def start(self):
        self._t, self._c = time.perf_counter(), time.process_time()

    def lap(self, phase):
        self.report(phase, time.perf_counter() - self._t, time.process_time() - self._c)
        self.start()

    def report(self, phase, seconds, cpu):
        self.times[phase] = (seconds, cpu)
        row = {"phase": phase, "seconds": round(seconds, 3), "cpu": round(cpu, 3)}
        print(json.dumps({**row, "at": time.time()}), flush=True)

    def total(self, phase, parts):
        self.report(phase, *(sum(self.times[p][i] for p in parts) for i in (0, 1)))


def _build(args):
    import keras

    import keras_preact

    kwargs = dict(input_shape=(args.size, args.size, 3), classes=args.classes)
    kwargs["classifier_activation"] = None
    if args.scan_child:
        kwargs["scan_units"] = True
    keras.utils.set_random_seed(0)
    clock = _Clock()
    model = keras_preact.get_model(f"PreActResNet{args.model}", **kwargs)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
    clock.lap("build")
    print(json.dumps({"params": model.count_params(), "layers": len(model.layers)}), flush=True)
    return model, optimizer, clock


def _data(args):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, args.classes, size=(args.batch,)).astype("int32")
    return x, y


def _child_jax(args):
    import jax

    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import keras

    model, optimizer, clock = _build(args)
    x, y = _data(args)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step(trainable, non_trainable, opt_vars, x, y):
        def loss(trainable, non_trainable):
            logits, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_fn(y, logits), non_trainable

        (value, non_trainable), grads = jax.value_and_grad(loss, has_aux=True)(
            trainable, non_trainable
        )
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return value, trainable, non_trainable, opt_vars

    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    clock.start()
    lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, x, y)
    clock.lap("trace")
    compiled = lowered.compile()
    clock.lap("compile")
    value, *state = compiled(*state, x, y)
    value.block_until_ready()
    clock.lap("step1")
    clock.total("first", ("trace", "compile", "step1"))
    clock.start()
    value, *state = compiled(*state, x, y)
    value.block_until_ready()
    clock.lap("step2")


def _child_tensorflow(args):
    import keras
    import tensorflow as tf

    model, optimizer, clock = _build(args)
    x, y = _data(args)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=args.tf_jit)
    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss_fn(y, model(x, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return value

    clock.start()
    step.get_concrete_function(tf.TensorSpec(x.shape, "float32"), tf.TensorSpec(y.shape, "int32"))
    clock.lap("trace")
    float(step(x, y))
    clock.lap("step1")
    clock.total("first", ("trace", "step1"))
    clock.start()
    float(step(x, y))
    clock.lap("step2")
    if args.tf_jit:
        (w1, c1), (w2, c2) = clock.times["step1"], clock.times["step2"]
        clock.report("compile", w1 - w2, c1 - c2)


def _child_torch(args):
    import keras
    import torch

    model, optimizer, clock = _build(args)
    x, y = _data(args)
    x, y = torch.from_numpy(x), torch.from_numpy(y).long()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step():
        value = loss_fn(y, model(x, training=True))
        model.zero_grad()
        value.backward()
        grads = [v.value.grad for v in model.trainable_variables]
        with torch.no_grad():
            optimizer.apply(grads, model.trainable_variables)
        return float(value)

    clock.start()
    step()
    clock.lap("step1")
    clock.total("first", ("step1",))
    clock.start()
    step()
    clock.lap("step2")


# ---------------------------------------------------------------------------------------------
# Parent: one fresh process per measurement, a table and a JSON file.


def _rss_gb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    return 0.0


def _measure(backend, model, scan, args):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", str(model)]
    cmd += ["--batch", str(args.batch), "--size", str(args.size), "--classes", str(args.classes)]
    cmd += ["--tf_jit", str(args.tf_jit)] + (["--scan_child"] if scan else [])
    cmd += ["--cache", args.cache] if args.cache else []
    result = {"backend": backend, "model": f"PreActResNet{model}", "scan_units": scan}
    # The child writes to files, polled with its memory: an XLA compile of a deep net can
    # take more memory than a shared machine has (PreActResNet1001 was killed at 15 GB).
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        start, peak = time.time(), 0.0
        while proc.poll() is None:
            peak = max(peak, _rss_gb(proc.pid))
            if time.time() - start > args.timeout:
                result["stopped"] = f"timeout {args.timeout:.0f} s"
            elif peak > args.max_rss_gb:
                result["stopped"] = f"memory {peak:.1f} GB > --max_rss_gb {args.max_rss_gb}"
            if "stopped" in result:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        stopped_at = time.time()
        out.seek(0)
        err.seek(0)
        out, err = out.read(), err.read()
    result["peak_rss_gb"] = round(peak, 2)
    last = None
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            last = row.pop("at", last)
            if "phase" in row:
                result[row["phase"]] = row["seconds"]
                result[row["phase"] + "_cpu"] = row["cpu"]
            else:
                result.update(row)
    if "stopped" in result:
        # How long the phase that was running had run: since the last one ended.
        result["unfinished_after_s"] = round(stopped_at - (last or start), 1)
    elif proc.returncode != 0:
        # The last lines that are not absl/TF start-up chatter.
        chatter = ("I0000", "W0000", "WARNING: All")
        tail = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(chatter)]
        result["error"] = f"exit status {proc.returncode}: " + " | ".join(tail[-3:])
    return result


def _phases(backend):
    return {
        "jax": ("build", "trace", "compile", "step1", "first", "step2"),
        "tensorflow": ("build", "trace", "compile", "step1", "first", "step2"),
        "torch": ("build", "step1", "first", "step2"),
    }[backend]


def _cell(result, phase):
    if phase in result:
        return f"{result[phase]:.2f}"
    if "stopped" in result and phase in PHASES:
        first_missing = next(p for p in _phases(result["backend"]) if p not in result)
        if phase == first_missing:
            why = "" if result["stopped"].startswith("timeout") else f" ({result['stopped']})"
            return f"did not finish in {result['unfinished_after_s']:.0f} s{why}"
        return "-"
    if "error" in result:
        return "error"
    return "-" if "stopped" in result else "n/a"


def _combine(rounds):
    """One row per measurement from `--repeat` rounds: each phase's minimum over the rounds."""
    row = dict(rounds[0])
    for phase in PHASES + tuple(f"{p}_cpu" for p in PHASES):
        values = [r[phase] for r in rounds if phase in r]
        if values:
            row[phase] = min(values)
    row["peak_rss_gb"] = max(r["peak_rss_gb"] for r in rounds)
    row["rounds"] = len(rounds)
    return row


def _table(results):
    lines = [
        "| backend | model | scan_units | params | build s | trace s | compile s | step1 s "
        "| **first step s** | step2 s | compile CPU s | first step CPU s | peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        cells = [_cell(r, p) for p in PHASES]
        params = f"{r['params']:,}" if "params" in r else "-"
        lines.append(
            f"| {r['backend']} | {r['model']} | {r['scan_units']} | {params} | "
            + " | ".join(cells[:4])
            + f" | **{cells[4]}** | {cells[5]} | {_cell(r, 'compile_cpu')} "
            f"| {_cell(r, 'first_cpu')} | {r['peak_rss_gb']:.1f} |"
        )
    return "\n".join(lines)


def _ratios(results):
    lines = []
    by_key = {(r["backend"], r["scan_units"], r["model"]): r for r in results}
    for (backend, scan, model), deep in by_key.items():
        if model != "PreActResNet1001":
            continue
        for base_scan in sorted({scan, False}):
            shallow = by_key.get((backend, base_scan, "PreActResNet164"))
            if shallow is None:
                continue
            ratios = [
                f"{phase} {deep[phase] / shallow[phase]:.2f}"
                for phase in ("build", "trace", "compile", "first", "compile_cpu", "first_cpu")
                if phase in deep and phase in shallow and shallow[phase] > 0
            ]
            lines.append(
                f"{backend}: PreActResNet1001 (scan_units={scan}) / PreActResNet164 "
                f"(scan_units={base_scan}): " + (", ".join(ratios) or "-")
            )
    return "\n".join(lines)


def main():
    # Flags.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backends", default=os.environ.get("KERAS_BACKEND", "jax"))
    p.add_argument("--models", default="164,1001", help="CIFAR depths, comma-separated")
    p.add_argument("--scan", default="off", choices=("off", "on", "both"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    p.add_argument(
        "--max_rss_gb", type=float, default=8.0, help="stop a measurement above this memory"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds over all measurements; the table keeps "
        "each phase's minimum over the rounds (the least disturbed by other jobs)",
    )
    p.add_argument("--tf_jit", type=lambda s: s.lower() == "true", default=True)
    p.add_argument("--cache", default="", help="JAX persistent compilation cache directory")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scan_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        import keras

        {"jax": _child_jax, "tensorflow": _child_tensorflow, "torch": _child_torch}[
            keras.backend.backend()
        ](args)
        return

    backends = args.backends.split(",")
    for b in backends:
        if b not in ("jax", "tensorflow", "torch"):
            raise SystemExit(f"--backends: unknown backend {b!r}; allowed: jax, tensorflow, torch")
    scans = {"off": (False,), "on": (True,), "both": (False, True)}[args.scan]
    models = [int(m) for m in args.models.split(",")]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; "
          f"batch {args.batch}, {args.size} px, {args.classes} classes, timeout "
          f"{args.timeout:.0f} s, memory limit {args.max_rss_gb} GB", flush=True)  # fmt: skip

    # Measurements, each in a fresh process; rounds interleave them so that a neighbour's
    # load hits all alike.
    rounds = {}
    for _ in range(args.repeat):
        for backend in backends:
            for scan in scans:
                for model in models:
                    r = _measure(backend, model, scan, args)
                    print(json.dumps(r), flush=True)
                    rounds.setdefault((backend, scan, model), []).append(r)
    results = [_combine(v) for v in rounds.values()]

    # Report.
    print()
    print(_table(results))
    print()
    print(_ratios(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "results": results, "rounds": list(rounds.values())}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
