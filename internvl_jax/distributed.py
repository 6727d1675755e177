"""Joining a multi-process (multi-host) JAX job: the one place that sets it up."""

from __future__ import annotations


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize`, after choosing gloo for CPU collectives.

    CPU processes need a collectives implementation for cross-process reductions and barriers (GPUs and TPUs
    ignore the setting); it must be chosen before JAX starts its backends.
    """
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
