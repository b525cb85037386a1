r"""What the trainer's JAX loop costs on top of its own jitted step, in one process, over
every device it has (one GPU, the 8 of a GPU box or TPU VM, or forced CPU devices).

Two ways of running the same model, optimizer and batch size, timed in alternating rounds
(a neighbour's load on a shared machine hits both alike) on the process's devices, the
batch split over them and the state replicated:

* trainer: the trainer's `controller.Controller` over its `jax_loop.JaxRunner`, as
  `cifar.py --loop=jax --pipeline=numpy` runs them. The run is built by the trainer's own
  functions (`config.get_config`, `distribution.setup`, `cifar.prepare`, `modeling.build`,
  `checkpoints.Store`, `runlog.RunLog`), so it has the trainer's input stream (a training
  `numpy_pipeline.ArrayDataset` of uint8 images, `normalize=False`, 4-pixel crop and flip in
  numpy, `jax_loop.prefetch` to the device from a background thread), the runner's per-step
  metric sums and the controller's progress-bar updates (a host sync every 10 steps), and
  its epoch end (the learning rate, the finite checks, the checkpoint with `log.csv`). One
  round is one epoch of `--steps` steps, from the end of the previous epoch's checkpoint to
  the end of this one's; the first epoch (compilation) is warm-up. There is no validation
  set: evaluation is not per-step overhead.
* bare: the step of `jax_loop.make_train_step` for the same model and optimizer, sharded
  as the runner's (`NamedSharding`s over a mesh of every device), called `--steps` times in
  a tight loop on one device-resident uint8 batch, after compilation and `--warmup` steps;
  a round ends when its last update is ready.

Each bare round runs at an epoch start of the trainer (when the controller asks the data for
the epoch's input, after the previous epoch's checkpoint), so the rounds alternate: warm-up epoch, bare, trainer, bare, trainer, ... The median images/s
of each are printed; the last line is `ratio X`, trainer / bare. Random uint8 images stand in
for CIFAR-10 (the cost does not depend on the pixels).

    KERAS_BACKEND=jax python benchmarks/trainer_overhead.py
    KERAS_BACKEND=jax python benchmarks/trainer_overhead.py --model=PreActResNet56 --rounds=5
    # a GPU box: every GPU
    KERAS_BACKEND=jax python benchmarks/trainer_overhead.py --model=PreActResNet110 --batch=1024
    # two CPU devices
    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \
        python benchmarks/trainer_overhead.py

The checkpoint is saved once per round, so its cost weighs `390 / --steps` times more here
than in a CIFAR-10 epoch of 390 steps; its median time per save is printed on its own.
docs/benchmarks.md ("Trainer overhead of the JAX loop") has measured numbers.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
if os.environ["KERAS_BACKEND"] != "jax":
    raise SystemExit(
        f"trainer_overhead.py times the JAX loop: run it with KERAS_BACKEND=jax "
        f"(KERAS_BACKEND is {os.environ['KERAS_BACKEND']!r})."
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from keras_preact.train import (  # noqa: E402
    checkpoints,
    cifar,
    config,
    controller,
    distribution,
    jax_loop,
    modeling,
    optimization,
    runlog,
)


class TimedStore(checkpoints.Store):
    """The trainer's checkpoint store, recording how long each save takes."""

    save_s = []

    def save(self, *args, **kwargs):
        start = time.perf_counter()
        super().save(*args, **kwargs)
        self.save_s.append(time.perf_counter() - start)


class Alternate(cifar.MemoryData):
    """The trainer's data: at each epoch start, the trainer's round ends (after the previous
    epoch's checkpoint), a bare round runs, then the next trainer round starts.

    Rounds are `(wall seconds, process CPU seconds)`; a trainer round also holds the
    seconds its checkpoint save took. No validation set: `evaluate` gives no batch.
    """

    def setup(self, bare_round, rounds):
        self.bare_round, self.rounds = bare_round, rounds
        self.trainer, self.bare, self.mark = [], [], None

    def end_round(self):
        wall, cpu = time.perf_counter(), time.process_time()
        self.trainer.append((wall - self.mark[0], cpu - self.mark[1], TimedStore.save_s[-1]))

    def train(self, epoch, step, steps):
        if epoch > 1:  # epoch 0 traced and compiled the step: warm-up
            self.end_round()
        if epoch > 0 and len(self.bare) < self.rounds:
            self.bare.append(self.bare_round())
        self.mark = time.perf_counter(), time.process_time()
        return super().train(epoch, step, steps)

    def evaluate(self):
        return []


def report(args, clock, wall, augment_ms):
    """Prints medians over the rounds; the last line is the ratio of wall-clock rates."""
    images = args.steps * args.batch
    load = os.getloadavg()

    def median_rate(rounds, seconds):
        rates = [images / seconds(r) for r in rounds]
        return statistics.median(rates), " ".join(f"{r:.1f}" for r in rates)

    trainer, trainer_rounds = median_rate(clock.trainer, lambda r: r[0])
    bare, bare_rounds = median_rate(clock.bare, lambda r: r[0])
    unsaved, _ = median_rate(clock.trainer, lambda r: r[0] - r[2])
    trainer_cpu, _ = median_rate(clock.trainer, lambda r: r[1])
    bare_cpu, _ = median_rate(clock.bare, lambda r: r[1])
    save_s = statistics.median(r[2] for r in clock.trainer)
    # Bare round k ran just before trainer round k: their ratio sees the same neighbours.
    paired = statistics.median(
        bare_r[0] / trainer_r[0] for bare_r, trainer_r in zip(clock.bare, clock.trainer)
    )
    print(f"\nfit: {wall:.1f} s; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"host augmentation: {augment_ms:.1f} ms CPU per batch")
    print(f"checkpoint save: median {save_s:.3f} s per epoch")
    print(f"trainer (controller):   median {trainer:.1f} images/s  [{trainer_rounds}]")
    print(f"bare jitted step:       median {bare:.1f} images/s  [{bare_rounds}]")
    print(f"trainer less its checkpoint saves: {unsaved:.1f} images/s, ratio {unsaved / bare:.2f}")
    print(f"per CPU second (process CPU time): ratio {trainer_cpu / bare_cpu:.2f}")
    print(f"median of the rounds' paired ratios: {paired:.2f}")
    print(f"ratio {trainer / bare:.2f}")


def main():
    # 1. Flags.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="PreActResNet20", help="a keras_preact model name")
    p.add_argument("--batch", type=int, default=128, help="batch size")
    p.add_argument("--steps", type=int, default=12, help="steps per round (a trainer epoch)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds of each")
    p.add_argument("--size", type=int, default=5120, help="random 32x32x3 training images")
    p.add_argument("--warmup", type=int, default=3, help="untimed bare steps after compiling")
    args = p.parse_args()
    if args.size < args.batch:
        p.error(f"--size={args.size} must be at least --batch={args.batch}.")
    load = os.getloadavg()
    print(
        f"{args.model}, batch {args.batch}, {args.steps} steps x {args.rounds} rounds, "
        f"{args.size} images; jax {jax.__version__} on {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )

    # 2. The trainer's run: config, set-up, data, model and optimizer, store and log.
    model_dir = tempfile.mkdtemp(prefix="trainer_overhead_")
    cfg = config.get_config(
        None,
        "cifar",
        model=args.model,
        batch_size=args.batch,
        steps_per_epoch=args.steps,
        epochs=1 + args.rounds,
        base_lr=0.1,
        loop="jax",
        pipeline="numpy",
        model_dir=model_dir,
        verbose=0,
        source="files",
    )
    run = distribution.setup(cfg)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.size, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, args.size)
    arrays = (x, y), (x[: args.batch], y[: args.batch])
    cfg, _ = cifar.prepare(cfg, run, arrays=arrays)
    clock = Alternate(cfg, run, arrays)
    schedule = optimization.lr_schedule(cfg)
    built = modeling.build(cfg, run, schedule, input_shape=x.shape[1:], classes=10)
    store, log = TimedStore(cfg.model_dir), runlog.RunLog(cfg.model_dir, export=built.export)
    train_data = clock.train(0, 0, args.steps)  # the training stream
    assert not train_data.normalize, "the trainer's JAX loop ships uint8 batches"

    # 3. The bare step: same model and optimizer, its own copy of the state, one batch,
    # sharded over the devices as the trainer's runner does.
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))
    step = jax_loop.make_train_step(built.model, built.optimizer, mesh=(replicated, split))
    bare_state = jax.device_put(jax_loop.init_state(built.model, built.optimizer), replicated)
    images, labels = jax.device_put(train_data[0], split)
    start = time.perf_counter()
    for _ in range(1 + args.warmup):
        bare_state, _ = step(bare_state, images, labels)
    jax.block_until_ready(bare_state)
    print(f"bare step: compiled and warmed up in {time.perf_counter() - start:.1f} s", flush=True)

    def bare_round():
        nonlocal bare_state
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            bare_state, _ = step(bare_state, images, labels)
        jax.block_until_ready(bare_state)
        return time.perf_counter() - wall, time.process_time() - cpu

    # The trainer's host work per batch (one thread): on a CPU it shares the cores with XLA.
    cpu = time.process_time()
    for i in range(5):
        train_data[i]
    augment_ms = (time.process_time() - cpu) / 5 * 1e3

    # 4. Alternating rounds inside the trainer's own controller.
    clock.setup(bare_round, args.rounds)
    runner = jax_loop.JaxRunner(built.model, label_smoothing=cfg.label_smoothing)
    start = time.perf_counter()
    controller.Controller(cfg, runner, clock, store=store, log=log).run(checkpoints.Restored())
    clock.end_round()
    wall = time.perf_counter() - start

    report(args, clock, wall, augment_ms)
    shutil.rmtree(cfg.model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
