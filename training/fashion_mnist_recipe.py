r"""A wide pre-activation ResNet for Fashion-MNIST, trained in one GPU command (JAX, no TF).

The network is the paper's CIFAR family widened four times (`PreActResNet(depth=26,
width_multiplier=4)`: 4 basic units per stage of 64/128/256 channels, 5.86 M parameters, the
WRN-28-4 of Zagoruyko & Komodakis in their depth count), small enough to ship in float16 in
11.2 MiB. Recipe: SGD with Nesterov momentum 0.9, batch 256, lr 0.2 (0.1 x 256 / 128),
2 epochs of linear warm-up then cosine decay to 0, weight decay 5e-4 on conv and dense
kernels; 4-pixel padding, random 28x28 crop, horizontal flip and random erasing (p = 0.5);
bf16 compute. docs/gpu.md gives the reasons and the time estimate.

    KERAS_BACKEND=jax python training/fashion_mnist_recipe.py \
        --data_dir=/usr/share/datasets/fashion-mnist --model_dir=runs/fmnist_wrn --out=$OUT

`--epochs=auto` (the default) times 20 steps after compiling and picks the number of epochs
that fills the rest of `--time_budget_s` less 60 s for the final evaluation and export (or
`--target_s` seconds of training, for a run planned over several calls), between
`--min_epochs` and `--max_epochs`; the choice is printed and recorded, and `--epochs=N`
repeats it exactly. Every epoch ends with an
atomic checkpoint in files of at most 16 MiB, and `--time_budget_s` stops cleanly before the
command limit: the same command continues the run, also on another machine when the
checkpoint folder is copied over (from its weights files alone, if need be: momentum then
restarts at zero).

At the end it measures top-1 on all 10,000 test images, single view and with flip
test-time augmentation, for the weights stored in float32 and in float16 and read back
through `keras_preact.convert.read_tensors` into a float32 model, and writes to `--model_dir` (and `--out`):
`fashion_mnist_wrn.h5` (the export, this package's by-layer-name format), `recipe.json`
(accuracies, epochs, timings, file hash), `log.csv`, `curves.png`. `--smoke` trains a
tiny network for a few steps on CPU (CI).
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

START = time.time()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import xla_env  # noqa: E402  (sets no JAX state until called)

EXPORT_NAME = "fashion_mnist_wrn.h5"
#: Seconds kept at the end of a call for the final evaluations, the export and their checks.
FINAL_RESERVE_S = 60.0
MAX_EXPORT_BYTES = 16 * 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--model_dir", default="runs/fmnist_wrn")
    p.add_argument("--out", default=None, help="also copy the outputs here (e.g. $OUT)")
    p.add_argument("--depth", type=int, default=26, help="CIFAR-family depth, 6n+2")
    p.add_argument("--width", type=float, default=4.0, help="width_multiplier")
    p.add_argument("--epochs", default="auto", help="an integer, or auto (fill the call)")
    p.add_argument(
        "--target_s",
        type=float,
        default=None,
        help="with --epochs=auto: seconds of training to fill (default: what is left of "
        "--time_budget_s after compiling, less 60 s for the final evaluation and export)",
    )
    p.add_argument("--min_epochs", type=int, default=30)
    p.add_argument("--max_epochs", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--base_lr", type=float, default=None, help="default 0.1 x batch / 128")
    p.add_argument("--warmup_epochs", type=float, default=2.0)
    p.add_argument("--weight_decay", type=float, default=5e-4)
    p.add_argument("--label_smoothing", type=float, default=0.0)
    p.add_argument("--erasing", type=float, default=0.5, help="random-erasing probability")
    p.add_argument("--padding", type=int, default=4)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--eval_every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--export_dtype",
        choices=["auto", "float16", "float32"],
        default="auto",
        help="auto: float16 when its test accuracy equals float32's",
    )
    p.add_argument(
        "--time_budget_s",
        type=float,
        default=540.0,
        help="stop cleanly (checkpointed) before this many seconds; 0: no limit",
    )
    p.add_argument("--smoke", action="store_true", help="tiny network, few steps, CPU (CI)")
    args = p.parse_args(argv)
    if args.epochs != "auto":
        try:
            args.epochs = int(args.epochs)
        except ValueError:
            p.error(f"--epochs={args.epochs!r} must be an integer or 'auto'.")
        if args.epochs < 1:
            p.error(f"--epochs={args.epochs} must be >= 1.")
    if (args.depth - 2) % 6 or args.depth < 8:
        p.error(f"--depth={args.depth} must be 6n+2 with n >= 1 (8, 14, 20, 26, 32, ...).")
    if args.base_lr is None:
        args.base_lr = 0.1 * args.batch_size / 128  # linear scaling from the WRN recipe
    if args.smoke:
        # Tiny and quick; --epochs=auto still times its steps, and can only pick 2 epochs.
        args.depth, args.width, args.batch_size, args.eval_every = 8, 0.5, 16, 1
        args.min_epochs = args.max_epochs = 2
        args.target_s = args.target_s or 5.0
    return args


def main():
    args = parse_args()
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    if backend != "jax":
        raise SystemExit(f"fashion_mnist_recipe.py runs on JAX; KERAS_BACKEND={backend!r}.")
    if args.smoke:
        xla_env.smoke_environment()
    import jax
    import keras
    import numpy as np

    import keras_preact
    from keras_preact import convert
    from keras_preact import weights as kp_weights
    from keras_preact.data import idx
    from training import jax_loop

    if not args.smoke:
        jax.config.update("jax_compilation_cache_dir", os.path.join(args.model_dir, "jax_cache"))
    guard = jax_loop.TimeGuard(args.time_budget_s, start=START)
    run_dir = os.path.join(args.model_dir, "checkpoints")

    # 1. Data: uint8 images stay uint8 until the device normalizes them.
    (x_train, y_train), (x_test, y_test) = idx.load_fashion_mnist(args.data_dir)
    if args.smoke:
        x_train, y_train, x_test, y_test = x_train[:96], y_train[:96], x_test[:40], y_test[:40]
    steps_per_epoch = len(x_train) // args.batch_size
    if args.smoke:
        steps_per_epoch = 3
    augment = jax_loop.Augment(padding=args.padding, flip=True, erasing=args.erasing)

    # 2. Model and optimizer.
    keras.config.set_dtype_policy("mixed_bfloat16" if args.precision == "bf16" else "float32")
    keras.utils.set_random_seed(args.seed)

    def build():
        # uint8 pixels in: the model's first layer normalizes them on the device.
        return keras_preact.PreActResNet(
            depth=args.depth,
            family="cifar",
            block="basic",
            width_multiplier=args.width,
            input_shape=(28, 28, 1),
            classes=10,
            classifier_activation=None,
            include_preprocessing=True,
            preprocessing="fashion_mnist",
            seed=args.seed,
        )

    model = build()
    print(
        f"PreActResNet(depth={args.depth}, width_multiplier={args.width}): "
        f"{model.count_params():,} parameters, "
        f"{jax_loop.multiply_adds(model) / 1e6:.1f} M multiply-adds per image",
        flush=True,
    )

    schedule = jax_loop.Schedule(
        args.base_lr,
        decay="cosine",
        warmup_steps=int(args.warmup_epochs * steps_per_epoch),
        warmup="linear",
    )
    optimizer = keras.optimizers.SGD(args.base_lr, momentum=0.9, nesterov=True)
    step = jax_loop.make_train_step(
        model,
        optimizer,
        schedule=schedule,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
    )
    eval_step = jax_loop.make_eval_step(model)

    # 3. The number of epochs: from the checkpoint, the flag, or timed steps. The run's
    # length is an input of the compiled step, so timing it costs no second compilation.
    epochs = args.epochs
    saved = jax_loop.load_checkpoint(run_dir, ("optimizer",)) if os.path.isdir(run_dir) else None
    if saved is not None:
        saved_epochs = saved[1]["spec"]["epochs"]
        if epochs not in ("auto", saved_epochs):
            raise SystemExit(
                f"{run_dir} holds a run of {saved_epochs} epochs; --epochs={epochs} "
                "differs. Use another --model_dir or the same epochs."
            )
        epochs = saved_epochs
        del saved
    elif epochs == "auto":
        state = jax_loop.init_state(model, optimizer, total_steps=args.max_epochs * steps_per_epoch)
        stream = jax_loop.train_batches(
            x_train, y_train, args.batch_size, seed=args.seed, start_step=0, augment=augment
        )
        timed, n, warm = 0.0, (8 if args.smoke else 25), (2 if args.smoke else 5)
        for i, (_, x, y) in enumerate(jax_loop.prefetch(stream)):
            if i == warm:  # after compilation and warm-up
                jax.block_until_ready(state.trainable)
                t = time.time()
            state, metrics = step(state, x, y)
            if i + 1 == n:
                jax.block_until_ready(metrics["loss"])
                timed = (time.time() - t) / (n - warm)
                break
        # Evaluation: 10k images every eval_every epochs at about a third of a training
        # step's cost per image.
        eval_s = timed * len(x_test) / args.batch_size / 3.0 / args.eval_every
        per_epoch = timed * steps_per_epoch + eval_s
        # Fill this call (or --target_s seconds, for a run planned over several calls).
        target = args.target_s or max(guard.remaining() - FINAL_RESERVE_S, 0.0)
        if not math.isfinite(target):
            raise SystemExit("--epochs=auto needs --target_s or a --time_budget_s.")
        epochs = int(min(args.max_epochs, max(args.min_epochs, target // per_epoch)))
        print(
            f"auto epochs: {1000 * timed:.1f} ms/step, about {per_epoch:.1f} s/epoch with "
            f"evaluation -> {epochs} epochs to fill {target:.0f} s of training",
            flush=True,
        )
        del state
    state = jax_loop.init_state(model, optimizer, total_steps=epochs * steps_per_epoch)

    # 4. Train (resumes from the newest checkpoint in run_dir).
    spec = jax_loop.RunSpec(
        batch_size=args.batch_size,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_batch_size=min(500, len(x_test)),
    )
    config = {
        k: getattr(args, k)
        for k in (
            "depth",
            "width",
            "base_lr",
            "warmup_epochs",
            "weight_decay",
            "label_smoothing",
            "erasing",
            "padding",
            "precision",
        )
    }
    out = jax_loop.fit(
        state=state,
        train_step=step,
        eval_step=eval_step,
        data=((x_train, y_train), (x_test, y_test)),
        spec=spec,
        augment=augment,
        run_dir=run_dir,
        guard=guard,
        config=config,
        schedule=schedule,
        iteration_index=jax_loop.iteration_index(optimizer),
    )
    _plot(out["rows"], os.path.join(args.model_dir, "curves.png"), args, epochs)
    shutil.copy(os.path.join(run_dir, "log.csv"), os.path.join(args.model_dir, "log.csv"))
    if out["status"] != "done":
        print(
            f"INCOMPLETE ({out['status']}) after epoch {out['epoch']}/{epochs}, "
            f"{time.time() - START:.0f} s: run the same command again to continue",
            flush=True,
        )
        _copy_out(args, ["log.csv", "curves.png"])
        sys.exit(0 if out["status"] == "stopped" else 1)

    # 5. Final evaluation on every test image as users get the weights: float32 compute, the
    # exported file read back by keras_preact (read_tensors + assign, what weights= does).
    state = out["state"]
    jax_loop.assign_state(model, state)
    tensors = {
        layer.name: {w.name: np.asarray(w.numpy(), np.float32) for w in layer.weights}
        for layer in model.layers
        if layer.weights
    }
    last = [r for r in out["rows"] if r["kind"] == "epoch"][-1]
    summary = {
        "model": f"PreActResNet(depth={args.depth}, family='cifar', block='basic', "
        f"width_multiplier={args.width})",
        "parameters": model.count_params(),
        "epochs": epochs,
        "train_seconds": round(out["train_seconds"], 1),
        "test_images": len(x_test),
        "bf16_top1_last_epoch": round(100.0 * (1.0 - last["test_error"]), 2),
        **config,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    keras.config.set_dtype_policy("float32")
    fresh = build()
    x = x_test  # uint8: the model normalizes
    batch = min(500, len(x))

    def accuracy(path):
        kp_weights.assign(fresh, convert.read_tensors(path), source=path)
        probs = jax.nn.softmax(fresh.predict(x, batch_size=batch, verbose=0), -1)
        flipped = jax.nn.softmax(fresh.predict(x[:, :, ::-1], batch_size=batch, verbose=0), -1)
        top1 = np.mean(np.argmax(probs, -1) == y_test)
        tta = np.mean(np.argmax(probs + flipped, -1) == y_test)
        return {
            "top1": round(100.0 * float(top1), 2),
            "top1_flip_tta": round(100.0 * float(tta), 2),
            "bytes": os.path.getsize(path),
            "sha256": kp_weights.file_digest(path),
        }

    paths = {}
    for dtype in ("float32", "float16"):
        paths[dtype] = os.path.join(args.model_dir, f"export_{dtype}.h5")
        try:
            convert.write_tensors(paths[dtype], tensors, dtype=dtype)
        except ValueError as e:  # a tensor outside float16's range
            summary[dtype] = {"error": str(e)}
            del paths[dtype]
            continue
        summary[dtype] = accuracy(paths[dtype])
    # float16 storage halves the file; it ships only if the test accuracy is unchanged.
    chosen = args.export_dtype
    if chosen == "auto":
        same = "float16" in paths and summary["float16"]["top1"] >= summary["float32"]["top1"]
        chosen = "float16" if same else "float32"
    if chosen not in paths:
        raise SystemExit(f"No {chosen} export: {summary[chosen].get('error')}")
    os.replace(paths.pop(chosen), os.path.join(args.model_dir, EXPORT_NAME))
    for other in paths.values():
        os.remove(other)
    summary["export"] = {"file": EXPORT_NAME, "dtype": chosen, **summary[chosen]}
    if summary["export"]["bytes"] > MAX_EXPORT_BYTES:
        print(
            f"WARNING: the export is {summary['export']['bytes'] / 2**20:.1f} MiB, over the "
            "16 MiB a shipped file may have",
            flush=True,
        )
    summary["elapsed_s"] = round(time.time() - START, 1)
    jax_loop._write_json(os.path.join(args.model_dir, "recipe.json"), summary)
    print(json.dumps(summary, indent=1), flush=True)
    _copy_out(args, [EXPORT_NAME, "recipe.json", "log.csv", "curves.png"])


def _copy_out(args, names):
    if not args.out:
        return
    os.makedirs(args.out, exist_ok=True)
    for n in names:
        src = os.path.join(args.model_dir, n)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(args.out, n))


def _plot(rows, path, args, epochs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r for r in rows if r["kind"] == "epoch"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["epoch"] for r in ep], [r["train_loss"] for r in ep], "-", label="train (augmented)")
    a.plot(
        [r["epoch"] for r in ep if r.get("test_loss") is not None],
        [r["test_loss"] for r in ep if r.get("test_loss") is not None],
        "o-",
        label="test",
    )
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.plot(
        [r["epoch"] for r in ep if r.get("test_error") is not None],
        [100 * r["test_error"] for r in ep if r.get("test_error") is not None],
        "o-",
    )
    b.set(xlabel="epoch", ylabel="test error (%)", title="test error")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle(f"Fashion-MNIST, PreActResNet depth {args.depth} x{args.width:g}, {epochs} epochs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
