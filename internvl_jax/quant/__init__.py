"""Quantized weights (int8 per output channel, int4 in groups along the input) and the int8 KV cache.

One form for all of them, a block-scaled array: integer values `q` of the float array's shape and a float `scale`
of the same rank, each scale entry covering one block of `q` (`scale.shape[i]` divides `q.shape[i]`). A weight
[in..., out...] quantized int8 has scale [1..., out...] (one per output channel, applied after the dot); int4 splits
its last input axis into groups (scale [in..., in_last / group, out...]); a KV cache [.., kv_heads, head_dim] has
scale [.., kv_heads, 1] (one per token and head). The scale keeps its weight's logical axes, so it shards by the
same rules table (a size-1 axis is replicated).

Why not qwix (docs/quantization.md): it quantizes by intercepting `jax.lax.dot_general` and `Module.param` while
the model runs; our weights are declared, restored, converted and sharded per parameter path without running it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from internvl_jax.model.dot import contract

SCHEMES = ("int8", "int4")
VERSION = 1  # of the quantized checkpoint format (the converter's manifest records it)
SCALE = "_scale"  # a quantized parameter `p` keeps its scale at `p + SCALE`
MAX_GROUP, MIN_GROUP = 128, 8  # int4 group sizes tried, largest first
_QMAX = {"int8": 127, "int4": 7}
_STORAGE = {"int8": jnp.int8, "int4": jnp.int4}


def check_scheme(scheme: str | None) -> str:
    """'' (no quantization), 'int8' or 'int4'; anything else is refused by name."""
    if scheme in (None, "", "none"):
        return ""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize {scheme!r}: one of {', '.join(SCHEMES)}")
    return scheme


def storage_dtype(scheme: str) -> jnp.dtype:
    return jnp.dtype(_STORAGE[scheme])


def group_size(width: int, name: str = "a weight") -> int:
    """int4 group along an input axis of `width`: 128, or the largest divisor of `width` below it (at least 8)."""
    for g in range(min(MAX_GROUP, width), MIN_GROUP - 1, -1):
        if width % g == 0:
            return g
    raise ValueError(f"int4: {name} has input width {width}, which no group size from {MIN_GROUP} to {MAX_GROUP} "
                     "divides; quantize int8 instead")


def scale_shape(shape: Sequence[int], contract: Sequence[int], scheme: str, name: str = "a weight"
                ) -> tuple[int, ...]:
    """The scale's shape for an array of `shape` contracted over axes `contract` (the last one is grouped in int4)."""
    out = list(shape)
    if scheme == "int8":
        for a in contract:
            out[a] = 1
    else:
        last = contract[-1]
        out[last] = shape[last] // group_size(shape[last], name)
    return tuple(out)


def _split(shape: Sequence[int], sshape: Sequence[int]) -> tuple[int, ...]:
    """[n0, n1, ..] -> [s0, n0/s0, s1, n1/s1, ..]: each scale entry's block on the odd axes."""
    return tuple(d for n, s in zip(shape, sshape, strict=True) for d in (s, n // s))


def quantize(w: jax.Array, sshape: Sequence[int], scheme: str, scale_dtype: jnp.dtype = jnp.float32
             ) -> tuple[jax.Array, jax.Array]:
    """Symmetric quantization of `w` with one scale per block: (values, scale of `sshape`)."""
    shape = w.shape
    blocks = jnp.asarray(w, jnp.float32).reshape(_split(shape, sshape))
    odd = tuple(range(1, 2 * len(shape), 2))
    amax = jnp.max(jnp.abs(blocks), axis=odd, keepdims=True)
    scale = (amax / _QMAX[scheme]).astype(scale_dtype)
    # Divide by the stored (rounded) scale, so that values * scale is the best the stored pair can give.
    safe = jnp.where(scale == 0, 1, scale).astype(jnp.float32)
    q = jnp.clip(jnp.round(blocks / safe), -_QMAX[scheme], _QMAX[scheme]).astype(storage_dtype(scheme))
    return q.reshape(shape), scale.reshape(sshape)


def dequantize(q: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """values * scale in `dtype`, of `q`'s shape."""
    split = _split(q.shape, scale.shape)
    s = scale.reshape(tuple(d if i % 2 == 0 else 1 for i, d in enumerate(split)))
    return (q.reshape(split).astype(dtype) * s.astype(dtype)).reshape(q.shape)


def _unfused(w: jax.Array) -> jax.Array:
    # XLA:CPU fuses the int8 -> float convert into the dot and runs it as a slow generic loop: 8.3 ms against 0.8 ms
    # for the float32 matvec at the 1B MLP shape (docs/quantization.md); converting first, then an ordinary dot,
    # takes 3.1 ms. Other backends fuse it well, so only the CPU lowering gets the barrier.
    return jax.lax.platform_dependent(w, cpu=jax.lax.optimization_barrier, default=lambda a: a)


def dot(x: jax.Array, q: jax.Array, scale: jax.Array, n_in: int) -> jax.Array:
    """x [..., in...] contracted with a quantized kernel [in..., out...] over its `n_in` input axes, in x's dtype.
    One scale per output channel (int8) is applied after the dot; grouped scales (int4) before it."""
    if all(d == 1 for d in scale.shape[:n_in]):
        y = contract(x, _unfused(q.astype(x.dtype)), n_in)
        return y * scale.reshape(scale.shape[n_in:]).astype(x.dtype)
    return contract(x, _unfused(dequantize(q, scale, x.dtype)), n_in)


def nbytes(shape: Sequence[int], dtype: jnp.dtype) -> int:
    """Bytes of an array; int4 packs two values a byte."""
    d = jnp.dtype(dtype)
    return math.ceil(math.prod(shape) * d.itemsize / 2) if d == jnp.int4 else math.prod(shape) * d.itemsize


def quantize_tree(flat: dict[str, jax.Array], target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Float parameters (flat paths) -> the quantized tree `target` (`abstract_params(..., quant=)`, flat), in one
    compiled program (the loaders quantize one parameter at a time instead: `quantize_param`)."""
    def run(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
        out = {}
        for path, w in flat.items():
            if path + SCALE in target:
                s = target[path + SCALE]
                out[path], out[path + SCALE] = quantize(w, s.shape, _scheme(target[path].dtype), s.dtype)
            else:
                out[path] = w
        return out

    return jax.jit(run)(flat)


def _scheme(dtype: jnp.dtype) -> str:
    return next(k for k, v in _STORAGE.items() if jnp.dtype(v) == dtype)


def float_specs(target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.ShapeDtypeStruct]:
    """The float parameters a quantized tree is made from: each quantized weight in its scale's dtype."""
    return {p: jax.ShapeDtypeStruct(s.shape, target[p + SCALE].dtype) if p + SCALE in target else s
            for p, s in target.items() if not p.endswith(SCALE)}


def quantize_param(path: str, w: jax.Array, target: dict[str, jax.ShapeDtypeStruct],
                   shardings: dict[str, jax.sharding.Sharding] | None = None) -> dict[str, jax.Array]:
    """One float parameter as `target` holds it: {path: values, path + SCALE: scale} when quantized, else {path: w};
    placed with `shardings` when given (the scale follows its weight's logical axes)."""
    if path + SCALE not in target:
        return {path: w}
    s = target[path + SCALE]
    scheme = _scheme(target[path].dtype)
    out = None if shardings is None else (shardings[path], shardings[path + SCALE])
    q, scale = _quantize_fn(tuple(s.shape), scheme, jnp.dtype(s.dtype), out)(w)
    return {path: q, path + SCALE: scale}


@functools.lru_cache(maxsize=256)
def _quantize_fn(sshape: tuple[int, ...], scheme: str, scale_dtype: jnp.dtype, out_shardings: tuple | None
                 ) -> Callable:
    """Jitted `quantize` (on a mesh each device quantizes its own block)."""
    return jax.jit(lambda w: quantize(w, sshape, scheme, scale_dtype), out_shardings=out_shardings)
