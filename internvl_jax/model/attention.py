"""Grouped-query attention computed blockwise: an online softmax over blocks of keys, in pure JAX.

`attention` (the decoder's) and `full_attention` (the vision tower's, unmasked) are the two entry points; each asks
`internvl_jax.kernels.choose` which implementation runs (docs/kernels.md): the pure-JAX paths here ("reference":
`blockwise`, `einsum_softmax`), `jax.nn.dot_product_attention` (XLA or cuDNN) or a Pallas TPU kernel.

The blockwise path: nothing of size queries x all keys is ever formed: scores exist one [query block, key block] tile
at a time, so memory is linear in the sequence, and the keys already in the cache are read only up to the
last filled slot (`KeyMask.start`): a decode step's reads follow the real lengths, not the cache's size.

Which key a query sees is described, not materialised ([b, t, s] booleans would be quadratic):
- cached keys: slot j of the query row's cache row, visible when `cached[b, j]` and j < `start[b]`
  (everything in the cache comes before this call's tokens);
- this call's own keys: causal (key i' <= query i') and `new[b, i']`.
A query that sees no key at all (left padding) averages the keys it read, as transformers' eager attention
averages all of them: its output is finite and is never used.

Dimension names: b rows, t queries, s keys of a block, k KV heads, g query heads per KV head, h head_dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from internvl_jax import kernels

BLOCK = 512  # keys (and queries) per tile: 14 heads x 512 x 512 float32 scores = 15 MB
_NEG = float(jnp.finfo(jnp.float32).min)  # finite: exp(_NEG - m) underflows to 0, exp(_NEG - _NEG) = 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyMask:
    """Which keys the queries of one call see (see the module docstring)."""

    start: jax.Array  # [b] int32: cache slot of the call's first token; the cache is read below it
    cached: jax.Array  # [b, S] bool: cache slots holding real tokens
    new: jax.Array  # [b, t] bool: the call's real tokens (False: padding)

    @classmethod
    def uncached(cls, valid: jax.Array) -> KeyMask:
        """A call without a cache: causal over its own tokens, `valid` [b, t] marking the real ones."""
        b = valid.shape[0]
        return cls(jnp.zeros((b,), jnp.int32), jnp.zeros((b, 0), bool), valid.astype(bool))


class CachedKeys(NamedTuple):
    """Where a layer's cached keys are read: the whole stacked cache and the layer's index, so a block is sliced
    straight out of the stack (no per-layer copy of the cache)."""

    k: jax.Array  # [layers, rows, slots, k, h]
    v: jax.Array
    layer: jax.Array  # int32 scalar
    rows: jax.Array | None  # [b] cache row of each query row; None: query row i reads cache row i
    k_scale: jax.Array | None = None  # int8 cache: [layers, rows, slots, k, 1] float32 (`KVCache`)
    v_scale: jax.Array | None = None


class _Softmax(NamedTuple):
    """Running max, normaliser and weighted sum of the online softmax, float32."""

    m: jax.Array  # [b, k, g, t]
    l: jax.Array  # [b, k, g, t]  # noqa: E741 (the usual name)
    acc: jax.Array  # [b, k, g, t, h]


HEAD_LOOP_QUERIES = 64  # XLA:CPU loops over heads from this many queries a tile on (`loops_over_heads`)


def loops_over_heads(queries: int) -> bool:
    """Whether attention with this many queries a tile runs one head at a time: on the CPU backend, from
    HEAD_LOOP_QUERIES queries on. There all heads' scores in one tensor go through a strided transpose between the
    product and the softmax, out of cache: a head at a time keeps its [t, s] scores in cache and is 4-6x faster for
    a 384-2048 token prefill and for the vision tower (`benchmarks/cpu_micro.py`). Below that (decode steps, short
    chunks) all heads at once is faster: the per-head products are too small. Not for meshes that split the heads
    (the loop would gather them): on the CPU backend those are tests."""
    return kernels.backend() == "cpu" and queries >= HEAD_LOOP_QUERIES


def _update(st: _Softmax, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> _Softmax:
    """Fold one key block into the running softmax. q [b,t,k,g,h] (scaled), k/v [b,s,k,h], visible [b,t|1,s]."""
    if loops_over_heads(q.shape[1]):
        return _update_head_by_head(st, q, k, v, visible)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None, None], scores, _NEG)
    m = jnp.maximum(st.m, scores.max(axis=-1))
    p = jnp.exp(scores - m[..., None])
    keep = jnp.exp(st.m - m)
    pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return _Softmax(m, st.l * keep + p.sum(axis=-1), st.acc * keep[..., None] + pv)


def _update_head_by_head(st: _Softmax, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> _Softmax:
    """`_update` one query head at a time (a loop on device; see `loops_over_heads`)."""
    b, t, kh, g, h = q.shape
    heads = lambda a: a.reshape(b, kh * g, *a.shape[3:])  # noqa: E731  [b, k, g, ...] -> [b, n, ...]

    def one(i: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        qi = jax.lax.dynamic_index_in_dim(q.reshape(b, t, kh * g, h), i, 2, keepdims=False)  # [b, t, h]
        ki, vi = (jax.lax.dynamic_index_in_dim(a, i // g, 2, keepdims=False) for a in (k, v))  # [b, s, h]
        m0, l0, acc0 = (jax.lax.dynamic_index_in_dim(heads(a), i, 1, keepdims=False) for a in st)
        scores = jnp.einsum("bth,bsh->bts", qi, ki.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = jnp.where(visible, scores, _NEG)
        m = jnp.maximum(m0, scores.max(axis=-1))
        p = jnp.exp(scores - m[..., None])
        keep = jnp.exp(m0 - m)
        pv = jnp.einsum("bts,bsh->bth", p.astype(v.dtype), vi, preferred_element_type=jnp.float32)
        return m, l0 * keep + p.sum(axis=-1), acc0 * keep[..., None] + pv

    stacked = jax.lax.map(one, jnp.arange(kh * g))  # each [n, b, ...]
    return _Softmax(*(jnp.moveaxis(a, 0, 1).reshape(b, kh, g, *a.shape[2:]) for a in stacked))


def _read(cache: jax.Array, layer: jax.Array, rows: jax.Array | None, first: jax.Array, size: int, b: int,
          scale: jax.Array | None = None, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Slots [first, first + size) of `layer` for each of the b query rows: [b, size, k, h]; an int8 cache's block
    is dequantized with its `scale` (one per token and head) into `dtype`."""
    if scale is not None:
        return _read(cache, layer, rows, first, size, b) * _read(scale, layer, rows, first, size, b).astype(dtype)
    kh, h = cache.shape[3:]
    if rows is None:
        return jax.lax.dynamic_slice(cache, (layer, 0, first, 0, 0), (1, b, size, kh, h))[0]
    one = lambda row: jax.lax.dynamic_slice(cache, (layer, row, first, 0, 0), (1, 1, size, kh, h))[0, 0]  # noqa: E731
    return jax.vmap(one)(rows)


def block_size(n: int, block: int = BLOCK) -> int:
    """Keys (and queries) per tile for a call of n tokens: one tile when n <= block, else the fewest tiles of at
    most `block`, as even as multiples of 8 allow (1025 tokens: 2 tiles of 520, not 3 of 512 padded to 1536)."""
    if n <= block:
        return n
    per_tile = -(-n // -(-n // block))
    return -(-per_tile // 8) * 8


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: KeyMask, cached: CachedKeys | None = None,
              block: int = BLOCK) -> jax.Array:
    """q [b,t,k,g,h], this call's keys and values k, v [b,t,k,h] -> [b,t,k,g,h] in q's dtype; softmax in float32.

    `block`: the blockwise path's tile and the decode kernel's cache block (tests)."""
    b, t, kh, g, h = q.shape
    impl = kernels.choose(q.dtype, h, decode=cached is not None and t == 1)
    if cached is not None and cached.k_scale is not None:
        impl = "reference"  # an int8 cache: the kernels read keys as they are stored, only the blockwise path scales
    if impl == "pallas" and cached is None:
        from internvl_jax.kernels.pallas_tpu import flash

        return flash(q.reshape(b, t, kh * g, h), k, v, mask.new, causal=True).reshape(q.shape)
    if impl == "pallas" and t == 1 and cached.k.shape[2] % 128 == 0:  # TPU blocks: slots in multiples of 128
        from internvl_jax.kernels.pallas_tpu import decode

        return decode(q[:, 0], k[:, 0], v[:, 0], mask.new[:, 0], cached.k, cached.v, cached.layer, cached.rows,
                      mask.start, mask.cached, block=max(block, 128))[:, None]
    if impl in ("xla", "cudnn"):
        from internvl_jax.kernels.xla import attend

        keys, values, visible = _dense(k, v, mask, cached)
        return attend(q.reshape(b, t, kh * g, h), keys, values, visible, impl).reshape(q.shape)
    # "reference", and "pallas" for a prefill chunk into a cache (no Pallas kernel for that yet: docs/kernels.md)
    return blockwise(q, k, v, mask, cached, block)


def _dense(k: jax.Array, v: jax.Array, mask: KeyMask, cached: CachedKeys | None
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every key the call may see and which of them each query sees, for kernels that take one key sequence:
    the cache's slots (all of them) then this call's keys; visible [b, t, slots + t] (quadratic: kernels only)."""
    t = k.shape[1]
    visible = jnp.tril(jnp.ones((t, t), bool))[None] & mask.new[:, None, :]
    if cached is None:
        return k, v, visible
    slots, b = cached.k.shape[2], k.shape[0]
    ck, cv = (_read(c, cached.layer, cached.rows, jnp.int32(0), slots, b).astype(k.dtype)
              for c in (cached.k, cached.v))
    seen = mask.cached & (jnp.arange(slots)[None] < mask.start[:, None])
    visible = jnp.concatenate([jnp.broadcast_to(seen[:, None], (b, t, slots)), visible], axis=2)
    return jnp.concatenate([ck, k], axis=1), jnp.concatenate([cv, v], axis=1), visible


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked attention (the vision tower): q, k, v [n, s, heads, h] -> [n, s, heads, h] in v's dtype."""
    impl = kernels.choose(q.dtype, q.shape[-1])
    if impl == "pallas":
        from internvl_jax.kernels.pallas_tpu import flash

        return flash(q, k, v, None, causal=False)
    if impl in ("xla", "cudnn"):
        from internvl_jax.kernels.xla import attend

        return attend(q, k, v, None, impl)
    return head_by_head(q, k, v) if loops_over_heads(q.shape[1]) else einsum_softmax(q, k, v)


def einsum_softmax(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The reference unmasked form: one [s, s] score matrix per head, softmax in float32, all heads at once."""
    scores = jnp.einsum("nshk,nthk->nhst", q, k) * (q.shape[-1] ** -0.5)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("nhst,nthk->nshk", probs, v)


def head_by_head(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`einsum_softmax` one head at a time (a loop on device), what XLA:CPU runs: a head's [n, s, s] scores stay in
    the CPU's cache between the two products and the softmax, and each head is read from q, k, v in place (when it
    runs: `loops_over_heads`). The softmax is normalised after the second product: s x head_dim divisions instead
    of s x s."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)

    def one(i: jax.Array) -> jax.Array:
        qi, ki, vi = (jax.lax.dynamic_index_in_dim(a, i, 2, keepdims=False) for a in (q, k, v))  # [n, s, k]
        scores = jnp.einsum("nsk,ntk->nst", qi * scale, ki, preferred_element_type=jnp.float32)
        p = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
        out = jnp.einsum("nst,ntk->nsk", p.astype(v.dtype), vi, preferred_element_type=jnp.float32)
        return (out / p.sum(axis=-1, keepdims=True)).astype(v.dtype)

    return jnp.moveaxis(jax.lax.map(one, jnp.arange(q.shape[2])), 0, 2)


def blockwise(q: jax.Array, k: jax.Array, v: jax.Array, mask: KeyMask, cached: CachedKeys | None = None,
              block: int = BLOCK) -> jax.Array:
    """The reference decoder attention (the module docstring): q [b,t,k,g,h], k, v [b,t,k,h] -> [b,t,k,g,h]."""
    b, t, kh, g, h = q.shape
    q = q * jnp.asarray(h**-0.5, q.dtype)
    tile = block_size(t, block)
    pad = -t % tile
    if pad:  # padded keys are invisible (new=False) and padded queries are dropped at the end
        q, k, v = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (q, k, v))
    new = jnp.pad(mask.new, [(0, 0), (0, pad)])
    n_tiles = (t + pad) // tile
    qs = q.reshape(b, n_tiles, tile, kh, g, h)
    ks, vs = (a.reshape(b, n_tiles, tile, kh, h) for a in (k, v))
    news = new.reshape(b, n_tiles, tile)

    if cached is not None:
        slots = cached.k.shape[2]
        cblock = math.gcd(slots, block)
        n_cached = (jnp.max(mask.start) + cblock - 1) // cblock  # blocks holding a slot below some row's start

    def query_tile(i: jax.Array, qi: jax.Array) -> jax.Array:
        st = _Softmax(jnp.full((b, kh, g, tile), _NEG, jnp.float32), jnp.zeros((b, kh, g, tile), jnp.float32),
                      jnp.zeros((b, kh, g, tile, h), jnp.float32))
        if cached is not None:
            def cache_block(j, st):
                first = j * cblock
                kb = _read(cached.k, cached.layer, cached.rows, first, cblock, b, cached.k_scale, q.dtype)
                vb = _read(cached.v, cached.layer, cached.rows, first, cblock, b, cached.v_scale, q.dtype)
                cols = first + jnp.arange(cblock)
                seen = jax.lax.dynamic_slice_in_dim(mask.cached, first, cblock, axis=1)
                visible = seen & (cols[None] < mask.start[:, None])
                return _update(st, qi, kb, vb.astype(q.dtype), visible[:, None])

            st = jax.lax.fori_loop(0, n_cached, cache_block, st)

        def key_tile(st, j):
            def fold(st):
                causal = (j * tile + jnp.arange(tile))[None, :] <= (i * tile + jnp.arange(tile))[:, None]
                visible = causal[None] & news[:, j][:, None, :]
                return _update(st, qi, ks[:, j], vs[:, j], visible)

            # Tiles above the diagonal hold no visible key: skipped (a cond, so the forward stays differentiable).
            return (fold(st) if n_tiles == 1 else jax.lax.cond(j <= i, fold, lambda s: s, st)), None

        st, _ = jax.lax.scan(key_tile, st, jnp.arange(n_tiles))
        out = st.acc / jnp.where(st.l > 0, st.l, 1.0)[..., None]
        return jnp.einsum("bkgth->btkgh", out).astype(q.dtype)

    if n_tiles == 1:
        out = query_tile(jnp.int32(0), qs[:, 0])[:, None]
    else:
        out = jax.lax.map(lambda a: query_tile(*a), (jnp.arange(n_tiles), jnp.moveaxis(qs, 1, 0)))
        out = jnp.moveaxis(out, 0, 1)
    return out.reshape(b, n_tiles * tile, kh, g, h)[:, :t]


def reference(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """The plain einsum + softmax form, for tests: q [b,t,k,g,h], k, v [b,s,k,h], visible [b,t,s]."""
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    scores = jnp.where(visible[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v)
