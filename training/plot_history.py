r"""Plots a run's training curves from `model_dir/log.csv` into a PNG.

    python training/plot_history.py --model_dir=runs/fmnist_r20 \
        --output=docs/images/fashion_mnist_preactresnet20.png
"""

import csv
import os
import sys

from absl import app, flags

from keras_preact.train.fs import WriteError, write_atomic

flags.DEFINE_string("model_dir", None, "Run folder holding log.csv.", required=True)
flags.DEFINE_string("output", None, "PNG path (default: model_dir/curves.png).")
flags.DEFINE_string("title", None, "Figure title.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(FLAGS.model_dir, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "train"), ("val_loss", "test")):
        if key in rows[0]:
            ax_loss.plot(epochs, [float(r[key]) for r in rows], "o-", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for key, label in (("top1", "train (augmented)"), ("val_top1", "test")):
        if key in rows[0]:
            ax_acc.plot(epochs, [100 * float(r[key]) for r in rows], "o-", label=label)
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if FLAGS.title:
        fig.suptitle(FLAGS.title)
    fig.tight_layout()
    output = FLAGS.output or os.path.join(FLAGS.model_dir, "curves.png")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    try:  # a full disk leaves the previous picture, not half a PNG
        write_atomic(output, lambda f: fig.savefig(f, format="png", dpi=100), "wb")
    except WriteError as e:
        sys.exit(f"WriteError: {e}")
    print(output)


if __name__ == "__main__":
    app.run(main)
