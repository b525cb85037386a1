r"""The CIFAR trainer's CPU step under glibc's malloc and under tcmalloc / jemalloc.

Each round runs the package's trainer (`python -m keras_preact.train.cifar`, Keras
`model.fit`, the numpy pipeline) once per allocator, one after the other, for two epochs of
`--steps` steps on Fashion-MNIST: the first epoch (tracing, warm-up) is left out, the second
one's time (the trainer's `epoch_time_s`, no evaluation in it) gives ms/step. The allocator
is preloaded with `LD_PRELOAD` (keras_preact.train.allocator). The process's minor page
faults and kernel time come from `getrusage` of the finished child. Prints a table of the
medians over `--rounds` and the ratio of each allocator's ms/step to the system's.

    sudo apt-get install libtcmalloc-minimal4 libjemalloc2
    KERAS_BACKEND=tensorflow python benchmarks/cpu_allocator.py --rounds=3
    KERAS_BACKEND=tensorflow python benchmarks/cpu_allocator.py --model=PreActResNet20 --steps=5 --rounds=1

docs/benchmarks.md ("Memory allocator on the CPU") has measured numbers.
"""

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
import tempfile

from keras_preact.train import allocator


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="PreActResNet56")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="steps per epoch; epoch 2 is timed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument(
        "--allocators",
        default="system," + ",".join(allocator.ALLOCATORS),
        help="a comma list of system and " + ", ".join(allocator.ALLOCATORS),
    )
    args = p.parse_args(argv)
    args.allocators = args.allocators.split(",")
    if unknown := [a for a in args.allocators if a != "system" and a not in allocator.ALLOCATORS]:
        p.error(f"--allocators: {unknown} are none of {['system', *allocator.ALLOCATORS]}.")
    return args


def run_trainer(args, name, folder):
    """One trainer run under allocator `name`: `{ms_per_step, minor_faults, sys_s}` of it."""
    env = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow")}
    env.pop("LD_PRELOAD", None)
    if name != "system":
        env = allocator.preload_env(env, [name])
    cmd = [
        *(sys.executable, "-m", "keras_preact.train.cifar", "--dataset=fashion_mnist"),
        *("--source=files", f"--data_dir={args.data_dir}", "--loop=fit", "--pipeline=numpy"),
        *(f"--model={args.model}", f"--batch_size={args.batch_size}", "--epochs=2"),
        *(f"--steps_per_epoch={args.steps}", "--eval_examples=100", "--verbose=0"),
        *(f"--model_dir={folder}", "--nocompilation_cache"),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{name}: the trainer failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    with open(os.path.join(folder, "log.csv"), newline="") as f:
        epochs = list(csv.DictReader(f))
    return {
        "ms_per_step": 1000 * float(epochs[-1]["epoch_time_s"]) / args.steps,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "sys_s": after.ru_stime - before.ru_stime,
    }


def main(argv=None):
    args = parse_args(argv)
    names = [n for n in args.allocators if n == "system" or allocator.find(n)]
    for missing in sorted(set(args.allocators) - set(names)):
        print(f"{missing}: not installed, left out")
    results = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in names:
                results[n].append(run_trainer(args, n, os.path.join(tmp, f"{n}{r}")))
                print(f"round {r + 1} {n}: {results[n][-1]}", flush=True)
    median = {
        n: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for n, rs in results.items()
    }
    base = median.get("system", {}).get("ms_per_step")
    print(f"\n{args.model}, batch {args.batch_size}, {args.steps} steps timed, "
          f"median of {args.rounds} round(s), backend {os.environ.get('KERAS_BACKEND')}")  # fmt: skip
    print("| malloc | ms/step | minor page faults per run | kernel time per run (s) | vs system |")
    print("| --- | --- | --- | --- | --- |")
    for n, m in median.items():
        ratio = f"{m['ms_per_step'] / base:.2f}" if base else ""
        print(f"| {n} | {m['ms_per_step']:.0f} | {m['minor_faults']:,.0f} | {m['sys_s']:.1f} | "
              f"{ratio} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
