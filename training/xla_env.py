"""Process environment for the GPU scripts' JAX runs, set before JAX is imported."""

import os


def smoke_environment():
    """Smoke mode: compile with little XLA optimization, on the CPU.

    A smoke run's cost is compilation, not steps. Call before `import jax`.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
