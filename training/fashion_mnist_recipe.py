r"""A wide pre-activation ResNet for Fashion-MNIST, trained and exported for the package.

The network is the paper's CIFAR ResNet-20 widened four times (`PreActResNet20`,
`--width_multiplier=4`: 64/128/256 channels, 4.30 M parameters, 8.2 MiB in float16). The
recipe is Zagoruyko and Komodakis' for wide ResNets with Zhong et al.'s random erasing: 150
epochs of SGD with Nesterov momentum 0.9, batch 256, lr 0.2 (0.1 x batch / 128), 2 epochs
of linear warm-up then cosine decay, weight decay 5e-4 on conv and dense kernels; 4-pixel
padding, random crop, horizontal flip, random erasing (p = 0.5). It is one run of the
package's trainer, `python -m keras_preact.train.cifar` (`--loop=jax` under JAX, `--loop=fit`
otherwise; numpy input pipeline, no TensorFlow needed), in `--model_dir`.

On a GPU box, a cloud VM or in a cluster job:

    pip install -e . "jax[cuda12]" absl-py h5py matplotlib
    sudo apt-get install dataset-fashion-mnist   # or the four IDX files in any folder
    python training/fashion_mnist_recipe.py --data_dir=/usr/share/datasets/fashion-mnist \
        --model_dir=runs/fmnist_wrn --out=results

`--batch_size` scales the defaults of `--base_lr` and `--warmup_steps` as above; any other
flag goes to the trainer and overrides the recipe (`--model`, `--width_multiplier`,
`--epochs`, `--weight_decay`, `--erasing`, `--label_smoothing`, `--mixed_precision`, ...).
`--time_budget=SECONDS` bounds the command: the trainer stops at a step with a checkpoint (a
minute is kept for the export) and the command exits 0; run it again to resume, also after a
crash or a preemption. A budget that leaves no time to train is refused.

Once the run has finished, its final weights are exported in this package's by-layer-name
format, in float32 and in float16, and each file is read back (`keras_preact.convert`) into
a float32 model and measured on all 10,000 test images, single view and with flip test-time
augmentation; float16 ships if its top-1 equals float32's. Written to `--model_dir` and
copied to `--out`: `fashion_mnist_wrn.h5`, `recipe.json` (accuracies, epochs, timings, size
and SHA-256 of both files), `log.csv` (one row per epoch) and `curves.png`. `--smoke` trains
a tiny network (width 0.5) for two epochs of three steps on the CPU (CI).
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
RECIPE = (  # the trainer's flags; flags given to this script come after them and win
    "--model=PreActResNet20 --width_multiplier=4 --epochs=150 --lr_schedule=cosine --nesterov "
    "--warmup=linear --weight_decay=5e-4 --erasing=0.5 --verbose=2"
).split()
SMOKE = "--width_multiplier=0.5 --epochs=2 --steps_per_epoch=3 --eval_examples=40".split()
SMOKE += ["--nocompilation_cache"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--model_dir", default="runs/fmnist_wrn")
    p.add_argument("--out", default=None, help="also copy the outputs here")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--base_lr", type=float, default=None, help="default: 0.1 x batch / 128")
    p.add_argument("--warmup_steps", type=int, default=None, help="default: 2 epochs")
    p.add_argument("--time_budget", type=float, default=None, help="seconds for the command")
    p.add_argument("--smoke", action="store_true", help="tiny network, 2 x 3 steps, CPU")
    args, args.trainer_flags = p.parse_known_args(argv)
    if args.smoke:
        args.batch_size = 16
        args.trainer_flags = [*SMOKE, *args.trainer_flags]
    args.base_lr = args.base_lr or 0.1 * args.batch_size / 128  # linear scaling from 128
    if args.warmup_steps is None:  # 2 epochs
        args.warmup_steps = 2 * (3 if args.smoke else 60_000 // args.batch_size)
    return args


def trainer_command(args, loop, budget_s):
    """The trainer's command line (it resumes by itself from `--model_dir`)."""
    return [
        *(sys.executable, "-m", "keras_preact.train.cifar", *RECIPE),
        *("--dataset=fashion_mnist", "--source=files", f"--data_dir={args.data_dir}"),
        *(f"--loop={loop}", "--pipeline=numpy", f"--model_dir={args.model_dir}"),
        *(f"--batch_size={args.batch_size}", f"--base_lr={args.base_lr:g}"),
        f"--warmup_steps={args.warmup_steps}",
        *([f"--time_budget={budget_s:.0f}"] if budget_s else []),
        *args.trainer_flags,
    ]


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
    net = dict(model=run_cfg["model"], input_shape=x.shape[1:], classes=10)
    stats = dict(mean=run_cfg["mean"], std=run_cfg["std"])
    model = modeling.build_base({**run_cfg, "scan_units": False}, **net, **stats)
    weights.load_weights_file(model, os.path.join(args.model_dir, "final.weights.h5"))
    tensors = {
        layer.name: {w.name: np.asarray(w, np.float32) for w in layer.weights}
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
        probs, flipped = (
            np.asarray(keras.ops.softmax(model.predict(v, batch_size=500, verbose=0)))
            for v in (x, x[:, :, ::-1])
        )
        results[dtype] = {
            "top1": round(100.0 * float(np.mean(probs.argmax(-1) == y)), 2),
            "top1_flip_tta": round(100.0 * float(np.mean((probs + flipped).argmax(-1) == y)), 2),
            "bytes": os.path.getsize(path),
            "sha256": weights.file_digest(path),
        }
    return results, model.count_params(), len(x)


def _total(seconds):
    """The sum of the epochs' times, or None where a `log.csv` lacks them."""
    return None if np.isnan(seconds).any() else round(float(np.sum(seconds)), 1)


def copy_out(args, names):
    from keras_preact.train.fs import write_atomic

    for name in names if args.out else ():
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.model_dir, name), "rb") as src:
            write_atomic(os.path.join(args.out, name), lambda f: shutil.copyfileobj(src, f), "wb")


def main(argv=None):
    args = parse_args(argv)
    import keras

    from keras_preact.train import distribution, fs

    if args.smoke:
        distribution.smoke_environment()
    path = lambda name: os.path.join(args.model_dir, name)  # noqa: E731

    # 1. Train (or resume) with the package's trainer, within the budget less the reserve.
    if not os.path.exists(path("summary.json")):
        budget = args.time_budget and args.time_budget - FINAL_RESERVE_S - (time.time() - START)
        if budget is not None and budget < 1:  # the trainer refuses a budget <= 0
            raise SystemExit(
                f"--time_budget={args.time_budget:g} leaves no time to train after the "
                f"{FINAL_RESERVE_S:.0f} s kept for the final evaluation and the export; "
                f"pass more than {FINAL_RESERVE_S + time.time() - START + 1:.0f} s."
            )
        loop = "jax" if keras.backend.backend() == "jax" else "fit"
        code = subprocess.run(trainer_command(args, loop, budget)).returncode
        if code:
            raise SystemExit(f"The trainer failed (exit {code}); its output is above.")
    with open(path("config.json")) as f:
        run_cfg = json.load(f)
    title = "Fashion-MNIST, {model} x{width_multiplier:g}, {epochs} epochs".format(**run_cfg)
    plot = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot_history.py")
    subprocess.run(
        [sys.executable, plot, f"--model_dir={args.model_dir}", f"--title={title}"], check=True
    )
    with open(path("log.csv")) as f:
        rows = [{k: float(v) if v else np.nan for k, v in r.items()} for r in csv.DictReader(f)]
    if not os.path.exists(path("summary.json")):  # stopped by the budget, checkpointed
        copy_out(args, ["log.csv", "curves.png"])
        done = f"{len(rows)}/{run_cfg['epochs']} epochs after {time.time() - START:.0f} s"
        print(f"INCOMPLETE: {done}. Run the same command again to continue.", flush=True)
        return 0

    # 2. Export in float32 and float16, each measured as read back; float16 ships if equal.
    with open(path("summary.json")) as f:
        trained = json.load(f)
    began = time.time()
    results, parameters, test_images = measure_exports(args, run_cfg)
    same = results["float16"].get("top1") == results["float32"]["top1"]
    chosen = "float16" if same else "float32"
    for dtype in results:
        if dtype == chosen:
            os.replace(path(f"export_{dtype}.h5"), path(EXPORT_NAME))
        elif os.path.exists(path(f"export_{dtype}.h5")):
            os.remove(path(f"export_{dtype}.h5"))
    export = {"file": EXPORT_NAME, "dtype": chosen, **results[chosen]}
    if export["bytes"] > MAX_EXPORT_BYTES:
        print(f"WARNING: the export is {export['bytes'] / 2**20:.1f} MiB, over 16 MiB.")

    # 3. The record of the recipe, and the copies.
    keys = "model width_multiplier batch_size base_lr warmup_steps weight_decay erasing "
    keys += "label_smoothing seed loop precision_policy"
    recipe = {
        **{k: run_cfg[k] for k in keys.split()},
        "parameters": parameters,
        "epochs": len(rows),
        "test_images": test_images,
        "last_epoch_top1": round(100.0 * rows[-1]["val_top1"], 2),
        "train_seconds": _total([r.get("epoch_time_s", np.nan) for r in rows]),
        "trainer_wall_time_s": trained["wall_time_s"],
        "eval_seconds": round(time.time() - began, 1),
        **results,
        "export": export,
        "elapsed_s": round(time.time() - START, 1),
    }
    fs.write_json_atomic(path("recipe.json"), recipe)
    print(json.dumps(recipe, indent=1), flush=True)
    copy_out(args, OUTPUTS)
    return 0


if __name__ == "__main__":
    from keras_preact.train.fs import WriteError

    try:
        sys.exit(main())
    except WriteError as e:  # a full disk: one line, not a traceback
        sys.exit(f"WriteError: {e}")
