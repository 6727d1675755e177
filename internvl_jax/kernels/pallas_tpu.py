"""Pallas TPU flash attention (`jax.experimental.pallas.ops.tpu.flash_attention`) for prefill and the vision tower.

The kernel wants equal query and key heads, sequences a multiple of its 128-token blocks and expresses masks as
segment ids (a query sees the keys of its own segment). The wrapper adapts our calls to it:
- grouped heads: each KV head is repeated for its g query heads (this call's keys only: a prefill's, not the
  cache's);
- lengths: queries and keys are padded to a multiple of BLOCK (1025 vision tokens: 1152), the padded keys in
  segment 0, which no real query belongs to;
- padding: real tokens are segment 1, padding tokens segment 0 (a padding query sees only padding keys: its
  output is finite and never used, as in the reference);
- causal: the kernel's own causal mask (query i sees keys <= i), which skips the blocks above the diagonal.
Off TPU it runs in Pallas's TPU interpret mode (slow; for checking only).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as fa

from internvl_jax import kernels

BLOCK = 128


def flash(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array | None, causal: bool,
          interpret: bool | None = None) -> jax.Array:
    """q [b,t,n,h], k, v [b,t,kv,h] (n a multiple of kv), valid [b,t] bool (None: every token real)
    -> [b,t,n,h] in q's dtype. `interpret`: None runs natively for a TPU (`kernels.backend()`), else
    interpreted."""
    b, t, n, h = q.shape
    pad = -t % BLOCK
    segments = (jnp.ones((b, t), jnp.int32) if valid is None else valid.astype(jnp.int32))
    segments = jnp.pad(segments, [(0, 0), (0, pad)])
    k, v = (jnp.repeat(a, n // a.shape[2], axis=2) for a in (k, v))
    q, k, v = (jnp.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]).transpose(0, 2, 1, 3) for a in (q, k, v))
    if interpret is None:
        interpret = kernels.backend() != "tpu"
    with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
        out = fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(segments, segments), causal=causal,
                                 sm_scale=h**-0.5)
    return out.transpose(0, 2, 1, 3)[:, :t]
