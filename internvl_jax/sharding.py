"""Meshes, and the shardings of parameters, caches and inputs that the rules table (`internvl_jax.rules`: one
place for every logical axis, weights and activations alike) gives them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internvl_jax.config import InternVLConfig
from internvl_jax.model.decoder import KVCache
from internvl_jax.model.params import abstract_params
from internvl_jax.rules import MESH_AXES, RULES, spec_for  # noqa: F401  (RULES, spec_for: read here by others too)
from internvl_jax.weights import flatten_paths


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """"data=2,tensor=4" (or a dict) -> every mesh axis's size; missing axes are 1, one axis may be -1."""
    sizes = {a: 1 for a in MESH_AXES}
    items = list(spec.items()) if isinstance(spec, Mapping) else [p.split("=") for p in spec.split(",") if p.strip()]
    for item in items:
        if len(item) != 2:
            raise ValueError(f"mesh {spec!r}: expected AXIS=SIZE pairs such as data=2,tensor=4 "
                             f"(axes {', '.join(MESH_AXES)})")
        name, value = str(item[0]).strip(), item[1]
        if name not in sizes:
            raise ValueError(f"mesh axis {name!r} is not one of {MESH_AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: size {value!r} of axis {name!r} is not a whole number") from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise ValueError(f"mesh {spec!r}: axis {name!r} has size {sizes[name]}; sizes are >= 1 (or -1: the rest)")
    if sum(n == -1 for n in sizes.values()) > 1:
        raise ValueError("at most one mesh axis may be -1")
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from "data=2,tensor=4" (missing axes get size 1; one axis may be -1 = the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_spec({"data": len(devices)} if spec is None else spec)
    rest = [a for a, n in sizes.items() if n == -1]
    known = math.prod(n for n in sizes.values() if n != -1)
    if rest:
        sizes[rest[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(f"mesh {sizes} has {total} devices but {len(devices)} are available")
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_axes(config: InternVLConfig, dtype: str = "float32", quant: str | None = None
                 ) -> dict[str, tuple[str | None, ...]]:
    """Our parameter path -> its logical axes (from the modules' declarations; a quantized weight's scale has its
    weight's axes)."""
    flat = flatten_paths(abstract_params(config, dtype, boxed=True, quant=quant))
    return {p: tuple(v.names) if isinstance(v, nn.Partitioned) else (None,) * len(v.shape) for p, v in flat.items()}


def param_shardings(config: InternVLConfig, mesh: Mesh, dtype: str = "float32", quant: str | None = None
                    ) -> dict[str, NamedSharding]:
    """Our parameter path -> NamedSharding on `mesh` (`quant`: of the quantized tree)."""
    shapes = flatten_paths(abstract_params(config, dtype, quant=quant))
    axes = logical_axes(config, dtype, quant)
    return {p: NamedSharding(mesh, spec_for(shapes[p].shape, axes[p], mesh)) for p in shapes}


def cache_sharding(config: InternVLConfig, mesh: Mesh, batch: int, slots: int) -> NamedSharding:
    """Sharding of the KV cache's keys (and values), from the cache's declared axes (`KVCache.AXES`)."""
    return NamedSharding(mesh, spec_for(KVCache.shape(config.text, batch, slots), KVCache.AXES, mesh))


def cache_shardings(config: InternVLConfig, mesh: Mesh, batch: int, slots: int, dtype: object = None) -> KVCache:
    """The whole cache's shardings (its slot counter is a replicated scalar; an int8 cache's scales split as its
    keys, their size-1 last axis replicated)."""
    kv = cache_sharding(config, mesh, batch, slots)
    scale = None
    if dtype is not None and np.dtype(dtype) == np.int8:
        shape = (*KVCache.shape(config.text, batch, slots)[:-1], 1)
        scale = NamedSharding(mesh, spec_for(shape, KVCache.AXES, mesh))
    return KVCache(kv, kv, NamedSharding(mesh, PartitionSpec()), scale, scale)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Rows over the data axis (when it divides them), everything else replicated."""
    return NamedSharding(mesh, spec_for(shape, ("batch",) + (None,) * (len(shape) - 1), mesh))


def shard_shape(shape: Sequence[int], spec: PartitionSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Per-device shape of an array with this spec."""
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        out.append(dim // (int(sizes.get(axis, 1)) if axis else 1))
    return tuple(out)
