"""Compiled plans: XLA's own numbers for a config on a TPU topology, compiled on this machine (nothing runs).

libtpu compiles for a named topology ("v5e:2x4") without the chips (`jax.experimental.topologies`), on abstract
weights and caches that carry their shardings, so nothing is allocated. From the compiled programs come the
per-chip argument, output and temporary bytes (`memory_analysis`) and flops and bytes accessed (`cost_analysis`).

XLA:TPU's cost analysis counts a while loop's body once, whatever its trip count (a scan over 24 layers reads as
one layer; docs/tpu.md), so its "bytes accessed" of a decode step is not the step's HBM traffic. What shows a
copied cache or copied weights is the program itself: its temporary bytes (a copied cache lives there) and its
`copy` instructions, which `decode_bytes` reports next to the raw count.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from internvl_jax.config import InternVLConfig
from internvl_jax.engine.step import slot_mask
from internvl_jax.model.decoder import Decoder, KVCache
from internvl_jax.model.params import abstract_params, as_dtype
from internvl_jax.sharding import MESH_AXES, batch_sharding, cache_shardings, param_shardings
from internvl_jax.weights import flatten_paths, unflatten_paths

Params = dict[str, Any]
TPU_EXTRA = "pip install -e '.[tpu]'"


class TargetError(ValueError):
    """A target, topology or mesh that cannot be compiled for (the CLI prints it as one line, exit 2)."""


def _quiet_libtpu() -> None:
    """libtpu looks for TPU hosts and logs at length when there are none: it only compiles here."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # any valid name: compile-only, never run
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lock file


def has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def tpu_devices(topology: str) -> list[jax.Device]:
    """Compile-only devices of a TPU topology such as "v5e:2x4" or "v5p:2x2x2"."""
    if not has_libtpu():
        raise TargetError(f"target tpu:{topology} needs libtpu: {TPU_EXTRA}")
    _quiet_libtpu()
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu's message is long; the name is what the user got wrong
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TargetError(f"TPU topology {topology!r} is not known to libtpu ({first[:160]}); "
                          "e.g. v5e:2x4, v4:2x2x1, v5p:2x2x2, v6e:2x4") from None
    return list(topo.devices)


def target_mesh(devices: list[jax.Device], sizes: Mapping[str, int], target: str) -> Mesh:
    """The mesh over all of a topology's chips; its axis sizes must multiply to their number."""
    sizes = dict(sizes)
    rest = [a for a, n in sizes.items() if n == -1]
    known = math.prod(n for n in sizes.values() if n != -1)
    if rest and len(devices) % known == 0:
        sizes[rest[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        mesh = ",".join(f"{a}={n}" for a, n in sizes.items() if n != 1) or "1 device"
        raise TargetError(f"--mesh {mesh} has {total} devices but target {target} has {len(devices)} chips")
    return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def _on(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_params_on(config: InternVLConfig, mesh: Mesh, dtype: str) -> Params:
    """The parameter tree as ShapeDtypeStructs carrying their shardings on `mesh`."""
    flat = flatten_paths(abstract_params(config, dtype))
    shard = param_shardings(config, mesh, dtype)
    return unflatten_paths({p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shard[p]) for p, s in flat.items()})


def per_chip_bytes(a: jax.ShapeDtypeStruct) -> int:
    """Bytes one chip holds of an abstract array with a NamedSharding."""
    return math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize


def decode_step(config: InternVLConfig, mesh: Mesh, batch: int, slots: int, dtype: str
                ) -> jax.stages.Compiled:
    """One decode step of the language model (embed, every layer, the head) for `batch` rows and a cache of
    `slots`, compiled for `mesh`; the cache is donated, as in the decode loop."""
    d = as_dtype(dtype)
    dec = Decoder(config.text, config.tie_word_embeddings, d, d)
    text = abstract_params_on(config, mesh, dtype)["text"]
    cache = _on(KVCache.abstract(config.text, batch, slots, d), cache_shardings(config, mesh, batch, slots))

    def arg(shape: tuple[int, ...], dt: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding(mesh, shape))

    def step(p: Params, tok: jax.Array, pos: jax.Array, kv_mask: jax.Array, cache: KVCache):
        mask = slot_mask(cache.slot[None], kv_mask)
        x = dec.apply({"params": p}, tok, method=Decoder.embed)
        hidden, cache = dec.apply({"params": p}, x, pos, mask, cache)
        return dec.apply({"params": p}, hidden, method=Decoder.logits), cache

    args = (text, arg((batch, 1), jnp.int32), arg((batch, 1), jnp.int32), arg((batch, slots), bool), cache)
    return jax.jit(step, donate_argnums=(4,)).lower(*args).compile()


def cost(compiled: jax.stages.Compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    return dict(ca[0] if isinstance(ca, list) else ca)


_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
               "s64": 8}
_COPY = re.compile(r"= (\w+)\[([\d,]*)\]\S* copy(?:-start)?\(")


def copied_bytes(hlo: str) -> list[int]:
    """Sizes of the arrays the optimized HLO copies (`copy`, `copy-start`), largest first."""
    sizes = [math.prod(int(d) for d in dims.split(",") if d) * _ITEM_BYTES.get(dt, 4)
             for dt, dims in _COPY.findall(hlo)]
    return sorted(sizes, reverse=True)


@dataclasses.dataclass(frozen=True)
class DecodeBytes:
    """One decode step per chip: what XLA reports against what the step must read."""

    accessed: float  # XLA's bytes accessed (the layer loop's body counted once: see the module's docstring)
    weights: int  # weights the step reads per chip (every layer and the head; not the embedding table)
    cache: int  # KV cache per chip (keys and values)
    layer_cache: int  # one layer's share of the cache
    temp: int  # XLA's temporary bytes per chip: a copied cache shows here
    copies: tuple[int, ...]  # sizes of the copies in the program, largest first

    @property
    def ratio(self) -> float:
        """XLA's bytes accessed / (weights + cache): not the step's traffic while the loop counts once."""
        return self.accessed / (self.weights + self.cache)

    @property
    def cache_copies(self) -> int:
        """Copies of at least one layer's cache slice: none when the cache is read where it lies."""
        return sum(c >= self.layer_cache for c in self.copies)


def decode_bytes(config: InternVLConfig, mesh: Mesh, batch: int, slots: int, dtype: str = "bfloat16"
                 ) -> DecodeBytes:
    """Compile one decode step for `mesh` and report its bytes per chip."""
    step = decode_step(config, mesh, batch, slots, dtype)
    text = flatten_paths(abstract_params_on(config, mesh, dtype)["text"])
    table = set() if config.tie_word_embeddings else {"text/embedding"}  # only `batch` rows of it are read
    cache = _on(KVCache.abstract(config.text, batch, slots, as_dtype(dtype)),
                cache_shardings(config, mesh, batch, slots))
    cache_bytes = per_chip_bytes(cache.k) + per_chip_bytes(cache.v)
    return DecodeBytes(accessed=cost(step)["bytes accessed"],
                       weights=sum(per_chip_bytes(a) for p, a in text.items() if p not in table),
                       cache=cache_bytes, layer_cache=cache_bytes // config.text.num_layers,
                       temp=int(step.memory_analysis().temp_size_in_bytes), copies=tuple(copied_bytes(step.as_text())))
