"""Build one of our parameters as a `jax.Array` in its target sharding, straight from the source tensors.

Each device's shard is filled on the host from only the layers it covers, put on that device, and
dropped before the next shard is read: the host holds one shard plus one layer's tensor at a time (for an
unstacked parameter such as the embedding, the whole tensor), never the model.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable

import jax
import numpy as np

from convert.source import Source
from internvl_jax import weights
from internvl_jax.safetensors_io import CheckpointError

Index = tuple[slice, ...]


def host_shard(source: Source, path: str, shape: tuple[int, ...], dtype: np.dtype, index: Index,
               on_read: Callable[[int], None] | None = None) -> np.ndarray:
    """The block `index` of parameter `path` (our layout, `dtype`), read layer by layer from `source`."""
    m = weights.mapping(path)
    if not m.stacked:
        return _ours(source, path, None, shape, dtype, on_read)[index]
    layers = range(*index[0].indices(shape[0]))
    rest = index[1:]
    out = np.empty((len(layers), *(len(range(*s.indices(n))) for s, n in zip(rest, shape[1:], strict=True))), dtype)
    for j, i in enumerate(layers):
        # The whole layer is converted, then cut: the transposes need it, and a layer is small next to a model.
        out[j] = _ours(source, path, i, shape[1:], dtype, on_read)[rest]
    return out


def _ours(source: Source, path: str, layer: int | None, shape: tuple[int, ...], dtype: np.dtype,
          on_read: Callable[[int], None] | None) -> np.ndarray:
    key = source.key(path, layer)
    stored = source.reader.shape(key) if key in source.reader else None
    rows = weights.padded_rows(weights.mapping(path), stored[0], shape) if stored else None
    tensor = source.tensor(path, layer, rows)
    if on_read is not None:
        on_read(math.prod(stored or tensor.shape) * tensor.dtype.itemsize)  # the bytes read, not the padding
    if dtype.itemsize < tensor.dtype.itemsize:
        tensor = tensor.astype(dtype)  # narrow first, so the layout copy below is the smaller one
    try:
        out = weights.to_ours(weights.mapping(path), tensor, tuple(shape))
    except ValueError as e:
        raise CheckpointError(f"{source.directory}: tensor {source.key(path, layer)!r} has shape "
                              f"{tuple(tensor.shape)}, which does not fit the config's {tuple(shape)} for "
                              f"parameter {path!r} ({e})") from e
    return out.astype(dtype, copy=False)


def build_param(source: Source, path: str, spec: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding,
                on_read: Callable[[int], None] | None = None) -> jax.Array:
    """Parameter `path` as a jax.Array of `spec` placed with `sharding`, one distinct shard at a time."""
    shape = tuple(spec.shape)
    index_map = sharding.addressable_devices_indices_map(shape)
    # Devices holding the same block (replicas) share one host read.
    groups: dict[tuple, list[jax.Device]] = {}
    indices: dict[tuple, Index] = {}
    for device, index in index_map.items():
        key = tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
        groups.setdefault(key, []).append(device)
        indices[key] = index
    placed: dict[jax.Device, jax.Array] = {}
    for n, (key, devices) in enumerate(groups.items()):
        # Progress counts the first block's reads only: layers are never split across devices, so it reads
        # every byte of the parameter once; other blocks re-read the same tensors.
        block = host_shard(source, path, shape, np.dtype(spec.dtype), indices[key], on_read if n == 0 else None)
        for device in devices:
            placed[device] = jax.device_put(block, device)
        # Free the host block before the next one is read (or orbax makes its own host copy to write it): wait for
        # the asynchronous copies, then collect the youngest generation, since jax (0.10, CPU) still holds the
        # source through a fresh reference cycle after the copy; without this a host copy of the parameter
        # outlives its transfer. (Generation 0 only: a full collection costs ~0.3 s with torch loaded.)
        jax.block_until_ready([placed[d] for d in devices])
        del block
        gc.collect(0)
    arrays = [placed[d] for d in index_map]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
