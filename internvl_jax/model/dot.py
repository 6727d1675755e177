"""The contraction every linear layer runs (`layers.Dense`, the quantized dot, the lm_head)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from internvl_jax import kernels


def contract(x: jax.Array, kernel: jax.Array, n_in: int = 1) -> jax.Array:
    """x [..., in...] with kernel [in..., out...] over the `n_in` input axes, in x's dtype.

    On XLA:CPU a bfloat16 (or float16) dot is asked for a float32 result and rounded once, as torch's GEMMs do:
    that form runs on the CPU's bfloat16 units (AMX, AVX512-BF16) where a bfloat16 result does not (Xeon with AMX,
    [1025, 1024] x [1024, 4096]: 6.3 ms against 39.7 ms, and 29.8 ms in float32: `benchmarks/cpu_micro.py`,
    benchmarks/cpu-micro-intel-avx512.json).
    Other backends accumulate in float32 inside their bfloat16 dots already; their programs are left as they are."""
    kernel = kernel.astype(x.dtype)
    if x.dtype == jnp.float32 or kernels.backend() != "cpu":
        return jnp.tensordot(x, kernel, axes=n_in)
    return jnp.tensordot(x, kernel, axes=n_in, preferred_element_type=jnp.float32).astype(x.dtype)
