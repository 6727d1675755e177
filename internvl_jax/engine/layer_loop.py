"""Decoding on one CPU device: the host steps through the decoder layers, a few per compiled call.

Why not the on-device loop there: inside one program, a scan over stacked layer weights makes XLA:CPU copy
each layer's kernels out of the stack (a dynamic-slice fusion) before the matrix-vector product, so every
weight byte is read, written and read again; batch-1 decode ran at 44% of the memory-bandwidth bound.
Unrolling the layers removes the copy but makes compile time grow with depth. Here one program runs a
group of `group_size` layers (compiled once, whatever the depth) and the host calls it layers / group_size
times per token, with each layer's weights handed over as zero-copy views of the stacked arrays (a CPU
buffer can alias host memory). Per-token bookkeeping (`choose_next`) is the on-device loop's own, so both
paths give the same tokens.

The KV cache stays the stacked [layers, b, s, k, h] pair the prefill wrote; the group calls read it and return
their layers' new keys and values, which one more call per token writes into it in place (donated).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import TextConfig
from internvl_jax.engine.sampling import SamplingConfig
from internvl_jax.engine.step import DecodeState, advanced, choose_next
from internvl_jax.model.attention import KeyMask
from internvl_jax.model.decoder import DecoderLayer, KVCache, rope_tables, write_slots
from internvl_jax.model.internvl import InternVLModule

Params = dict[str, Any]


def group_size(num_layers: int) -> int:
    """Layers per compiled call: 4 compiles in under a second (`benchmarks/decode_step.py` prints it) and, on the
    1B shape, ran as fast as all 24 in one call; fewer calls would only save host dispatch."""
    return next(g for g in (4, 3, 2, 1) if num_layers % g == 0)


def layer_views(layers: Params, num_layers: int) -> list[Params] | None:
    """Per-layer parameter trees aliasing the stacked arrays, or None where they would be copies (anything but
    one CPU device, or XLA declines to alias): there the on-device loop is the better choice."""
    leaves = jax.tree.leaves(layers)
    if not all(isinstance(a, jax.Array) and a.is_fully_addressable and len(a.devices()) == 1
               and next(iter(a.devices())).platform == "cpu" for a in leaves):
        return None

    hosts = jax.tree.map(np.asarray, layers)  # zero-copy views of the CPU buffers
    devices = jax.tree.map(lambda a: next(iter(a.devices())), layers)
    views = [jax.tree.map(lambda h, d, i=i: jax.device_put(h[i], d, may_alias=True), hosts, devices)
             for i in range(num_layers)]
    # A slice that is not aligned is copied: harmless for norm scales and biases, not for the kernels.
    copied = sum(v.nbytes for i, tree in enumerate(views)
                 for v, s in zip(jax.tree.leaves(tree), leaves, strict=True)
                 if v.unsafe_buffer_pointer() != s.unsafe_buffer_pointer() + i * v.nbytes)
    return views if copied * 16 <= sum(s.nbytes for s in leaves) else None


@functools.lru_cache(maxsize=8)
def _group_fn(cfg: TextConfig, param_dtype: jnp.dtype, size: int) -> Callable:
    """`size` layers from layer `first` on: they read the whole cache in place (not donated) and return the
    hidden states and their new keys and values [size, b, t, k, h], which `_write_fn` stores."""
    layer = DecoderLayer(cfg, param_dtype)

    def run(group: tuple[Params, ...], first, x, k, v, rope, mask: KeyMask):
        new = []
        for j, p in enumerate(group):
            x, kv = layer.apply({"params": p}, x, first + j, (k, v, None), rope, mask)
            new.append(kv)
        return x, jnp.stack([kv[0] for kv in new]), jnp.stack([kv[1] for kv in new])

    return jax.jit(run)


@functools.lru_cache(maxsize=1)
def _write_fn() -> Callable:
    """Every layer's new keys and values into the donated cache, in place: a program of its own, because one
    that also reads the cache lets XLA:CPU copy the whole cache rather than order the reads before the write.
    `slot`: a scalar, or one per row (`write_slots`)."""

    def write(k, v, new_k: tuple[jax.Array, ...], new_v: tuple[jax.Array, ...], slot):
        return write_slots(k, jnp.concatenate(new_k), slot), write_slots(v, jnp.concatenate(new_v), slot)

    return jax.jit(write, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=32)
def _begin_fn(module: InternVLModule, sampling: SamplingConfig) -> Callable:
    def begin(text: Params, st: DecodeState, slot: jax.Array):
        st, tok, mask = choose_next(st, slot, sampling)
        x = module.apply({"params": {"text": text}}, tok[:, None], method=lambda m, t: m.text.embed(t))
        return st, x, rope_tables(module.cfg.text, st.positions[:, None]), mask, jnp.all(st.done)

    return jax.jit(begin, donate_argnums=(1,))


@functools.lru_cache(maxsize=8)
def _end_fn(module: InternVLModule) -> Callable:
    def end(text: Params, st: DecodeState, x: jax.Array) -> DecodeState:
        def head(m: InternVLModule, h: jax.Array) -> jax.Array:
            return m.text.logits(m.text.final_norm(h)).astype(jnp.float32)

        return advanced(st, module.apply({"params": {"text": text}}, x, method=head))

    return jax.jit(end, donate_argnums=(1,))


def host_layers(module: InternVLModule, params: Params) -> Callable | None:
    """`run(x, rope, mask, k, v, slot) -> (x, k, v)`: every decoder layer on one token step, the host calling
    the layer groups on views of the stacked weights, then the write of the new keys into the donated cache at
    `slot` (a scalar or one per row). None when views are not possible (use the on-device loop there)."""
    cfg = module.cfg.text
    if module.quant or module.kv_cache:  # quantized weights or cache: the on-device loop (its layers know them)
        return None
    views = layer_views(params["text"]["layers"], cfg.num_layers)
    if views is None:
        return None
    size = group_size(cfg.num_layers)
    groups = [(np.int32(first), tuple(views[first:first + size])) for first in range(0, cfg.num_layers, size)]
    run_group, write = _group_fn(cfg, module.param_dtype, size), _write_fn()

    def run(x, rope, mask: KeyMask, k, v, slot):
        new_k, new_v = [], []
        for first, group in groups:
            x, nk, nv = run_group(group, first, x, k, v, rope, mask)
            new_k.append(nk)
            new_v.append(nv)
        k, v = write(k, v, tuple(new_k), tuple(new_v), slot)
        return x, k, v

    return run


def text_params(params: Params) -> Params:
    """The decoder's parameters other than the layer stack (embedding, final norm, head)."""
    return {k: v for k, v in params["text"].items() if k != "layers"}


def decoder(module: InternVLModule, params: Params, sampling: SamplingConfig) -> Callable | None:
    """A `decode(params, cache, state, limit) -> (cache, state)` that loops on the host, or None when views are
    not possible."""
    layers = host_layers(module, params)
    if layers is None:
        return None
    text, begin, end = text_params(params), _begin_fn(module, sampling), _end_fn(module)

    def decode(_params: Params, cache: KVCache, st: DecodeState, limit: int) -> tuple[KVCache, DecodeState]:
        step = int(np.asarray(st.step))
        slot = int(np.asarray(cache.slot))  # tracked on the host: the arrays are donated at every call
        k, v = cache.k, cache.v
        finished = jnp.all(st.done)
        # `finished` comes from the step's first program, so reading it does not wait for the layers: the host
        # queues the next step while this one runs.
        while step < limit and not bool(finished):
            st, x, rope, mask, finished = begin(text, st, np.int32(slot))
            x, k, v = layers(x, rope, mask, k, v, np.int32(slot))
            st = end(text, st, x)
            step, slot = step + 1, slot + 1
        return KVCache(k, v, jnp.int32(slot)), st

    return decode
