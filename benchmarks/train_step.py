"""Training-step time of PreActResNet50 against keras.applications.ResNet50V2.

Same backend (KERAS_BACKEND), process, input size, batch, optimizer and loss for every model;
compilation and the first steps are warm-up and not timed. Models are timed in interleaved
rounds (A, B, C, A, B, C, ...) so a neighbour's load on a shared machine hits all of them
alike; each round times `--steps` consecutive `train_on_batch` calls and the median over
rounds of the per-step time is reported, with the ratio ours / theirs.

    KERAS_BACKEND=jax python benchmarks/train_step.py --batch 8 --size 128 --steps 5 --rounds 5

Models:
    keras_resnet50v2   keras.applications.ResNet50V2(weights=None)
    preact50           keras_preact.PreActResNet50() (the paper's layout: stride on the first
                       1x1, downsampling in the first unit of a stage, BN-ReLU stem)
    preact50_keras     PreActResNet50(layout=Layout.get("paper").replace(stride_in="3x3",
                       downsample_in="last_unit", stem_norm=False)): keras.applications' unit
                       layout without its conv biases, same FLOPs as ResNet50V2
"""

import argparse
import os
import platform
import statistics
import time

import keras
import numpy as np

import keras_preact
from keras_preact.train import metrics

MODELS = {
    "keras_resnet50v2": lambda shape: keras.applications.ResNet50V2(
        weights=None, input_shape=shape, classes=1000
    ),
    "preact50": lambda shape: keras_preact.PreActResNet50(input_shape=shape, classes=1000),
    # keras.applications' unit layout without its conv biases and epsilon (the network the
    # recorded numbers were measured on; layout="keras" adds the biases).
    "preact50_keras": lambda shape: keras_preact.PreActResNet50(
        input_shape=shape,
        classes=1000,
        layout=keras_preact.Layout.get("paper").replace(
            stride_in="3x3", downsample_in="last_unit", stem_norm=False
        ),
    ),
}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions():
    out = {"keras": keras.__version__, "backend": keras.backend.backend()}
    name = keras.backend.backend()
    mod = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(name)
    if mod:
        out[mod] = __import__(mod).__version__
    return out


def main():
    # Flags.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="input height = width, px")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--models", default="keras_resnet50v2,preact50,preact50_keras")
    p.add_argument("--jit", default="auto", help="compile(jit_compile=...): auto, true, false")
    args = p.parse_args()
    jit = {"auto": "auto", "true": True, "false": False}[args.jit.lower()]
    names = args.models.split(",")

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)")
    print(f"versions: {versions()}")
    print(f"batch={args.batch} size={args.size} steps={args.steps} rounds={args.rounds} jit={jit}")

    # Data: one fixed random batch (the input pipeline is not what is measured).
    rng = np.random.default_rng(0)
    shape = (args.size, args.size, 3)
    x = rng.standard_normal((args.batch, *shape), dtype=np.float32)
    y = rng.integers(0, 1000, size=(args.batch,))

    # Models, compiled alike, then warmed up (compilation happens in the first step).
    models = {}
    for n in names:
        keras.utils.set_random_seed(0)
        m = MODELS[n](shape)
        m.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss="sparse_categorical_crossentropy",
            jit_compile=jit,
        )
        t = time.perf_counter()
        for _ in range(args.warmup + 1):
            m.train_on_batch(x, y)
        gmacs = metrics.multiply_adds(m) / 1e9
        print(f"{n}: {m.count_params():,} params, {gmacs:.3f} GMACs/image, {len(m.layers)} layers, "
              f"warm-up {time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
        models[n] = m

    # Interleaved timing rounds.
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n, m in models.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                loss = m.train_on_batch(x, y)
            float(np.asarray(loss))  # make sure the last step finished
            times[n].append((time.perf_counter() - t) / args.steps)
        print(f"round {r}: " + "  ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names),
              flush=True)  # fmt: skip

    # Report.
    med = {n: statistics.median(v) for n, v in times.items()}
    print("\nmodel               median ms/step   min   max")
    for n in names:
        print(f"{n:20s}{med[n] * 1e3:12.1f}{min(times[n]) * 1e3:9.1f}{max(times[n]) * 1e3:7.1f}")
    if "keras_resnet50v2" in med:
        ref = med["keras_resnet50v2"]
        for n in names:
            if n != "keras_resnet50v2":
                print(f"ratio {n} / keras_resnet50v2 = {med[n] / ref:.3f}")


if __name__ == "__main__":
    main()
