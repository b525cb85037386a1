"""Per-unit gradient norms ||dL/dx_l|| at initialization for the shortcuts of the paper's Table 1.

The paper's Eqn. 5 (identity: the gradient of the deepest unit reaches every unit directly)
against Eqn. 8 (x_{l+1} = lambda x_l + F: the direct term is scaled by prod(lambda)), measured
on a CIFAR ResNet-110 at initialization, for the original unit (Fig. 4a, Table 1's setting)
and the full pre-activation unit (Fig. 4e). One fixed batch, one seed per row, BatchNorm in
train mode (batch statistics, as in SGD) unless `--inference`.

    KERAS_BACKEND=jax python benchmarks/propagation.py --depth 110 --block basic --size 32 \
        --batch 8

Columns: ||g_1|| = ||dL/dx_1|| after the first unit, ||g_L|| after the last; ratio = g_1 / g_L;
"per unit" is the geometric-mean factor g_l / g_{l+1} inside the first stage (same tensor
shape, no projection): 1 means the gradient passes unchanged, as Eqn. 5 says for F = 0.
"""

import argparse
import sys
import time

import keras
import numpy as np

import keras_preact
from keras_preact import diagnostics, shortcuts

#: (label, factory, the paper's Table 1 test error on CIFAR-10 for ResNet-110, original unit).
SHORTCUTS = [
    ("identity", shortcuts.identity, "6.61"),
    ("constant 0.5, F x0.5", lambda: shortcuts.constant_scaling(0.5, 0.5), "12.35"),
    ("constant 0.5, F x1", lambda: shortcuts.constant_scaling(0.5, 1.0), "fail"),
    ("exclusive gating b=-6", lambda: shortcuts.exclusive_gating(-6.0), "8.70"),
    ("exclusive gating b=0", lambda: shortcuts.exclusive_gating(0.0), "fail"),
    ("shortcut-only gating b=-6", lambda: shortcuts.shortcut_only_gating(-6.0), "6.91"),
    ("shortcut-only gating b=0", lambda: shortcuts.shortcut_only_gating(0.0), "12.86"),
    ("1x1 conv", shortcuts.conv1x1, "12.22"),
    ("dropout 0.5", lambda: shortcuts.dropout(0.5), "fail"),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--depth", type=int, default=110)
    p.add_argument("--block", default="basic")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--units", default="original,full_preact")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inference", action="store_true", help="BN moving statistics")
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 10, size=(args.batch,))
    mode = "inference" if args.inference else "train"
    print(f"backend={keras.backend.backend()} keras={keras.__version__} depth={args.depth} "
          f"block={args.block} size={args.size} batch={args.batch} BN={mode} seed={args.seed}\n")  # fmt: skip
    print("| unit | shortcut | Table 1 error % | ‖g_1‖ | ‖g_L‖ | g_1 / g_L | per unit (stage 1) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for unit in args.units.split(","):
        for label, factory, paper in SHORTCUTS:
            keras.utils.set_random_seed(args.seed)
            t = time.perf_counter()
            model = keras_preact.PreActResNet(
                depth=args.depth,
                block=args.block,
                input_shape=(args.size, args.size, 3),
                unit=diagnostics.probed_unit(unit, args.batch),
                shortcut=factory(),
                classifier_activation=None,
                seed=args.seed,
            )
            norms = diagnostics.unit_gradient_norms(model, x, y, training=not args.inference)
            g = np.array([v for _, v in norms])
            stage1 = np.array([v for n, v in norms if n.startswith("conv2_")])
            per_unit = (stage1[0] / stage1[-1]) ** (1 / (len(stage1) - 1))
            print(f"| {unit} | {label} | {paper if unit == 'original' else ''} | {g[0]:.3g} | "
                  f"{g[-1]:.3g} | {g[0] / g[-1]:.3g} | {per_unit:.3f} |", flush=True)  # fmt: skip
            print(f"  ({time.perf_counter() - t:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
