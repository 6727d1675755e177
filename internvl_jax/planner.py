"""Memory planner: per-device bytes of weights, KV cache and activations for a config on a mesh.

Uses abstract shapes only (nothing is allocated) and the same rules table as the real shardings, so
weights and cache figures are exact (a test compares them with real arrays); activations are an estimate
of the prefill peak (the largest live tensors of one layer), stated as such.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import jax.numpy as jnp

from internvl_jax.config import InternVLConfig
from internvl_jax.model.decoder import KVCache
from internvl_jax.model.params import abstract_params
from internvl_jax.quant import nbytes
from internvl_jax.sharding import logical_axes, parse_mesh_spec, shard_shape, spec_for
from internvl_jax.weights import flatten_paths

GiB = 2**30


@dataclass(frozen=True)
class Plan:
    weights: int  # bytes per device
    cache: int
    activations: int  # estimate
    device_memory: int | None

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.activations

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def report(self) -> str:
        lines = [f"{'weights':<12}{self.weights / GiB:10.2f} GiB per device",
                 f"{'KV cache':<12}{self.cache / GiB:10.2f} GiB per device",
                 f"{'activations':<12}{self.activations / GiB:10.2f} GiB per device (prefill estimate)",
                 f"{'total':<12}{self.total / GiB:10.2f} GiB per device"]
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{verdict} in {self.device_memory / GiB:.1f} GiB per device")
        return "\n".join(lines)


def _sizes(mesh: Mapping[str, int]) -> dict[str, int]:
    sizes = parse_mesh_spec(mesh)
    if -1 in sizes.values():
        raise ValueError(f"mesh {dict(mesh)}: the planner needs every axis size (no -1)")
    return sizes


def weight_bytes(config: InternVLConfig, mesh: Mapping[str, int], dtype: str = "bfloat16", quant: str | None = None
                 ) -> int:
    """Per-device bytes of the weights; `quant`: stored int8 / int4 (two values a byte) with their scales."""
    sizes = _sizes(mesh)
    shapes = flatten_paths(abstract_params(config, dtype, quant=quant))
    axes = logical_axes(config, dtype, quant)
    return sum(nbytes(shard_shape(s.shape, spec_for(s.shape, axes[p], sizes), sizes), s.dtype)
               for p, s in shapes.items())


def cache_bytes(config: InternVLConfig, mesh: Mapping[str, int], batch: int, slots: int,
                dtype: str = "bfloat16") -> int:
    sizes = _sizes(mesh)
    cache = KVCache.abstract(config.text, batch, slots, dtype)
    return sum(math.prod(shard_shape(a.shape, spec_for(a.shape, KVCache.AXES[:a.ndim], sizes), sizes))
               * a.dtype.itemsize for a in (cache.k, cache.v))


def activation_bytes(config: InternVLConfig, mesh: Mapping[str, int], batch: int, seq: int, tiles: int,
                     dtype: str = "bfloat16") -> int:
    """Prefill peak estimate: one decoder layer's largest live tensors, or the vision tower's on one group of
    tiles. Attention is blockwise (`model/attention.py`): one tile of scores per row and head, not [seq, seq]."""
    from internvl_jax.engine.vision import VISION_GROUP
    from internvl_jax.model.attention import BLOCK

    sizes = _sizes(mesh)
    dp, tp = sizes["data"], sizes["tensor"]
    t, v = config.text, config.vision
    item = jnp.dtype(dtype).itemsize
    b = -(-batch // dp)
    heads = -(-t.num_heads // tp)
    text = (4 * b * seq * t.hidden_size * item  # residual, normed input, attention and MLP outputs
            + 3 * b * seq * -(-t.intermediate_size // tp) * item  # gate, up, their product
            + 2 * b * heads * min(seq, BLOCK) ** 2 * 4  # one tile of scores and probabilities, float32
            + b * -(-t.vocab_size // tp) * 4)  # last-position logits
    n = min(-(-tiles // dp), VISION_GROUP)
    s = v.grid * v.grid + 1
    vision = (4 * n * s * v.hidden_size * item + 2 * n * s * -(-v.intermediate_size // tp) * item
              + 2 * n * -(-v.num_heads // tp) * s * s * 4)
    return max(text, vision)


def plan(config: InternVLConfig, mesh: Mapping[str, int], batch: int, seq: int, tiles: int = 0,
         dtype: str = "bfloat16", device_memory: int | None = None, quant: str | None = None) -> Plan:
    """Per-device memory of serving `batch` sequences of `seq` tokens (prompt + new) with `tiles` tiles;
    `quant`: the weights stored quantized."""
    for name, value, least in (("batch", batch, 1), ("seq", seq, 1), ("tiles", tiles, 0)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    return Plan(weight_bytes(config, mesh, dtype, quant), cache_bytes(config, mesh, batch, seq, dtype),
                activation_bytes(config, mesh, batch, seq, tiles, dtype), device_memory)


def parse_bytes(text: str | int) -> int:
    """'80GB', '80GiB', '500MB', '141e9', 1000 -> bytes (GB = 1e9, GiB = 2**30)."""
    if isinstance(text, int):
        return text
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "b": 1}
    s = text.strip().lower()
    factor = next((f for unit, f in units.items() if s.endswith(unit)), 1)
    number = next((s[: -len(unit)] for unit in units if s.endswith(unit)), s)
    try:
        return int(float(number) * factor)
    except ValueError:
        raise ValueError(f"size {text!r}: a number of bytes or e.g. 80GB, 500MB, 2GiB") from None
