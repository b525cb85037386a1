"""Strategy, chief election and precision: what a run decides before any variable exists.

`setup(cfg)` seeds, creates the distribution strategy of `--strategy` for the backend,
sets the precision policy and resolves `--loop=auto`; it returns a `Run`.
"""

import contextlib
import logging
import os
import sys
from typing import NamedTuple

import keras

log = logging.getLogger(__name__)


class Run(NamedTuple):
    """What `setup` decides before any variable exists."""

    strategy: object  # a tf.distribute.Strategy, or None outside TensorFlow
    policy: str  # the Keras precision policy
    replicas: int  # devices the global batch is split over
    chief: bool  # this process writes the run's files
    loop: str  # "fit", "custom" or "jax" (`--loop=auto` resolved)
    jit_compile: bool  # XLA-compile the train step (an unset `--jit_compile` resolved)
    write_dir: str | None  # `model_dir` on the chief; a scratch folder on other TF workers,
    # None (nothing written) on other JAX processes
    processes: int = 1  # the processes (workers, hosts) of the run
    index: int = 0  # this process's index among them (the chief is 0)


def resolve_loop(loop, strategy, backend=None):
    """`--loop=auto`: under JAX the jitted JAX loop; under PyTorch launched as several
    processes (`torchrun`) the DistributedDataParallel loop; under TensorFlow `custom` with
    multi_worker_mirrored (Keras' fit fails there); else `fit`."""
    if loop != "auto":
        return loop
    backend = backend or keras.backend.backend()
    if backend == "jax":
        return "jax"
    if backend == "torch":
        return "torch" if torch_launched() else "fit"
    return "custom" if strategy == "multi_worker_mirrored" else "fit"


#: What `torchrun` (or another launcher of `torch.distributed`) sets for each process.
TORCH_LAUNCH_ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torch_launched():
    """Whether `torchrun` (or another launcher of `torch.distributed`) started this process."""
    return all(name in os.environ for name in TORCH_LAUNCH_ENVIRONMENT)


def setup(cfg):
    """Seeds, determinism, strategy and precision from `cfg`; returns a `Run`.

    Raises:
        app.UsageError: the global batch does not divide over the replicas (before
            anything is written).
    """
    quiet_device_start()  # before the seed: seeding can create TensorFlow's devices
    # Before anything touches a device: the processes of a run join first.
    loop = resolve_loop(cfg.loop, cfg.strategy)
    processes, index = start_processes(cfg, loop)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.compilation_cache and keras.backend.backend() == "jax":
        # JAX's own JAX_COMPILATION_CACHE_DIR wins: runs of one experiment can share one.
        # JAX's cache takes a local folder or gs://; elsewhere, only JAX's own variable.
        cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
        if cache or cfg.model_dir.startswith("gs://") or "://" not in cfg.model_dir:
            enable_compilation_cache(cache or f"{cfg.model_dir.rstrip('/')}/jax_cache")
    if cfg.deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    # Strategy and precision come first: variables are created under them.
    strategy = make_strategy(cfg.strategy, cfg.tpu, loop)
    replicas = processes if loop == "torch" else num_replicas(strategy, loop)
    if loop == "jax" and cfg.strategy == "one_device":
        replicas = 1  # the JAX loop's mesh is the first device (`trainer.make_runner`)
    evaluation = getattr(cfg, "eval_batch_size", None)
    for name, batch in (("batch_size", cfg.batch_size), ("eval_batch_size", evaluation)):
        if batch and batch % replicas:
            from absl import app

            raise app.UsageError(
                f"--{name}={batch} does not divide over the {replicas} replicas of "
                f"--strategy={cfg.strategy}: pass a multiple of {replicas}."
            )
    policy = set_precision(cfg.mixed_precision, cfg.strategy, loop)
    if strategy is not None:
        processes, index = num_workers(strategy), worker_index(strategy)
    chief = is_chief(strategy) and index == 0
    return Run(
        strategy=strategy,
        policy=policy,
        replicas=replicas,
        chief=chief,
        loop=loop,
        jit_compile=resolve_jit_compile(cfg.jit_compile),
        write_dir=write_dir(strategy, cfg.model_dir) if chief or strategy else None,
        processes=processes,
        index=index,
    )


#: What `keras.distribution.initialize` reads when no flag names the processes.
PROCESS_ENVIRONMENT = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)


def start_processes(cfg, loop):
    """Joins this process to the others of a multi-process run; returns
    `(processes, index)`, `(1, 0)` for a run of one process.

    PyTorch (`--loop=torch`): the process group of a `torchrun` launch
    (`torch_loop.start_processes`). JAX: a run is multi-process under
    `--strategy=multi_worker_mirrored`, or when
    `--coordinator_address` or the environment of `keras.distribution.initialize`
    (`PROCESS_ENVIRONMENT`) names its processes. Flags win over the environment; with
    neither, `jax.distributed.initialize` detects the cluster itself (a Cloud TPU VM slice,
    SLURM, Open MPI). Collectives between CPU devices of different processes go over gloo,
    so the same run works as several processes of one machine.
    """
    if loop == "torch":
        if not torch_launched():
            from absl import app

            raise app.UsageError(
                "--loop=torch trains the processes of a torchrun launch: start it with "
                "`torchrun --nproc_per_node=N -m keras_preact.train.cifar ...`."
            )
        from keras_preact.train import torch_loop

        return torch_loop.start_processes()
    named = cfg.coordinator_address or any(v in os.environ for v in PROCESS_ENVIRONMENT)
    if keras.backend.backend() != "jax" or (cfg.strategy != "multi_worker_mirrored" and not named):
        return 1, 0
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not jax.distributed.is_initialized():
        try:
            keras.distribution.initialize(
                cfg.coordinator_address or None, cfg.num_processes, cfg.process_id
            )
        except (ValueError, RuntimeError) as e:
            if named:
                raise
            from absl import app

            raise app.UsageError(
                f"--strategy=multi_worker_mirrored under JAX found no cluster to join "
                f"({type(e).__name__}: {e}). Name the processes: --coordinator_address=HOST:PORT "
                f"--num_processes=N --process_id=I (or {', '.join(PROCESS_ENVIRONMENT)})."
            ) from None
    log.info("JAX process %d of %d.", jax.process_index(), jax.process_count())
    return jax.process_count(), jax.process_index()


def resolve_jit_compile(jit_compile, backend=None):
    """`--jit_compile`, or where it is unset (None) the backend's default: on under JAX.

    Keras' own default (`jit_compile="auto"`) compiles JAX's train step: left uncompiled,
    JAX runs it one operation at a time, several times slower, and with a model
    replicated over CPU devices (`--strategy=mirrored`) each operation's collectives can
    stall past XLA's rendezvous timeout, which aborts the process. Under TensorFlow the
    step stays a (non-XLA) `tf.function`, and PyTorch runs eagerly, as Keras does there.
    """
    if jit_compile is not None:
        return bool(jit_compile)
    return (backend or keras.backend.backend()) == "jax"


def _nvidia_driver():
    """Whether an NVIDIA driver is loaded on this (Linux) machine."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 on /dev/null (TensorFlow's C++ logs bypass `sys.stderr`)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quiet_device_start(*, if_imported=False):
    """Lets TensorFlow find its devices, with no CUDA errors on a machine without a GPU.

    TensorFlow's CUDA build logs `failed call to cuInit` the first time it looks for GPUs on
    a machine with no NVIDIA driver. There, and only there, that first look runs with
    stderr silenced (with a driver, a GPU that fails to start still says why). Call it
    before TensorFlow creates anything (`keras.utils.set_random_seed` imports it under
    every backend); it does nothing without TensorFlow (or, with `if_imported`, before it
    is imported). `TF_CPP_MIN_LOG_LEVEL` cannot do this: TensorFlow reads it at import, and
    it would hide every later error too.
    """
    if if_imported and "tensorflow" not in sys.modules:
        return
    with contextlib.nullcontext() if _nvidia_driver() else _stderr_silenced():
        try:  # the import too: under absl's logging it can start the CUDA platform
            import tensorflow as tf
        except ImportError:
            return
        tf.config.list_physical_devices()


def enable_compilation_cache(path):
    """Turns on JAX's persistent compilation cache in `path`, for every program.

    A resumed run (or a rerun of the same command) then loads the compiled train and
    eval steps instead of compiling them again: docs/benchmarks.md measures
    PreActResNet164's compile at 32.1 s on a first run and 5.5 s on the second.
    """
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    # Every program, also the quick ones: a deep net's many small initializer kernels
    # are most of its build time.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def eval_batch_size(requested, replicas):
    """`requested`, or 500 rounded down to a multiple of the replicas (every replica gets
    an equal share of an evaluation batch: 496 on 8 replicas)."""
    return requested or max(replicas, 500 // replicas * replicas)


def smoke_environment():
    """A smoke run's XLA set-up (call before `import jax`): the CPU, and little XLA
    optimization, since a smoke run's cost is compilation, not steps."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def make_strategy(name, tpu="", loop="fit"):
    """Returns the distribution strategy for `--strategy`, or None outside TF.

    Under TensorFlow this is a `tf.distribute.Strategy`. Under JAX with `--loop=fit`,
    `mirrored` (and `default` with several devices) installs
    `keras.distribution.DataParallel` over all local devices and returns None; the JAX
    loop makes its own mesh (`jax_loop.JaxRunner`). Under PyTorch only `default` and
    `one_device` exist.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if name == "tpu":
            raise ValueError(
                "--strategy=tpu needs KERAS_BACKEND=tensorflow; under JAX a TPU VM's chips "
                "are its devices (--strategy=default or mirrored; multi_worker_mirrored on a "
                "slice of several hosts)."
            )
        devices = jax.devices()
        if name != "one_device" and len(devices) > 1 and loop == "fit":
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
            log.info("JAX DataParallel over %d devices.", len(devices))
        return None
    if backend != "tensorflow":
        if name == "tpu" or (loop != "torch" and name not in ("default", "one_device")):
            raise ValueError(
                f"--strategy={name} needs KERAS_BACKEND=tensorflow (jax for mirrored and "
                f"multi_worker_mirrored; a torchrun launch under torch); got {backend}."
            )
        return None
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy must be one of the known strategies; got {name!r}.")


def scope(strategy):
    """`strategy.scope()`, or a no-op context outside TensorFlow."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def num_replicas(strategy, loop="fit"):
    """The devices a global batch is split over."""
    if strategy is not None:
        return strategy.num_replicas_in_sync
    if loop == "jax" or keras.distribution.distribution() is not None:
        import jax

        return jax.device_count()
    return 1


def worker_index(strategy):
    """This process's index among `num_workers(strategy)` (the chief first)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 0
    chiefs = len(resolver.cluster_spec().as_dict().get("chief", ()))
    return resolver.task_id + (chiefs if resolver.task_type == "worker" else 0)


def num_workers(strategy):
    """The processes of a `tf.distribute` run (1 without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return sum(len(spec.get(kind, ())) for kind in ("chief", "worker"))


def is_chief(strategy):
    """True on the worker that writes checkpoints and logs (always, outside MWMS)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )


def write_dir(strategy, model_dir):
    """`model_dir` on the chief; a scratch folder under it on other workers.

    Every worker saves (reading variables may involve collectives), but only the
    chief's files are the run's.
    """
    if is_chief(strategy):
        return model_dir
    from keras_preact.train import fs

    resolver = strategy.cluster_resolver
    return fs.join(model_dir, "workers", f"{resolver.task_type}_{resolver.task_id}")


def set_precision(mixed, strategy_name, loop="fit"):
    """Sets and returns the Keras dtype policy: float32, or the mixed one of the device.

    float16 (with loss scaling) on GPUs, bfloat16 on TPUs and CPUs, and bfloat16 for the
    JAX and PyTorch DDP loops everywhere (their steps do no loss scaling; bfloat16 needs
    none).
    """
    if not mixed:
        return "float32"
    gpu = False
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    elif keras.backend.backend() == "jax":
        import jax

        gpu = jax.default_backend() == "gpu"
    elif keras.backend.backend() == "torch":
        import torch

        gpu = torch.cuda.is_available()
    float16 = gpu and strategy_name != "tpu" and loop not in ("jax", "torch")
    policy = "mixed_float16" if float16 else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy
