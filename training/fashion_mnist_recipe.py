r"""A wide pre-activation ResNet for Fashion-MNIST, trained and exported for the package.

The network is the paper's CIFAR ResNet-20 widened four times (`PreActResNet20`,
`--width_multiplier=4`: 3 basic units per stage of 64/128/256 channels, 4.30 M parameters,
8.2 MiB in float16). Recipe (Zagoruyko and Komodakis' wide-ResNet recipe with Zhong et al.'s
random erasing): SGD with Nesterov momentum 0.9, batch 256, lr 0.2 (0.1 x 256 / 128,
linear scaling), 2 epochs of linear warm-up then cosine decay to 0, weight decay 5e-4 on
conv and dense kernels; 4-pixel padding, random crop, horizontal flip, random erasing
(p = 0.5). The training is one run of the package's trainer, `python -m
keras_preact.train.cifar` (`--loop=jax` under JAX, `--loop=fit` under other backends; the
numpy input pipeline, so no TensorFlow is needed), in `--model_dir`.

On a GPU box, a cloud VM or in a cluster job:

    pip install -e . "jax[cuda12]" absl-py h5py matplotlib
    sudo apt-get install dataset-fashion-mnist   # or the four IDX files in any folder
    python training/fashion_mnist_recipe.py --data_dir=/usr/share/datasets/fashion-mnist \
        --model_dir=runs/fmnist_wrn --out=results

`--time_budget=SECONDS` bounds the command: the trainer stops at an epoch end with a
checkpoint (a minute is kept for the final evaluation), prints how far it got, and the
command exits 0; run the same command again to resume (also after a crash or a
preemption: every epoch ends with a checkpoint). Other flags (`--model`, `--epochs`,
`--batch_size`, `--base_lr`, `--warmup_steps`, `--weight_decay`, `--erasing`,
`--label_smoothing`, `--mixed_precision`, ...) change the recipe; any flag this script does
not know is passed to the trainer as given.

Once the run has finished (its `summary.json` exists), the final weights are measured on all
10,000 test images, single view and with flip test-time augmentation, as users get them:
exported to this package's by-layer-name format in float32 and in float16 and read back
through `keras_preact.convert.read_tensors` into a float32 model. Float16 ships only if its
top-1 equals float32's. Written to `--model_dir` (and copied to `--out`):
`fashion_mnist_wrn.h5` (the export), `recipe.json` (accuracies, epochs, timings, size and
SHA-256 of both files), `log.csv` (the trainer's, one row per epoch) and `curves.png`.
`--smoke` trains a tiny network (width 0.5) for two epochs of three steps on the CPU (CI).
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

START = time.time()
EXPORT_NAME = "fashion_mnist_wrn.h5"
OUTPUTS = [EXPORT_NAME, "recipe.json", "log.csv", "curves.png"]
MAX_EXPORT_BYTES = 16 * 2**20  # what a file shipped in the package may weigh
FINAL_RESERVE_S = 60.0  # kept of --time_budget for the final evaluation and the export
TRAIN_IMAGES = 60_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--model_dir", default="runs/fmnist_wrn")
    p.add_argument("--out", default=None, help="also copy the outputs here")
    p.add_argument("--model", default="PreActResNet20")
    p.add_argument("--width_multiplier", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--base_lr", type=float, default=None, help="default: 0.1 x batch / 128")
    p.add_argument("--warmup_steps", type=int, default=None, help="default: 2 epochs")
    p.add_argument("--weight_decay", type=float, default=5e-4)
    p.add_argument("--erasing", type=float, default=0.5, help="random-erasing probability")
    p.add_argument("--label_smoothing", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", action="store_true")
    p.add_argument("--time_budget", type=float, default=None, help="seconds for the command")
    p.add_argument("--smoke", action="store_true", help="tiny network, 2 x 3 steps, CPU")
    args, args.trainer_flags = p.parse_known_args(argv)
    if args.smoke:
        args.width_multiplier, args.batch_size, args.epochs = 0.5, 16, 2
    steps_per_epoch = 3 if args.smoke else TRAIN_IMAGES // args.batch_size
    if args.base_lr is None:
        args.base_lr = 0.1 * args.batch_size / 128  # linear scaling from batch 128
    if args.warmup_steps is None:
        args.warmup_steps = 2 * steps_per_epoch
    return args


def trainer_command(args, loop, budget_s):
    """The trainer's command line (it resumes by itself from `--model_dir`)."""
    cmd = [
        *(sys.executable, "-m", "keras_preact.train.cifar"),
        *("--dataset=fashion_mnist", "--source=files", f"--data_dir={args.data_dir}"),
        *(f"--loop={loop}", "--pipeline=numpy", f"--model_dir={args.model_dir}"),
        *(f"--model={args.model}", f"--width_multiplier={args.width_multiplier:g}"),
        *(f"--epochs={args.epochs}", f"--batch_size={args.batch_size}", f"--seed={args.seed}"),
        *("--lr_schedule=cosine", f"--base_lr={args.base_lr:g}", "--nesterov"),
        *(f"--warmup_steps={args.warmup_steps}", "--warmup=linear"),
        *(f"--weight_decay={args.weight_decay:g}", f"--erasing={args.erasing:g}"),
        *(f"--label_smoothing={args.label_smoothing:g}", "--verbose=2"),
        "--mixed_precision" if args.mixed_precision else "",
        f"--time_budget={budget_s:.0f}" if budget_s else "",
        *(
            ("--steps_per_epoch=3", "--eval_examples=40", "--nocompilation_cache")
            if args.smoke
            else ()
        ),
        *args.trainer_flags,
    ]
    return [c for c in cmd if c]


def read_log(model_dir):
    with open(os.path.join(model_dir, "log.csv"), newline="") as f:
        return [{k: float(v) if v else np.nan for k, v in r.items()} for r in csv.DictReader(f)]


def plot_curves(rows, path, title):
    """Training and test loss, and test error, against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [r["loss"] for r in rows], "-", label="train (augmented)")
    a.plot(epochs, [r["val_loss"] for r in rows], "o-", ms=3, label="test")
    a.set(xlabel="epoch", ylabel="loss (with weight decay)", title="loss")
    a.legend()
    b.plot(epochs, [100 * (1 - r["val_top1"]) for r in rows], "o-", ms=3)
    b.set(xlabel="epoch", ylabel="test error (%)", title="test error")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    plt.close(fig)


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def measure_exports(args, run_cfg):
    """Exports `final.weights.h5` in float32 and float16, and measures each as read back.

    Returns `(results, parameters, test_images)`: `results[dtype]` holds top-1 (%), single
    view and with flip test-time augmentation, bytes and SHA-256 (or the error of a tensor
    float16 cannot hold); the files are `MODEL_DIR/export_{dtype}.h5`.
    """
    import keras

    from keras_preact import convert, weights
    from keras_preact.train import modeling, sources

    _, (x, y) = sources.load_arrays("fashion_mnist", "files", args.data_dir)
    n = run_cfg.get("eval_examples") or len(x)  # the run's test images (all but in smoke runs)
    x, y = x[:n], y[:n]
    # The written-out net in float32, normalizing uint8 pixels itself, as users build it.
    model = modeling.build_base(
        {**run_cfg, "scan_units": False},
        model=run_cfg["model"],
        input_shape=x.shape[1:],
        classes=sources.MEMORY_DATASETS["fashion_mnist"],
        mean=run_cfg["mean"],
        std=run_cfg["std"],
    )
    weights.load_weights_file(model, os.path.join(args.model_dir, "final.weights.h5"))
    tensors = {
        layer.name: {
            w.name: np.asarray(keras.ops.convert_to_numpy(w), np.float32) for w in layer.weights
        }
        for layer in model.layers
        if layer.weights
    }
    results = {}
    for dtype in ("float32", "float16"):
        path = os.path.join(args.model_dir, f"export_{dtype}.h5")
        try:
            convert.write_tensors(path, tensors, dtype=dtype)
        except ValueError as e:  # a tensor outside float16's range
            results[dtype] = {"error": str(e)}
            continue
        weights.assign(model, convert.read_tensors(path), source=path)
        probs = _softmax(model.predict(x, batch_size=500, verbose=0))
        flipped = _softmax(model.predict(x[:, :, ::-1], batch_size=500, verbose=0))
        results[dtype] = {
            "top1": round(100.0 * float(np.mean(probs.argmax(-1) == y)), 2),
            "top1_flip_tta": round(100.0 * float(np.mean((probs + flipped).argmax(-1) == y)), 2),
            "bytes": os.path.getsize(path),
            "sha256": weights.file_digest(path),
        }
    return results, model.count_params(), len(x)


def copy_out(args, names):
    if not args.out:
        return
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        tmp = os.path.join(args.out, f".{name}.tmp-{os.getpid()}")
        shutil.copyfile(os.path.join(args.model_dir, name), tmp)
        os.replace(tmp, os.path.join(args.out, name))


def main(argv=None):
    args = parse_args(argv)
    import keras

    from keras_preact.train import checkpoints, distribution

    if args.smoke:
        distribution.smoke_environment()
    summary_path = os.path.join(args.model_dir, "summary.json")
    title = f"Fashion-MNIST, {args.model} x{args.width_multiplier:g}, {args.epochs} epochs"

    # 1. Train (or resume) with the package's trainer, within the budget less the final reserve.
    if not os.path.exists(summary_path):
        budget = args.time_budget and args.time_budget - FINAL_RESERVE_S - (time.time() - START)
        if budget is not None and budget <= 0:
            raise SystemExit(f"--time_budget={args.time_budget:g} leaves no time to train.")
        loop = "jax" if keras.backend.backend() == "jax" else "fit"
        code = subprocess.run(trainer_command(args, loop, budget)).returncode
        if code:
            raise SystemExit(f"The trainer failed (exit {code}); its output is above.")
    rows = read_log(args.model_dir)
    plot_curves(rows, os.path.join(args.model_dir, "curves.png"), title)
    if not os.path.exists(summary_path):  # stopped by the budget, checkpointed
        copy_out(args, ["log.csv", "curves.png"])
        print(
            f"INCOMPLETE: {len(rows)}/{args.epochs} epochs after {time.time() - START:.0f} s. "
            "Run the same command again to continue.",
            flush=True,
        )
        return 0

    # 2. Export in float32 and float16, each measured as read back; float16 ships if equal.
    with open(os.path.join(args.model_dir, "config.json")) as f:
        run_cfg = json.load(f)
    with open(summary_path) as f:
        trained = json.load(f)
    began = time.time()
    results, parameters, test_images = measure_exports(args, run_cfg)
    same = results["float16"].get("top1") == results["float32"]["top1"]
    chosen = "float16" if same else "float32"
    for dtype in results:
        path = os.path.join(args.model_dir, f"export_{dtype}.h5")
        if dtype == chosen:
            os.replace(path, os.path.join(args.model_dir, EXPORT_NAME))
        elif os.path.exists(path):
            os.remove(path)
    export = {"file": EXPORT_NAME, "dtype": chosen, **results[chosen]}
    if export["bytes"] > MAX_EXPORT_BYTES:
        print(f"WARNING: the export is {export['bytes'] / 2**20:.1f} MiB, over 16 MiB.")

    # 3. The record of the recipe, its curves, and the copies.
    recipe = {
        "model": run_cfg["model"],
        "width_multiplier": run_cfg["width_multiplier"],
        "parameters": parameters,
        "epochs": len(rows),
        "test_images": test_images,
        "last_epoch_top1": round(100.0 * rows[-1]["val_top1"], 2),
        "train_seconds": round(float(np.nansum([r["epoch_time_s"] for r in rows])), 1),
        "trainer_wall_time_s": trained["wall_time_s"],
        "eval_seconds": round(time.time() - began, 1),
        **{k: run_cfg[k] for k in ("batch_size", "base_lr", "warmup_steps", "weight_decay")},
        **{k: run_cfg[k] for k in ("erasing", "label_smoothing", "seed", "loop")},
        "precision_policy": run_cfg["precision_policy"],
        **results,
        "export": export,
        "elapsed_s": round(time.time() - START, 1),
    }
    checkpoints.write_json_atomic(os.path.join(args.model_dir, "recipe.json"), recipe)
    print(json.dumps(recipe, indent=1), flush=True)
    copy_out(args, OUTPUTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
