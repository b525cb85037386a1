r"""Fine-tuning the shipped Fashion-MNIST net on handwritten digits, against training from scratch.

scikit-learn's bundled digits (1,797 real 8x8 scans of handwriting, 16 grey levels) are
resized to 28x28 and written as PNG class folders (`--out`/images): a fixed, stratified
validation set of 30 % of them, and training sets of `--budgets` images per class drawn
from the rest. For each budget and seed the ImageNet trainer runs twice on the same
folder, with the same schedule:

* fine-tuned: `--weights=fashion_mnist` (the record's layers, a new 10-class head, the
  record's input normalization), `--backbone_lr_scale` for the pretrained layers;
* from scratch: the same network, He-initialized, normalized with the digits' statistics.

    python training/finetune_digits.py --out=runs/finetune_digits --budgets=5,20,100 \
        --seeds=0,1

Each run is `python -m keras_preact.train.imagenet --dataset=folder ...` in
`--out/runs/BUDGET/MODE/seedN` (a finished run is not trained again: the command resumes).
The table (`finetune_digits.md`, `finetune_digits.csv`: validation top-1 per run, mean
per budget and mode) is written to `--out`.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
from statistics import mean

import numpy as np

VALIDATION = 0.3
SIZE = 28


def write_folders(out, budgets, seed=0):
    """The digits as PNG class folders: `out/val/D/*.png` once, `out/train_K/D/*.png` per
    budget K (the first K of each class's seeded order, so a larger budget holds a smaller
    one's images)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    rng = np.random.default_rng(seed)
    val, pools = [], {}
    for d in range(10):
        order = rng.permutation(np.flatnonzero(digits.target == d))
        held = int(round(len(order) * VALIDATION))
        val += [(i, d) for i in order[:held]]
        pools[d] = order[held:]

    def save(folder, pairs):
        for i, d in pairs:
            os.makedirs(os.path.join(folder, str(d)), exist_ok=True)
            image = Image.fromarray(images[i]).resize((SIZE, SIZE), Image.BILINEAR)
            image.save(os.path.join(folder, str(d), f"{i:04d}.png"))

    save(os.path.join(out, "images", "val"), val)
    for k in budgets:
        pairs = [(i, d) for d in range(10) for i in pools[d][:k]]
        save(os.path.join(out, "images", f"train_{k}"), pairs)
    return len(val), {d: len(p) for d, p in pools.items()}


def data_folder(out, k):
    """A folder with `train/` and `val/` for budget `k` (links to the written images)."""
    folder = os.path.join(out, "data", f"budget_{k}")
    os.makedirs(folder, exist_ok=True)
    for name, target in (("train", f"train_{k}"), ("val", "val")):
        link = os.path.join(folder, name)
        if not os.path.exists(link):
            os.symlink(os.path.join("..", "..", "images", target), link)
    return folder


def run(args, k, mode, seed):
    model_dir = os.path.join(args.out, "runs", f"budget_{k}", mode, f"seed{seed}")
    summary = os.path.join(model_dir, "summary.json")
    if os.path.exists(summary):
        return json.load(open(summary))
    flags = [
        "--dataset=folder", f"--data_dir={data_folder(args.out, k)}", "--model=PreActResNet20",
        f"--batch_size={args.batch_size}", f"--epochs={args.epochs}",
        f"--steps_per_epoch={args.steps_per_epoch}", "--lr_schedule=cosine",
        f"--warmup_steps={args.warmup_steps}", f"--base_lr={args.base_lr}", f"--seed={seed}",
        "--verbose=2", f"--model_dir={model_dir}",
    ]  # fmt: skip
    if mode == "fine-tuned":
        flags += ["--weights=fashion_mnist", f"--backbone_lr_scale={args.backbone_lr_scale}"]
    command = [sys.executable, "-m", "keras_preact.train.imagenet", *flags]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.load(open(summary))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/finetune_digits")
    p.add_argument("--budgets", default="5,20,100", help="training images per class")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps_per_epoch", type=int, default=50)
    p.add_argument("--warmup_steps", type=int, default=30)
    p.add_argument("--base_lr", type=float, default=0.05)
    p.add_argument("--backbone_lr_scale", type=float, default=0.1)
    p.add_argument("--modes", default="fine-tuned,scratch", help="fine-tuned, scratch or both")
    args = p.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    held, pools = write_folders(args.out, budgets)
    if max(budgets) > min(pools.values()):
        sys.exit(
            f"--budgets: at most {min(pools.values())} images per class are left for training."
        )
    modes = args.modes.split(",")
    if not set(modes) <= {"fine-tuned", "scratch"}:
        sys.exit(f"--modes={args.modes}; allowed: fine-tuned, scratch.")
    rows = []
    for k in budgets:
        for mode in modes:
            for seed in seeds:
                summary = run(args, k, mode, seed)
                rows.append({"budget_per_class": k, "train_images": 10 * k, "mode": mode,
                             "seed": seed, "val_top1": summary["eval_top1"],
                             "val_images": summary["eval_images_scored"],
                             "wall_time_s": summary["wall_time_s"]})  # fmt: skip
    with open(os.path.join(args.out, "finetune_digits.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Validation top-1 (%) on {held} held-out digits; "
        f"{args.epochs * args.steps_per_epoch} steps of batch {args.batch_size}.",
        "",
        "| images per class | "
        + " | ".join(
            f"fine-tuned from `fashion_mnist` (backbone lr x{args.backbone_lr_scale:g})"
            if m == "fine-tuned"
            else "from scratch"
            for m in modes
        )
        + " |",
        "| --- |" + " --- |" * len(modes),
    ]
    for k in budgets:
        cells = []
        for mode in modes:
            values = [
                100 * r["val_top1"]
                for r in rows
                if r["budget_per_class"] == k and r["mode"] == mode
            ]
            per_seed = " / ".join(f"{v:.2f}" for v in values)
            cells.append(f"{mean(values):.2f} ({per_seed})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "finetune_digits.md"), "w") as f:
        f.write(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
