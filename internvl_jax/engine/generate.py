"""Compiled generation: bucketed prefill into a static KV cache, then a decode loop that stays on device.

Shapes are bucketed so that a stream of different prompts compiles a handful of programs:
- prompt length: powers of two from 16 and the halfway steps between them (16, 24, 32, 48, 64, 96, ...; the
  prompt is left padded into its bucket): at most a third of a prefill is padding, two programs an octave;
- batch: powers of two (extra rows are empty and start finished);
- image tiles: 0 or powers of two (extra tiles are zeros whose features are never placed);
- cache slots: the power of two >= prompt bucket + max_new_tokens.
Rows are left padded; each row's positions count its real tokens only (cumsum of the mask - 1, as
transformers' generate), so a row gives the same tokens alone or in any batch.

The decode loop is one `lax.while_loop`: choose the next token, stop rows that produced an EOS id, feed
the token back. It ends on device when every row has finished or `max_new_tokens` is reached. Streaming
runs the same compiled loop in chunks of a few tokens and hands each chunk to the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from internvl_jax.config import InternVLConfig
from internvl_jax.engine import layer_loop
from internvl_jax.engine.sampling import SamplingConfig
from internvl_jax.engine.step import DecodeState, advanced, choose_next
from internvl_jax.engine.vision import image_features
from internvl_jax.inputs import ModelInputs
from internvl_jax.model.attention import KeyMask
from internvl_jax.model.decoder import KVCache
from internvl_jax.model.internvl import InternVLModule, feature_rows
from internvl_jax.sharding import batch_sharding, cache_shardings

Params = dict[str, Any]

MIN_PROMPT_BUCKET = 16
STREAM_CHUNK = 8


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def prompt_bucket(n: int) -> int:
    """The prefill length a prompt of n tokens is padded to: the smallest power of two or 1.5 x a power of two >=
    max(n, MIN_PROMPT_BUCKET). Powers of two alone padded a 1-tile prompt of 324 tokens to 512, a 1.58x prefill
    (torch pads nothing); here it is 384."""
    p = bucket(n, MIN_PROMPT_BUCKET)
    return p * 3 // 4 if p > MIN_PROMPT_BUCKET and max(n, MIN_PROMPT_BUCKET) <= p * 3 // 4 else p


class Streamer(Protocol):
    """transformers' streamer interface: `put` gets new token ids [batch, n], `end` is called once."""

    def put(self, tokens: np.ndarray) -> None: ...
    def end(self) -> None: ...


# ----- memory -----
def free_memory_bytes(device: jax.Device) -> int | None:
    """Bytes still free on `device` (host RAM for CPU devices); None when it cannot be told."""
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend reports memory
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None


def check_cache_fits(cfg: InternVLConfig, batch: int, slots: int, dtype: jnp.dtype,
                     device: jax.Device | None = None) -> int:
    """Raise MemoryError (before allocating) when the KV cache would not fit; returns its size in bytes."""
    t = cfg.text
    cache = KVCache.abstract(t, batch, slots, dtype)
    need = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    need += batch * t.vocab_size * (4 + 1)  # next-token logits and the repetition-penalty mask
    device = device or jax.local_devices()[0]
    free = free_memory_bytes(device)
    if free is not None and need > free:
        raise MemoryError(
            f"the KV cache for batch {batch} x {slots} slots ({t.num_layers} layers x {t.num_kv_heads} KV heads x "
            f"{t.head_dim} x 2, {jnp.dtype(dtype).name}) needs {need / 2**30:.2f} GiB but only "
            f"{free / 2**30:.2f} GiB is free on {device}; lower the batch size or max_new_tokens")
    return need


def max_length(cfg: InternVLConfig) -> int:
    """Longest sequence (prompt + new tokens) the model takes: dynamic NTK RoPE stretches it by its factor."""
    t = cfg.text
    return int(t.max_position_embeddings * (t.rope_factor if t.rope_type == "dynamic" else 1))


# ----- compiled programs -----
@functools.lru_cache(maxsize=8)
def _prefill_fn(module: InternVLModule) -> Callable:
    def prefill(params, ids, pixels, positions, kv_mask, cache, feature_rows):
        features = None if pixels is None else image_features(module, params, pixels)
        # A prefill starts the cache (slot 0): its layers read no cached key, only the prompt's own.
        mask = KeyMask(jnp.zeros(ids.shape[:1], jnp.int32), kv_mask, kv_mask[:, : ids.shape[1]])
        logits, cache = module.apply({"params": params}, ids, None, positions, mask, cache, logits_to_keep=1,
                                     feature_rows=feature_rows, features=features)
        return logits[:, -1], cache

    return jax.jit(prefill, donate_argnums=(5,))


@functools.lru_cache(maxsize=32)
def _decode_fn(module: InternVLModule, sampling: SamplingConfig) -> Callable:
    """The on-device loop. `sampling` (static) holds everything but the seed and max_new_tokens."""

    def decode(params, cache: KVCache, state: DecodeState, limit: jax.Array) -> tuple[KVCache, DecodeState]:
        def cond(carry: tuple[KVCache, DecodeState]) -> jax.Array:
            _, st = carry
            return (st.step < limit) & ~jnp.all(st.done)

        def body(carry: tuple[KVCache, DecodeState]) -> tuple[KVCache, DecodeState]:
            cache, st = carry
            st, tok, mask = choose_next(st, cache.slot, sampling)
            logits, cache = module.apply({"params": params}, tok[:, None], None, st.positions[:, None], mask, cache)
            return cache, advanced(st, logits)

        return jax.lax.while_loop(cond, body, (cache, state))

    return jax.jit(decode, donate_argnums=(1, 2))


def decode_loop(module: InternVLModule, params: Params, sampling: SamplingConfig, mesh: Mesh | None) -> Callable:
    """`decode(params, cache, state, limit) -> (cache, state)`: the loop that runs the decode steps.

    On one CPU device, the host-driven layer loop (`layer_loop`): inside one program XLA:CPU copies each scanned
    layer's weights out of the stack before using them, which the layer loop avoids (2x faster batch-1 decode).
    Everywhere else (a mesh, several processes, GPU, TPU) and where the weights cannot be viewed in place, the
    on-device `lax.while_loop`.
    """
    host_loop = layer_loop.decoder(module, params, sampling) if mesh is None else None
    return host_loop or _decode_fn(module, sampling)


# ----- host driver -----
@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """Bucketed shapes of one generate call; every process of a multi-host run uses the same."""

    rows: int  # rows each process contributes (its real rows, then empty ones)
    length: int  # prompt slots
    tiles: int  # tiles each process contributes
    slots: int  # KV cache slots
    processes: int = 1
    real_rows: tuple[int, ...] = (0,)  # real rows of each process


def plan_layout(b: int, t: int, n_tiles: int, max_new: int, mesh: Mesh | None) -> Layout:
    """Shapes for this call. With several processes they agree on the largest local sizes first."""
    processes = jax.process_count() if mesh is not None else 1
    real_rows: tuple[int, ...] = (b,)
    if processes > 1:
        from jax.experimental import multihost_utils

        stats = np.asarray(multihost_utils.process_allgather(np.array([b, t, n_tiles], np.int32))).reshape(-1, 3)
        real_rows = tuple(int(r) for r in stats[:, 0])
        b, t, n_tiles = (int(x) for x in stats.max(axis=0))
    rows, tiles = bucket(b), bucket(n_tiles) if n_tiles else 0
    if mesh is not None:
        data = mesh.shape.get("data", 1)
        if processes > 1 and data % processes:
            raise ValueError(f"a {processes}-process generate needs the mesh's data axis ({data}) to be a multiple "
                             "of the process count: each process feeds its own rows")
        need = data // math.gcd(data, processes)  # rows (and tiles) per process so the data axis divides them
        rows = -(-rows // need) * need
        tiles = -(-tiles // need) * need if tiles else 0
    length = prompt_bucket(t)
    return Layout(rows=rows, length=length, tiles=tiles, slots=bucket(length + max_new, 64), processes=processes,
                  real_rows=real_rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prepared:
    """This process's block of every per-row input (bucketed, left padded)."""

    ids: np.ndarray  # [rows, length]
    kv_mask: np.ndarray  # [rows, slots]
    positions: np.ndarray  # [rows, length]
    feature_rows: np.ndarray  # [rows, length]: feature row of each image token in the global tile array
    pixels: np.ndarray | None  # [tiles, 3, H, W]


def prepare(cfg: InternVLConfig, inputs: ModelInputs, lay: Layout, pad: int, max_new: int) -> Prepared:
    ids, mask, pixels = inputs.ids, inputs.mask, inputs.pixels
    b, t = ids.shape
    lengths = mask.sum(axis=1)
    if (lengths == 0).any():
        raise ValueError(f"row(s) {np.flatnonzero(lengths == 0).tolist()} of the prompt are empty")
    limit = max_length(cfg)
    if int(lengths.max()) + max_new > limit:
        raise ValueError(f"prompt of {int(lengths.max())} tokens + max_new_tokens {max_new} exceeds the model's "
                         f"maximum length {limit}")
    tb = lay.length
    full_ids = np.full((lay.rows, tb), pad, np.int32)
    full_ids[:b, tb - t:] = ids
    kv_mask = np.zeros((lay.rows, lay.slots), bool)
    kv_mask[:b, tb - t: tb] = mask.astype(bool)
    positions = np.zeros((lay.rows, tb), np.int32)
    positions[:b, tb - t:] = np.maximum(np.cumsum(mask, axis=1) - 1, 0) * mask
    # This process's tiles sit at block `process_index` of the global tile array.
    offset = jax.process_index() * lay.tiles * cfg.image_seq_length if lay.processes > 1 else 0
    image_rows = feature_rows(full_ids, cfg.image_token_id, offset)
    if lay.tiles:
        padded = np.zeros((lay.tiles, *cfg_pixel_shape(cfg, pixels)), np.float32 if pixels is None else pixels.dtype)
        if pixels is not None:
            padded[: pixels.shape[0]] = pixels
        pixels = padded
    return Prepared(ids=full_ids, kv_mask=kv_mask, positions=positions, feature_rows=image_rows, pixels=pixels)


def cfg_pixel_shape(cfg: InternVLConfig, pixels: np.ndarray | None) -> tuple[int, ...]:
    if pixels is not None:
        return tuple(pixels.shape[1:])
    v = cfg.vision
    return (v.num_channels, v.image_size, v.image_size)


def to_global(local: np.ndarray, mesh: Mesh | None, processes: int) -> jax.Array:
    """A per-row host block -> a device array split over the data axis (global over processes)."""
    if mesh is None:
        return jnp.asarray(local)
    shape = (local.shape[0] * processes, *local.shape[1:])
    sharding = batch_sharding(mesh, shape)
    if processes == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, shape)


def gather_rows(x: jax.Array, lay: Layout) -> np.ndarray:
    """Device rows -> host, every process's real rows in process order (multi-host: all-gathered)."""
    if lay.processes == 1:
        return np.asarray(x[: lay.real_rows[0]])
    from jax.experimental import multihost_utils

    full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.concatenate([full[p * lay.rows: p * lay.rows + n] for p, n in enumerate(lay.real_rows)])


def host_scalar(x: jax.Array) -> int:
    return int(np.asarray(x.addressable_data(0)))


def generate(module: InternVLModule, params: Params, inputs: ModelInputs, sampling: SamplingConfig,
             mesh: Mesh | None = None, streamer: Streamer | None = None) -> np.ndarray:
    """transformers-style generate: [b, prompt + new] ids, rows padded with the pad id after they end.

    In a multi-process run each process passes its own rows; the result holds every process's rows in
    process order (prompts left padded to the longest)."""
    chunks = list(stream(module, params, inputs, sampling, mesh, streamer=streamer))
    ids = inputs.ids
    if jax.process_count() > 1 and mesh is not None:
        ids = _gather_prompts(ids, sampling.pad_id)
    new = np.concatenate(chunks, axis=1) if chunks else np.zeros((ids.shape[0], 0), np.int32)
    return np.concatenate([ids.astype(np.int64), new.astype(np.int64)], axis=1)


def _gather_prompts(ids: np.ndarray, pad: int) -> np.ndarray:
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.array(ids.shape, np.int32))).reshape(-1, 2)
    rows, width = int(counts[:, 0].max()), int(counts[:, 1].max())
    block = np.full((rows, width), pad, np.int64)
    block[: ids.shape[0], width - ids.shape[1]:] = ids
    full = np.asarray(multihost_utils.process_allgather(block, tiled=True))
    return np.concatenate([full[p * rows: p * rows + int(n)] for p, n in enumerate(counts[:, 0])])


def stream(module: InternVLModule, params: Params, inputs: ModelInputs, sampling: SamplingConfig,
           mesh: Mesh | None = None, streamer: Streamer | None = None, chunk: int | None = None
           ) -> Iterator[np.ndarray]:
    """Yield new tokens [b, n] as they are produced (chunks of `chunk` steps; all at once when None and no
    streamer is given). `inputs` are checked (`inputs.check_inputs`); `params` are laid out on `mesh` when given."""
    cfg, dtype = module.cfg, module.cache_dtype
    lay = plan_layout(inputs.ids.shape[0], inputs.ids.shape[1],
                      0 if inputs.pixels is None else inputs.pixels.shape[0], sampling.max_new_tokens, mesh)
    prep = prepare(cfg, inputs, lay, sampling.pad_id, sampling.max_new_tokens)
    total = lay.rows * lay.processes
    check_cache_fits(cfg, total // (mesh.shape.get("data", 1) if mesh is not None else 1), lay.slots, dtype)

    def put(x: np.ndarray) -> jax.Array:
        return to_global(x, mesh, lay.processes)

    def zeros() -> KVCache:
        return KVCache.zeros(cfg.text, total, lay.slots, dtype)

    # On a mesh the cache is allocated in place, already split as the rules table says.
    cache = zeros() if mesh is None else jax.jit(
        zeros, out_shardings=cache_shardings(cfg, mesh, total, lay.slots, dtype))()
    pixels_dev = None if prep.pixels is None else put(prep.pixels)
    logits, cache = _prefill_fn(module)(params, put(prep.ids), pixels_dev, put(prep.positions), put(prep.kv_mask),
                                        cache, put(prep.feature_rows))
    real_rows = inputs.ids.shape[0]
    seen_width = cfg.text.vocab_size if sampling.repetition_penalty != 1.0 else 0
    seen = np.zeros((lay.rows, seen_width), bool)
    if seen_width:  # transformers penalises every id of the prompt as given, its padding included
        np.put_along_axis(seen[:real_rows], inputs.ids.astype(np.int64), True, axis=1)
    state = DecodeState(kv_mask=put(prep.kv_mask), logits=logits, positions=put(prep.positions[:, -1] + 1),
                        tokens=put(np.zeros((lay.rows, lay.slots), np.int32)), step=np.int32(0),
                        done=put(np.arange(lay.rows) >= real_rows), key=np.asarray(jax.random.PRNGKey(sampling.seed)),
                        seen=put(seen))
    decode = decode_loop(module, params, dataclasses.replace(sampling, seed=0, max_new_tokens=1), mesh)
    step = chunk or (STREAM_CHUNK if streamer is not None else sampling.max_new_tokens)
    emitted = 0
    while emitted < sampling.max_new_tokens:
        limit = min(emitted + step, sampling.max_new_tokens)
        cache, state = decode(params, cache, state, np.int32(limit))
        reached = host_scalar(state.step)
        if reached > emitted:
            new = gather_rows(state.tokens[:, emitted:reached], lay)
            if streamer is not None:
                streamer.put(new)
            yield new
            emitted = reached
        if reached < limit or host_scalar(jnp.all(state.done)):
            break
    if streamer is not None:
        streamer.end()
