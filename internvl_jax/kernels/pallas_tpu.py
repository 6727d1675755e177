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
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
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


# ----- decode: one new token per row against its cache row, reading only the filled blocks -----
_NEG = float(jnp.finfo(jnp.float32).min)


def _decode_kernel(layer_ref, rows_ref, len_ref, q_ref, k_ref, v_ref, seen_ref, acc_ref, m_ref, l_ref, *,
                   block: int, kv_heads: int, scale: float):
    """Grid (row i, cache block j). q [kh, g, h]; k, v blocks [block, kh, h] of cache row rows[i] in layer `layer`;
    the running softmax (acc, m, l) stays in the output blocks across j (same block index for every j)."""
    del layer_ref, rows_ref  # used by the index maps
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    @pl.when(j * block < len_ref[i])  # blocks past the row's length: neither fetched (index map) nor computed
    def _():
        cols = j * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        visible = (seen_ref[0] != 0) & (cols < len_ref[i])  # [1, block]
        for c in range(kv_heads):
            q = q_ref[0, c].astype(jnp.float32) * scale  # [g, h]
            k = k_ref[0, 0, :, c, :].astype(jnp.float32)  # [block, h]
            v = v_ref[0, 0, :, c, :].astype(jnp.float32)
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            s = jnp.where(visible, s, _NEG)  # [g, block]
            m_prev = m_ref[0, c]  # [g, 1]
            m = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
            p = jnp.exp(s - m)
            keep = jnp.exp(m_prev - m)
            l_ref[0, c] = l_ref[0, c] * keep + p.sum(axis=-1, keepdims=True)
            acc_ref[0, c] = acc_ref[0, c] * keep + jnp.dot(p, v, preferred_element_type=jnp.float32)
            m_ref[0, c] = m


def decode(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
           layer: jax.Array, rows: jax.Array | None, start: jax.Array, cached: jax.Array, block: int = 512,
           interpret: bool | None = None) -> jax.Array:
    """One decode step: q [b,kh,g,h] and the token's own k, v [b,kh,h] (seen by itself where valid [b]) against
    the stacked cache [L,R,S,kh,h] (layer `layer`, cache row rows[i] for query row i, None: i), slots below
    start[b] where cached[b, S] is True. -> [b,kh,g,h] in q's dtype.

    The kernel reads the cache in place (no per-layer copy: the layer and rows are scalar-prefetched into the
    block index) and clamps the block index at each row's last filled block, so no block past a row's length is
    fetched. The token's own key is folded in afterwards, in plain JAX."""
    b, kh, g, h = q.shape
    slots = cache_k.shape[2]
    block = math.gcd(slots, block)
    rows = jnp.arange(b, dtype=jnp.int32) if rows is None else rows.astype(jnp.int32)
    start = start.astype(jnp.int32)
    if interpret is None:
        interpret = kernels.backend() != "tpu"

    def filled(i, j, len_ref):  # block j, or the row's last filled block past it (lengths >= 0: lax.div floors)
        return jnp.minimum(j, jnp.maximum(jax.lax.div(len_ref[i] + block - 1, block) - 1, 0))

    def cache_index(i, j, layer_ref, rows_ref, len_ref):
        return (layer_ref[0], rows_ref[i], filled(i, j, len_ref), 0, 0)

    def seen_index(i, j, layer_ref, rows_ref, len_ref):
        return (i, 0, filled(i, j, len_ref))

    def row_index(i, j, *_):
        return (i, 0, 0, 0)

    cache_spec = pl.BlockSpec((1, 1, block, kh, h), cache_index)
    acc, m, l = pl.pallas_call(  # noqa: E741 (the usual name)
        functools.partial(_decode_kernel, block=block, kv_heads=kh, scale=h**-0.5),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, slots // block),
            in_specs=[pl.BlockSpec((1, kh, g, h), row_index), cache_spec, cache_spec,
                      pl.BlockSpec((1, 1, block), seen_index)],
            out_specs=[pl.BlockSpec((1, kh, g, h), row_index), pl.BlockSpec((1, kh, g, 1), row_index),
                       pl.BlockSpec((1, kh, g, 1), row_index)]),
        out_shape=[jax.ShapeDtypeStruct((b, kh, g, h), jnp.float32),
                   *(jax.ShapeDtypeStruct((b, kh, g, 1), jnp.float32) for _ in range(2))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), rows, start, q, cache_k, cache_v,
      cached.astype(jnp.int32)[:, None, :])
    # the token's own key, where it is a real token
    s = jnp.einsum("bkgh,bkh->bkg", q.astype(jnp.float32), k.astype(jnp.float32))[..., None] * h**-0.5
    s = jnp.where(valid[:, None, None, None], s, _NEG)
    top = jnp.maximum(m, s)
    old, new = jnp.exp(m - top), jnp.where(valid[:, None, None, None], jnp.exp(s - top), 0.0)
    norm = l * old + new
    out = (acc * old + new * v.astype(jnp.float32)[:, :, None, :]) / jnp.where(norm > 0, norm, 1.0)
    return out.astype(q.dtype)
