r"""Training throughput on one GPU: keras_preact against keras.applications and timm, in one run.

Measures images/s of a training step (bf16, SGD with momentum, cross-entropy), the time from
process start to the end of the first step, and peak device memory, for every case, each in
its own process (so XLA flags, memory peaks and failures stay separate), then prints one
markdown table with ratios to each peer and model FLOP utilization, and writes JSON.

On a GPU box or cloud VM with JAX for CUDA, Keras and this package installed
(`pip install "jax[cuda12]" keras` and `pip install -e .`; torch and timm for the timm rows):

    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py --out=results/   # about 8 minutes

`--time_budget_s` (540 s by default; 0: no limit) stops starting new cases once spent, and
`gpu_throughput.json` is rewritten after every case, so an interrupted run keeps what it
measured.

Cases are `model:path[:option=value,...]`:

    models  preact50        PreActResNet50, the paper's layout (224 px)
            preact50_keras  PreActResNet50 in keras.applications' layout (224 px)
            resnet50v2      keras.applications.ResNet50V2 (224 px)
            timm_resnetv2_50  timm resnetv2_50 (224 px; needs torch and timm)
            preact164, preact1001   CIFAR family, 32 px, batch 128
            preact110_fmnist, wrn26_4_fmnist   the Fashion-MNIST scripts' networks, 28 px
            matmul          a bf16 8192^3 matrix product: the device's reachable FLOP/s
    paths   jit      the trainer's jitted JAX step (`--loop=jax`,
                     `keras_preact.train.jax_loop.make_train_step`: stateless_call,
                     jax.value_and_grad, optimizer.stateless_apply, donated state) on
                     device-resident data
            fit      model.fit fed by the package's numpy pipeline (random crop and flip on
                     the host, uint8 batches, normalization on the device)
            eager, compile   timm in PyTorch eager, and under torch.compile
    options batch, size, steps (timed per round), rounds, warmup, donate (1/0),
            precision (bf16/fp32), bn (keras: two-pass statistics; onepass: one pass,
            E[x^2] - E[x]^2 around the moving mean), xla (a preset of XLA_FLAGS below),
            input (uint8: the model normalizes; float32: normalized batches), remat
            (none/full/activations, keras.RematScope), seeds (vmapped copies of the network
            in one step), workers (fit: PyDataset threads), spe (fit: steps_per_execution),
            wd (coupled L2 weight decay on the kernels, as the trainers' --weight_decay;
            default 0, as the peers' steps)

    KERAS_BACKEND=jax python benchmarks/gpu_throughput.py --cases=preact50:jit,\
preact50:jit:batch=512,preact50:jit:bn=onepass,preact1001:jit:xla=fast_compile --out=results/

With `input=uint8` (the default) keras_preact nets are built with `include_preprocessing=True`
and ResNet50V2 gets one `Rescaling` layer in front, so every Keras case normalizes on the
device, as the trainers do. Peak bf16 FLOP/s per GPU (dense, from the vendors' data sheets)
is in `PEAK_TFLOPS`; the `matmul` case gives the reachable rate on the machine at hand, and
both utilizations are reported. FLOPs per image are counted analytically
(`keras_preact.train.metrics.multiply_adds`: 6 x the conv and dense multiply-adds, forward
and a backward pass twice as costly); XLA's own count is in the JSON too. `--smoke` runs
tiny networks for a few steps on CPU (CI).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

START = time.time()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Dense bf16 tensor-core peak, TFLOP/s, by a substring of the device name (first match).
PEAK_TFLOPS = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 (the "H100 80GB HBM3")
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
]
#: XLA_FLAGS presets a case may name with `xla=`.
XLA_PRESETS = {
    "default": "",
    "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "no_autotune": "--xla_gpu_autotune_level=0",
    "no_command_buffer": "--xla_gpu_enable_command_buffer=",
    "fast_compile": "--xla_gpu_autotune_level=0 --xla_gpu_enable_command_buffer=",
    "parallel_compile": "--xla_gpu_force_compilation_parallelism=16",
}
#: model -> (input size, batch, channels, classes, peer group).
MODELS = {
    "preact50": (224, 256, 3, 1000, "r50"),
    "preact50_keras": (224, 256, 3, 1000, "r50"),
    "resnet50v2": (224, 256, 3, 1000, "r50"),
    "timm_resnetv2_50": (224, 256, 3, 1000, "r50"),
    "preact164": (32, 128, 3, 10, "cifar"),
    "preact1001": (32, 128, 3, 10, "cifar"),
    "preact110_fmnist": (28, 128, 1, 10, "fmnist"),
    "wrn26_4_fmnist": (28, 256, 1, 10, "fmnist"),
    "matmul": (0, 0, 0, 0, "matmul"),
}
PATHS = {"jit", "fit", "eager", "compile"}
OPTIONS = {
    "batch": int,
    "size": int,
    "steps": int,
    "rounds": int,
    "warmup": int,
    "donate": int,
    "precision": str,
    "bn": str,
    "xla": str,
    "input": str,
    "remat": str,
    "seeds": int,
    "workers": int,
    "spe": int,
    "wd": float,
}
#: The peers' table, most important first: the last case gets what is left of the budget.
DEFAULT_CASES = [
    "matmul",
    "preact50:jit",
    "resnet50v2:jit",
    "preact50_keras:jit",
    "timm_resnetv2_50:eager",
    "timm_resnetv2_50:compile",
    "preact50:fit",
    "resnet50v2:fit",
    "preact50_keras:fit",
    "preact164:jit",
    "preact1001:jit",
]
#: `--preset=explore`: the options that may move PreActResNet50 and ResNet-1001 (docs/gpu.md).
EXPLORE_CASES = [
    "matmul",
    "preact50:jit",
    "preact50:jit:donate=0",
    "preact50:jit:batch=512",
    "preact50:jit:bn=onepass",
    "preact50:jit:xla=lhs",
    "preact50:fit:spe=4,workers=12",
    "preact50:fit:input=float32,workers=12",
    "preact110_fmnist:jit",
    "preact110_fmnist:jit:seeds=3",
    "wrn26_4_fmnist:jit",
    "preact1001:jit:xla=fast_compile",
]
SMOKE_CASES = ["preact50:jit", "preact50_keras:fit:workers=1", "timm_resnetv2_50:eager"]
SMOKE_SIZE, SMOKE_BATCH = 16, 2


def parse_case(text):
    """`"preact50:jit:batch=512,donate=0"` -> (model, path, options); raises ValueError."""
    parts = text.split(":")
    model = parts[0]
    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r} in case {text!r}; allowed: {sorted(MODELS)}.")
    path = parts[1] if len(parts) > 1 else ("jit" if model != "timm_resnetv2_50" else "eager")
    if model == "matmul":
        path = "jit"
    if path not in PATHS:
        raise ValueError(f"Unknown path {path!r} in case {text!r}; allowed: {sorted(PATHS)}.")
    torch_model = model.startswith("timm_")
    if torch_model != (path in ("eager", "compile")):
        raise ValueError(
            f"Case {text!r}: timm runs 'eager' or 'compile'; the Keras models 'jit' or 'fit'."
        )
    options = {}
    for item in filter(None, (parts[2] if len(parts) > 2 else "").split(",")):
        key, _, value = item.partition("=")
        if key not in OPTIONS:
            raise ValueError(
                f"Unknown option {key!r} in case {text!r}; allowed: {sorted(OPTIONS)}."
            )
        options[key] = OPTIONS[key](value)
    if options.get("xla", "default") not in XLA_PRESETS:
        raise ValueError(f"Unknown xla={options['xla']!r}; presets: {sorted(XLA_PRESETS)}.")
    if options.get("bn", "keras") not in ("keras", "onepass"):
        raise ValueError(f"bn={options['bn']!r}; allowed: keras, onepass.")
    return model, path, options


def peak_tflops(device_name):
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in (device_name or "").lower():
            return key, tflops
    return None, None


# -- One case, in its own process -------------------------------------------------------


def _settings(model, options, smoke):
    size, batch, channels, classes, _ = MODELS[model]
    if smoke:
        size, batch = SMOKE_SIZE, SMOKE_BATCH
    return {
        "size": options.get("size", size),
        "batch": options.get("batch", batch),
        "channels": channels,
        "classes": classes,
        "steps": options.get("steps", 2 if smoke else 30),
        "rounds": options.get("rounds", 1 if smoke else 3),
        "warmup": options.get("warmup", 1 if smoke else 5),
        "donate": bool(options.get("donate", 1)),
        "precision": options.get("precision", "bf16"),
        "bn": options.get("bn", "keras"),
        "input": options.get("input", "uint8"),
        "remat": options.get("remat", "none"),
        "seeds": options.get("seeds", 1),
        "workers": options.get("workers", 8),
        "spe": options.get("spe", 1),
        "wd": options.get("wd", 0.0),
    }


def _onepass_moments():
    """Patches Keras' BatchNormalization to compute batch statistics in one pass over x.

    Keras takes mean, then variance around it: two reads of the activation. This reads it
    once (sums of x - c and (x - c)^2, c the moving mean held constant, which keeps
    E[x^2] - E[x]^2 from cancelling), in float32. A benchmark option, not the library's.
    """
    import keras
    from keras import ops

    def _moments(self, inputs, mask):
        if mask is not None:
            return original(self, inputs, mask)
        shift = ops.stop_gradient(ops.cast(self.moving_mean, inputs.dtype))
        shape = [1] * len(inputs.shape)
        shape[self.axis] = inputs.shape[self.axis]
        d = ops.subtract(inputs, ops.reshape(shift, shape))
        m1 = ops.mean(d, axis=self._reduction_axes)
        m2 = ops.mean(ops.square(d), axis=self._reduction_axes)
        return m1 + shift, ops.maximum(m2 - ops.square(m1), 0.0)

    original = keras.layers.BatchNormalization._moments
    keras.layers.BatchNormalization._moments = _moments


def _build_keras(model, s, smoke, preprocessing=None):
    """The network of `model`. With `preprocessing` (a `(mean, std)` pair) it takes [0, 255]
    pixels and normalizes them itself: keras_preact nets through `include_preprocessing`,
    keras.applications' ResNet50V2 through one `Rescaling` layer in front (this benchmark's
    own, the same arithmetic)."""
    import keras

    import keras_preact

    shape = (s["size"], s["size"], s["channels"])
    kw = {"input_shape": shape, "classes": s["classes"], "classifier_activation": None}
    tiny = {"depth": 8, "block": "basic", "family": "cifar", "width_multiplier": 0.5}  # CPU smoke
    if model == "resnet50v2":
        net = keras.applications.ResNet50V2(weights=None, **kw)
        if preprocessing is None:
            return net
        mean, std = preprocessing
        inputs = keras.Input(shape, dtype="uint8")
        scale = [1.0 / (255.0 * v) for v in std]
        offset = [-m / v for m, v in zip(mean, std)]
        x = keras.layers.Rescaling(scale, offset, name="normalize")(inputs)
        return keras.Model(inputs, net(x))
    if preprocessing is not None:
        kw.update(include_preprocessing=True, preprocessing=preprocessing)
    if model in ("preact50", "preact50_keras"):
        layout = {"layout": "keras" if model == "preact50_keras" else "paper"}
        if smoke:
            return keras_preact.PreActResNet(**tiny, **layout, **kw)
        return keras_preact.PreActResNet50(**layout, **kw)
    depth, width = {
        "preact164": (164, 1),
        "preact1001": (1001, 1),
        "preact110_fmnist": (110, 1),
        "wrn26_4_fmnist": (26, 4),
    }[model]
    block = "bottleneck" if depth in (164, 1001) else "basic"
    if smoke:
        depth, width = (11 if block == "bottleneck" else 8), 0.5
    return keras_preact.PreActResNet(
        depth=depth, block=block, family="cifar", width_multiplier=width, **kw
    )


def _device_info_jax():
    import jax

    d = jax.devices()[0]
    return {
        "platform": d.platform,
        "device": getattr(d, "device_kind", str(d)),
        "jax": jax.__version__,
    }


def _peak_memory_jax():
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices report none
        stats = {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2**30, 2)


def run_matmul(s, smoke):
    import jax
    import jax.numpy as jnp

    n = 256 if smoke else 8192
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    reps = 3 if smoke else 20
    t = time.time()
    for _ in range(reps):
        c = f(a, b)
    c.block_until_ready()
    dt = (time.time() - t) / reps
    return {**_device_info_jax(), "matmul_tflops": round(2 * n**3 / dt / 1e12, 1), "n": n}


def run_keras(model, path, s, smoke):
    t0 = time.time()
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    from keras_preact.train import jax_loop, metrics, optimization

    info = {**_device_info_jax(), "keras": keras.__version__}
    if s["bn"] == "onepass":
        _onepass_moments()
    keras.config.set_dtype_policy("mixed_bfloat16" if s["precision"] == "bf16" else "float32")
    remat = None if s["remat"] == "none" else s["remat"]
    mean, std = [0.5] * s["channels"], [0.25] * s["channels"]
    # The trainers' path: uint8 batches that the model normalizes itself.
    preprocessing = (mean, std) if s["input"] == "uint8" else None
    t_build = time.time()
    if remat:
        with keras.RematScope(mode=remat):
            net = _build_keras(model, s, smoke, preprocessing)
    else:
        net = _build_keras(model, s, smoke, preprocessing)
    # The trainers' coupled L2 decay: each kernel's regularizer, which both paths add.
    optimization.add_weight_decay(net, s["wd"])
    macs = metrics.multiply_adds(net)
    info.update(
        params=net.count_params(), build_s=round(time.time() - t_build, 1), flops_per_image=6 * macs
    )
    rng = np.random.default_rng(0)
    shape = (s["batch"], s["size"], s["size"], s["channels"])
    if path == "fit":
        return {**info, **_run_fit(net, s, mean, std, rng, shape, t0)}

    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    step = jax_loop.make_train_step(net, optimizer, seeds=s["seeds"], donate=s["donate"])
    state = jax_loop.init_state(net, optimizer)
    if s["seeds"] > 1:
        # Copies of one initialization: the throughput does not depend on the values.
        copies = [state] + [jax.tree_util.tree_map(jnp.copy, state) for _ in range(s["seeds"] - 1)]
        state = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *copies)
        shape = (s["seeds"], *shape)
    if s["input"] == "uint8":
        x = jax.device_put(rng.integers(0, 256, shape, dtype=np.uint8))
    else:
        x = jax.device_put(rng.standard_normal(shape, dtype=np.float32))
    y = jax.device_put(rng.integers(0, s["classes"], shape[:-3]).astype(np.int32))
    t = time.time()
    traced = step.trace(state, x, y)
    lowered = traced.lower()
    info["trace_lower_s"] = round(time.time() - t, 1)
    t = time.time()
    compiled = lowered.compile()
    info["compile_s"] = round(time.time() - t, 1)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if cost and cost.get("flops"):
        info["xla_flops_per_image"] = float(cost["flops"]) / (s["batch"] * s["seeds"])
    state, sums = compiled(state, x, y)
    jax.block_until_ready(sums["loss"])
    info["first_step_s"] = round(time.time() - t0, 1)
    for _ in range(s["warmup"]):
        state, sums = compiled(state, x, y)
    jax.block_until_ready(sums["loss"])
    rates = []
    for _ in range(s["rounds"]):
        t = time.time()
        for _ in range(s["steps"]):
            state, sums = compiled(state, x, y)
        jax.block_until_ready(sums["loss"])
        rates.append(s["steps"] * s["batch"] * s["seeds"] / (time.time() - t))
    loss = np.asarray(sums["loss"], np.float64)
    if not np.all(np.isfinite(loss)):
        raise FloatingPointError(f"non-finite training loss {loss}")
    return {
        **info,
        "images_per_s": sorted(rates)[len(rates) // 2],
        "rounds_images_per_s": rates,
        "peak_memory_gib": _peak_memory_jax(),
    }


def _run_fit(model, s, mean, std, rng, shape, t0):
    """model.fit fed by the numpy pipeline: uint8 batches the model normalizes itself, or
    (`input=float32`) batches the host normalizes, as the trainers did before."""
    import jax
    import keras
    import numpy as np

    from keras_preact.data import numpy_pipeline

    host_float = s["input"] == "float32"  # the old path: the host normalizes to float32
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
        steps_per_execution=s["spe"],
    )
    pool = rng.integers(0, 256, (4 * shape[0], *shape[1:]), dtype=np.uint8)
    labels = rng.integers(0, s["classes"], len(pool))
    batch = shape[0]

    class Batches(keras.utils.PyDataset):
        """Random batches of the pool: the pipeline's pad-crop-flip, uint8 (or normalized)."""

        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            r = np.random.default_rng([7, i])
            idx = r.integers(0, len(pool), batch)
            x = numpy_pipeline.pad_crop_flip(pool[idx], r)
            if host_float:
                x = numpy_pipeline.normalize(x, mean, std)
            return x, labels[idx]

    data = Batches(workers=s["workers"], use_multiprocessing=False)
    t = time.time()
    n_host = 3
    for i in range(n_host):
        data[i]
    host_rate = n_host * batch / (time.time() - t)  # one thread's augmentation rate

    spe = s["spe"]
    timed_batches = s["steps"] * s["rounds"]
    warm = max(s["warmup"], spe)
    total = -(-(warm + timed_batches) // spe) * spe
    marks = {}

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, b, logs=None):
            if "first" not in marks:
                jax.block_until_ready(logs["loss"]) if logs else None
                marks["first"] = time.time()
            if b + 1 >= warm and "start" not in marks:
                jax.block_until_ready(logs["loss"]) if logs else None
                marks["start"], marks["start_batch"] = time.time(), b + 1

        def on_epoch_end(self, epoch, logs=None):
            marks["end"] = time.time()

    history = model.fit(data, epochs=1, steps_per_epoch=total, verbose=0, callbacks=[Clock()])
    loss = history.history["loss"][-1]
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss}")
    images = (total - marks["start_batch"]) * batch
    rate = images / max(marks["end"] - marks["start"], 1e-9)
    return {
        "images_per_s": rate,
        "first_step_s": round(marks["first"] - t0, 1),
        "host_pipeline_images_per_s_per_thread": round(host_rate, 1),
        "peak_memory_gib": _peak_memory_jax(),
    }


def run_timm(path, s, smoke):
    t0 = time.time()
    import timm
    import torch
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    kwargs = {"num_classes": s["classes"]}
    if smoke:
        kwargs.update(layers=[1, 1, 1, 1], channels=(32, 64, 128, 256))
        net = timm.models.resnetv2.ResNetV2(**kwargs)
    else:
        net = timm.create_model("resnetv2_50", **kwargs)
    net = net.to(dev).to(memory_format=torch.channels_last)
    macs = _torch_macs(net, s, dev)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=s["wd"])
    model = torch.compile(net) if path == "compile" else net
    x = torch.randn(s["batch"], s["channels"], s["size"], s["size"], device=dev)
    x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, s["classes"], (s["batch"],), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s["precision"] == "bf16")

    def step():
        with amp:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loss = step()
    sync()
    info = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "params": sum(p.numel() for p in net.parameters()),
        "flops_per_image": 6 * macs,
        "first_step_s": round(time.time() - t0, 1),
    }
    for _ in range(s["warmup"]):
        step()
    sync()
    rates = []
    for _ in range(s["rounds"]):
        t = time.time()
        for _ in range(s["steps"]):
            loss = step()
        sync()
        rates.append(s["steps"] * s["batch"] / (time.time() - t))
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f"non-finite training loss {float(loss)}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {
        **info,
        "images_per_s": sorted(rates)[len(rates) // 2],
        "rounds_images_per_s": rates,
        "peak_memory_gib": None if peak is None else round(peak, 2),
    }


def _torch_macs(net, s, dev):
    import torch

    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total[0] += output.numel() // output.shape[0] * k * module.in_channels // module.groups
        elif isinstance(module, torch.nn.Linear):
            total[0] += module.in_features * module.out_features

    handles = [
        m.register_forward_hook(hook)
        for m in net.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        net.eval()
        net(torch.zeros(1, s["channels"], s["size"], s["size"], device=dev))
        net.train()
    for h in handles:
        h.remove()
    return total[0]


def child(case, result_file, smoke):
    """Runs one case and writes its result (or its error) as JSON."""
    model, path, options = parse_case(case)
    s = _settings(model, options, smoke)
    out = {
        "case": case,
        "model": model,
        "path": path,
        "options": options,
        "batch": s["batch"],
        "size": s["size"],
    }
    try:
        if model == "matmul":
            out.update(run_matmul(s, smoke))
        elif path in ("eager", "compile"):
            out.update(run_timm(path, s, smoke))
        else:
            out.update(run_keras(model, path, s, smoke))
        out["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded; the other cases go on
        out.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
    with open(result_file, "w") as f:
        json.dump(out, f)


# -- The driver -------------------------------------------------------------------------


def run_case(index, case, args, scratch):
    model, path, options = parse_case(case)
    result_file = os.path.join(scratch, f"case{index:02d}.json")
    if os.path.exists(result_file):
        os.remove(result_file)
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1")
    flags = " ".join(
        filter(
            None,
            [env.get("XLA_FLAGS", ""), args.xla_flags, XLA_PRESETS[options.get("xla", "default")]],
        )
    )
    if args.smoke:
        flags = (flags + " --xla_backend_optimization_level=0").strip()
        env["JAX_PLATFORMS"] = "cpu"
    if flags:
        env["XLA_FLAGS"] = flags
    if path in ("eager", "compile"):
        env["JAX_PLATFORMS"] = "cpu"  # the timm case leaves the GPU's memory to torch
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        f"--_child={case}",
        f"--_result={result_file}",
    ]
    if args.smoke:
        cmd.append("--smoke")
    timeout = args.case_timeout_s
    if args.time_budget_s:
        timeout = min(timeout, START + args.time_budget_s - time.time())
    t = time.time()
    try:
        proc = subprocess.run(cmd, env=env, timeout=max(timeout, 1), capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr)[-1500:]
        code = proc.returncode
    except subprocess.TimeoutExpired as e:
        out = {
            "case": case,
            "model": model,
            "path": path,
            "options": options,
            "status": "timeout",
            "error": f"no result within {timeout:.0f} s (process killed)",
            "wall_s": round(time.time() - t, 1),
        }
        tail = ((e.stdout or b"") + (e.stderr or b""))[-800:]
        out["log_tail"] = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return out
    if os.path.exists(result_file):
        with open(result_file) as f:
            out = json.load(f)
    else:
        out = {
            "case": case,
            "model": model,
            "path": path,
            "options": options,
            "status": "error",
            "error": f"exit code {code} without a result",
        }
    out["wall_s"] = round(time.time() - t, 1)
    if out["status"] != "ok":
        out["log_tail"] = tail
    return out


def _skip_reason(case, args):
    model, _, _ = parse_case(case)
    if model.startswith("timm_"):
        import importlib.util

        missing = [m for m in ("torch", "timm") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{' and '.join(missing)} not importable"
    return None


def _fmt(v, digits=0):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:,.{digits}f}"


#: The peers every ResNet-50-class row is compared with, when they ran.
R50_PEERS = ["timm_resnetv2_50:eager", "timm_resnetv2_50:compile", "resnet50v2:jit"]


def table(results, peak_name, peak, reachable):
    """The markdown table: one row per case, ratios to each peer, and to the same model's
    plain jitted step (`x own jit`: the trainers' path against the jitted step)."""
    ok = {r["case"]: r for r in results if r.get("status") == "ok" and "images_per_s" in r}
    group_peers = [p for p in R50_PEERS if p in ok]
    head = ["case", "images/s", "first step (s)", "peak mem (GiB)"]
    head += [f"x {p}" for p in group_peers] + ["x own jit"]
    head += [
        f"MFU vs {peak_name or '?'} {_fmt(peak)} TF/s",
        f"MFU vs matmul {_fmt(reachable)} TF/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        if r.get("model") == "matmul":
            continue
        if r.get("status") != "ok":
            cells = [r["case"], r.get("status", "?") + ": " + r.get("error", "")[:80]]
            lines.append("| " + " | ".join(cells + [""] * (len(head) - 2)) + " |")
            continue
        rate, flops = r["images_per_s"], r.get("flops_per_image")
        cells = [
            r["case"],
            _fmt(rate),
            _fmt(r.get("first_step_s"), 1),
            _fmt(r.get("peak_memory_gib"), 1),
        ]
        same_group = MODELS[r["model"]][4] == "r50"
        for p in group_peers:
            cells.append(f"{rate / ok[p]['images_per_s']:.2f}" if same_group else "")
        own = ok.get(f"{r['model']}:jit")
        cells.append(f"{rate / own['images_per_s']:.2f}" if own and own is not r else "")
        for ceiling in (peak, reachable):
            mfu = rate * flops / (ceiling * 1e12) if (flops and ceiling) else None
            cells.append("-" if mfu is None else f"{100 * mfu:.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default=None, help="comma list of cases (see above)")
    p.add_argument(
        "--preset", choices=["peers", "explore"], default="peers", help="the cases run by default"
    )
    p.add_argument("--extra", default="", help="cases added to the default list; ';'-separated")
    p.add_argument("--out", default=None, help="folder for gpu_throughput.json / .md")
    p.add_argument("--xla_flags", default="", help="XLA_FLAGS added to every case")
    p.add_argument("--case_timeout_s", type=float, default=240.0)
    p.add_argument(
        "--time_budget_s",
        type=float,
        default=540.0,
        help="skip the cases that would start after this; 0: no limit",
    )
    p.add_argument("--smoke", action="store_true", help="tiny networks on CPU (CI)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        child(args._child, args._result, args.smoke)
        return

    # 1. Cases: the preset, or the list given; `;` separates cases whose options hold commas.
    if args.cases:
        cases = _split_cases(args.cases)
    elif args.smoke:
        cases = list(SMOKE_CASES)
    else:
        cases = list(EXPLORE_CASES if args.preset == "explore" else DEFAULT_CASES)
    cases += _split_cases(args.extra)
    try:
        for c in cases:
            parse_case(c)
    except ValueError as e:
        p.error(str(e))
    out_dir = args.out or os.path.join(REPO, "runs", "gpu_throughput")
    os.makedirs(out_dir, exist_ok=True)
    # Each case writes its result to a scratch folder; --out receives only the report.
    scratch = tempfile.mkdtemp(prefix="gpu_throughput_")

    # 2. Each case in its own process; the JSON is rewritten after every case.
    results = []
    json_path = os.path.join(out_dir, "gpu_throughput.json")
    for index, case in enumerate(cases):
        reason = _skip_reason(case, args)
        left = START + args.time_budget_s - time.time() if args.time_budget_s else math.inf
        if reason is None and left < 30:
            reason = f"time budget spent ({args.time_budget_s:.0f} s)"
        if reason:
            results.append(
                {"case": case, "model": parse_case(case)[0], "status": "skipped", "error": reason}
            )
        else:
            results.append(run_case(index, case, args, scratch))
        r = results[-1]
        if r.get("images_per_s"):
            detail = f", {r['images_per_s']:,.0f} img/s, first step {r.get('first_step_s')} s"
        elif "matmul_tflops" in r:
            detail = f", {r['matmul_tflops']} TFLOP/s on {r.get('device')}"
        else:
            detail = f" ({r.get('error', '')[:300]})"
        print(f"{case}: {r['status']}{detail}", flush=True)
        _write(json_path, args, cases, results)

    # 3. Report.
    device = next(
        (r.get("device") for r in results if r.get("status") == "ok" and r.get("device")), None
    )
    peak_name, peak = peak_tflops(device)
    reachable = next(
        (
            r["matmul_tflops"]
            for r in results
            if r.get("model") == "matmul" and r.get("status") == "ok"
        ),
        None,
    )
    md = table(results, peak_name, peak, reachable)
    summary = {
        "device": device,
        "peak_bf16_tflops": peak,
        "peak_source": peak_name,
        "matmul_tflops": reachable,
    }
    _write(json_path, args, cases, results, summary)
    header = (
        f"Device: {device}; peak bf16 {peak} TF/s ({peak_name or 'unknown GPU: pass none'}); "
        f"measured bf16 matmul {reachable} TF/s.\n\n"
    )
    with open(os.path.join(out_dir, "gpu_throughput.md"), "w") as f:
        f.write(header + md + "\n")
    print("\n" + header + md, flush=True)
    shutil.rmtree(scratch, ignore_errors=True)


def _split_cases(text):
    if not text:
        return []
    sep = ";" if ";" in text else ","
    if sep == ",":  # commas also separate options: a new case starts at a known model name
        cases, current = [], []
        for item in text.split(","):
            if item.split(":")[0] in MODELS and current:
                cases.append(",".join(current))
                current = []
            current.append(item)
        cases.append(",".join(current))
        return [c for c in cases if c]
    return [c.strip() for c in text.split(sep) if c.strip()]


def _write(path, args, cases, results, summary=None):
    doc = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "smoke": args.smoke,
        "cases": cases,
        "results": results,
        **(summary or {}),
        "elapsed_s": round(time.time() - START, 1),
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
