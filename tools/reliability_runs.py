"""Fault injection on real training runs; prints the table of docs/reliability.md.

Each trial runs the CIFAR trainer (`python -m keras_preact.train.cifar`, PreActResNet20 on
a small CIFAR-format data set written here) and does to it what a cluster or a user does:
SIGKILL at a random moment, SIGTERM, Ctrl-C, a learning rate that diverges, a second
trainer on the same folder, a resume with changed options. A trial *held* when the run
stopped as documented (exit code, one message, no traceback) and then resumed to the same
end as an uninterrupted run, with nothing lost; anything else *broke*.

    python tools/reliability_runs.py --trials=2 --work=/tmp/reliability

The `fit` loop runs under KERAS_BACKEND=tensorflow, the JAX loop under KERAS_BACKEND=jax.
"""

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

BACKEND = {"fit": "tensorflow", "jax": "jax"}


def fake_cifar(folder):
    """64 training and 16 test random images in CIFAR-10's python format."""
    from keras_preact.data import cifar_files

    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64))
    test = (rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 16))
    cifar_files.write_cifar("cifar10", folder, train, test)
    return folder


class Trainer:
    """One run folder's trainer command, for one loop."""

    def __init__(self, data_dir, model_dir, loop, *, steps=30, epochs=2):
        self.model_dir, self.loop = model_dir, loop
        self.cmd = [
            sys.executable, "-m", "keras_preact.train.cifar", "--dataset=cifar10",
            "--source=files", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
            f"--loop={loop}", "--model=PreActResNet20", "--batch_size=16",
            f"--steps_per_epoch={steps}", f"--epochs={epochs}", "--verbose=2",
        ]  # fmt: skip
        self.env = {**os.environ, "KERAS_BACKEND": BACKEND[loop], "PYTHONUNBUFFERED": "1"}

    def run(self, *extra):
        out = subprocess.run(
            [*self.cmd, *extra], env=self.env, capture_output=True, text=True, timeout=900
        )
        return out.returncode, out.stdout + out.stderr

    def start(self, *extra):
        return subprocess.Popen(
            [*self.cmd, *extra],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def signalled(self, signum, delay):
        """Runs, and sends `signum` `delay` s after the first epoch began."""
        proc, lines = self.start(), []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Epoch 1/"):
                time.sleep(delay)
                proc.send_signal(signum)
        proc.wait(timeout=900)
        return proc.returncode, "".join(lines)

    def file(self, name):
        return os.path.join(self.model_dir, name)

    def json(self, name):
        with open(self.file(name)) as f:
            return json.load(f)

    def leftovers(self):
        """Temporary files and folders (hidden ones included) under the run folder."""
        return [
            os.path.join(root, name)
            for root, dirs, files in os.walk(self.model_dir)
            for name in dirs + files
            if ".tmp" in name
        ]


def finished(t, epochs, steps):
    """The run ended as an uninterrupted one does."""
    summary = t.json("summary.json")
    rows = open(t.file("log.csv")).read().splitlines()[1:]
    return summary["steps"] == epochs * steps and len(rows) == epochs and not t.leftovers()


def clean(code, out, expected):
    return code == expected and "Traceback" not in out


def kill_trial(t, rng, *, at_write):
    """SIGKILL at a random moment of the run, or (`at_write`) a few milliseconds after a
    checkpoint's temporary weights file appears: inside its writes, before its commit."""
    proc = t.start()
    for line in proc.stdout:
        if line.startswith("Epoch 1/"):
            break
    if at_write:
        pattern, deadline = t.file("checkpoints/*/.tmp-*"), time.time() + 300
        while not glob.glob(pattern) and time.time() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.005))  # a checkpoint of this net takes ~20 ms
    else:
        time.sleep(rng.uniform(0.5, 6.0))
    proc.kill()
    proc.wait()
    folders = glob.glob(t.file("checkpoints/epoch-*"))
    uncommitted = [p for p in folders if not os.path.exists(os.path.join(p, "state.json"))]
    during_write = bool(t.leftovers() or uncommitted)
    code, out = t.run()
    return clean(code, out, 0) and finished(t, 3, 4), during_write


def signal_trial(t, signum):
    code, out = t.signalled(signum, delay=1.0)
    stopped = clean(code, out, 128 + signum) and "Resume with the same command" in out
    code, out = t.run()
    return stopped and clean(code, out, 0) and finished(t, 2, 30)


def diverge_trial(t):
    """Two good epochs, then a learning rate of 1e4 (allowed explicitly on resume)."""
    code, _ = t.run()
    final = open(t.file("final.weights.h5"), "rb").read()  # the good run's result
    code, out = t.run(
        "--epochs=4",
        "--lr_schedule=constant",
        "--base_lr=1e4",
        "--allow_changes=lr_schedule,base_lr",
    )
    import h5py

    arrays = []
    for path in glob.glob(t.file("checkpoints/*/model.weights.h5")):
        with h5py.File(path, "r") as f:
            f.visititems(lambda n, o: arrays.append(o[()]) if hasattr(o, "dtype") else None)
    finite = all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f")
    return (
        clean(code, out, 3)
        and "Diverged" in out
        and "epoch 3" in out
        and finite
        and open(t.file("final.weights.h5"), "rb").read() == final
        and os.path.isdir(t.file("checkpoints/epoch-0002"))
    )


def two_trainers_trial(t):
    first, lines = t.start(), []
    for line in first.stdout:
        lines.append(line)
        if line.startswith("Epoch 1/"):
            break
    began = time.time()
    code, out = t.run()
    refused = code == 4 and f"pid {first.pid}" in out and "Traceback" not in out
    fast = time.time() - began < 60
    rest = first.stdout.read()
    first.wait(timeout=900)
    return refused and fast and first.returncode == 0 and finished(t, 2, 30) and bool(rest)


def changed_trial(t, extra, expected):
    """A resume with `extra` options: refused (config.json untouched) or allowed (recorded)."""
    before = open(t.file("config.json"), "rb").read()
    code, out = t.run(*extra)
    if expected == "refused":
        return clean(code, out, 5) and open(t.file("config.json"), "rb").read() == before
    resumes = t.json("config.json")["resumes"]
    names = {a.split("=")[0][2:] for a in extra if not a.startswith("--allow_changes")}
    return clean(code, out, 0) and names <= set(resumes[-1]["changed"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--work", default="/tmp/keras-preact-reliability")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    data = fake_cifar(os.path.join(args.work, "data"))
    rng, rows, begin = random.Random(args.seed), [], time.time()
    counter = iter(range(10**6))

    def trainer(loop, **kw):
        return Trainer(data, os.path.join(args.work, f"run{next(counter)}"), loop, **kw)

    def record(case, results):
        held = sum(bool(r) for r in results)
        rows.append((case, len(results), held, len(results) - held))
        print(f"| {case} | {len(results)} | {held} | {len(results) - held} |", flush=True)

    print("| case | trials | held | broke |\n|---|---|---|---|", flush=True)
    for loop in ("fit", "jax"):
        for at_write in (False, True):
            kills = [
                kill_trial(trainer(loop, steps=4, epochs=3), rng, at_write=at_write)
                for _ in range(args.trials)
            ]
            during = sum(d for _, d in kills)
            moment = "as a checkpoint is written" if at_write else "at a random moment"
            record(
                f"`{loop}` loop: SIGKILL {moment}, then resume "
                f"({during} of {len(kills)} left a checkpoint half-written)",
                [k for k, _ in kills],
            )
        for signum in (signal.SIGTERM, signal.SIGINT):
            record(
                f"`{loop}` loop: {signal.Signals(signum).name} mid-epoch, then resume",
                [signal_trial(trainer(loop), signum) for _ in range(args.trials)],
            )
    record(
        "divergence (`--base_lr=1e4` after 2 good epochs), `fit` and JAX loops",
        [diverge_trial(trainer(loop, steps=4)) for loop in ("fit", "jax")],
    )
    record(
        "a second trainer on a running trainer's folder",
        [two_trainers_trial(trainer(loop)) for loop in ("fit", "jax")][: args.trials],
    )
    classes = {
        "the net (`--model=PreActResNet32`, `--unit=original`): refused": [
            (["--model=PreActResNet32"], "refused"),
            (["--unit=original"], "refused"),
        ],
        "the run's meaning (`--batch_size=32`, `--seed=1`, `--base_lr=0.5`): refused": [
            (["--batch_size=32"], "refused"),
            (["--seed=1"], "refused"),
            (["--base_lr=0.5"], "refused"),
        ],
        "the same with `--allow_changes`: resumed, recorded": [
            (["--batch_size=32", "--allow_changes=batch_size", "--epochs=2"], "allowed"),
        ],
        "harmless (`--epochs`, `--verbose`, `--eval_examples`): resumed, recorded": [
            (["--epochs=3", "--verbose=1", "--eval_examples=8"], "allowed"),
        ],
    }
    for name, cases in classes.items():
        results = []
        for extra, expected in cases:
            t = trainer("jax", steps=4, epochs=1)
            t.run()
            results.append(changed_trial(t, extra, expected))
        record(f"resume with a changed option, {name}", results)
    print(f"\n{sum(r[1] for r in rows)} trials in {time.time() - begin:.0f} s", flush=True)


if __name__ == "__main__":
    main()
