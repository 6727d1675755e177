"""`InternVL`: the model with its parameters, loaded from a checkpoint, called like transformers' model."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import checkpoint, weights
from internvl_jax.config import InternVLConfig
from internvl_jax.engine.sampling import SamplingConfig
from internvl_jax.hub import resolve
from internvl_jax.model.decoder import KVCache
from internvl_jax.model.internvl import InternVLModule
from internvl_jax.safetensors_io import CheckpointError, SafetensorsDir

log = logging.getLogger(__name__)

Params = dict[str, Any]
DTypeLike = str | jnp.dtype | type


def as_dtype(dtype: DTypeLike) -> jnp.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype {dtype!r} is not a dtype name (float32, bfloat16, float16)") from e
    if d not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype {dtype!r}: parameters must be float32, bfloat16 or float16")
    return d


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """[b, t] padding mask -> [b, t, t]: query i sees key j <= i that is not padding."""
    t = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


class InternVL:
    """InternVL3 in JAX. `model(input_ids, pixel_values, attention_mask)` returns logits [b, t, vocab]."""

    def __init__(self, config: InternVLConfig, params: Params, dtype: DTypeLike = "float32"):
        self.config = config
        self.dtype = as_dtype(dtype)
        self.module = InternVLModule(config, self.dtype, self.dtype)
        self.params = params
        self.generation_config = SamplingConfig()
        self.mesh: jax.sharding.Mesh | None = None  # set when the parameters are laid out on a mesh

    # ----- construction -----
    @staticmethod
    def abstract_params(config: InternVLConfig, dtype: DTypeLike = "float32", boxed: bool = False) -> Params:
        """Parameter tree of ShapeDtypeStructs (no allocation). `boxed` keeps the logical-axis metadata."""
        module = InternVLModule(config, as_dtype(dtype), as_dtype(dtype))
        v = config.vision
        ids = jnp.zeros((1, 4), jnp.int32)
        pixels = jnp.zeros((1, v.num_channels, v.image_size, v.image_size), as_dtype(dtype))
        pos = jnp.zeros((1, 4), jnp.int32)
        mask = jnp.ones((1, 4, 4), bool)
        tree = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, pixels, pos, mask,
                                                  method=InternVLModule.init_all))["params"]
        return tree if boxed else nn.unbox(tree)

    @classmethod
    def from_config(cls, config: InternVLConfig, dtype: DTypeLike = "float32", seed: int = 0) -> InternVL:
        """Random weights of the configured shape (tests, benchmarks, family presets)."""
        module = InternVLModule(config, as_dtype(dtype), as_dtype(dtype))
        v = config.vision
        args = (jnp.zeros((1, 4), jnp.int32),
                jnp.zeros((1, v.num_channels, v.image_size, v.image_size), as_dtype(dtype)),
                jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4, 4), bool))
        init = jax.jit(lambda key: nn.unbox(module.init(key, *args, method=InternVLModule.init_all))["params"])
        return cls(config, init(jax.random.PRNGKey(seed)), dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: DTypeLike = "float32", mesh: jax.sharding.Mesh | None = None
                        ) -> InternVL:
        """Load a local `-hf` checkpoint directory (or a hub id, downloaded when online), or a directory written
        by the converter (`python -m convert`), restored straight into the mesh's shardings."""
        directory = resolve(path)
        config = InternVLConfig.from_pretrained(directory)
        reader = None if checkpoint.is_converted(directory) else SafetensorsDir(directory)
        if reader is not None:
            config = _untie_if_head_differs(config, reader)
        abstract = cls.abstract_params(config, dtype)
        shardings = None
        if mesh is not None:
            from internvl_jax.sharding import param_shardings

            shardings = param_shardings(config, mesh, dtype)
        if reader is None:
            params = checkpoint.restore_params(directory, abstract, shardings)
        else:
            params = load_params(reader, config, abstract, shardings)
        model = cls(config, params, dtype)
        model.generation_config = SamplingConfig.from_checkpoint(directory)
        model.mesh = mesh
        return model

    # ----- host-side input checks -----
    def _inputs(self, input_ids: Any, pixel_values: Any, attention_mask: Any
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers of shape [batch, length], got {ids.dtype} {ids.shape}")
        if ids.shape[1] == 0:
            raise ValueError("input_ids is empty (length 0)")
        vocab = self.config.text.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"input_ids holds ids outside [0, {vocab}): min {ids.min()}, max {ids.max()}")
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        n_tokens = int((ids == self.config.image_token_id).sum())
        pixels = None
        if pixel_values is not None:
            pixels = self._check_pixels(pixel_values)
            per_tile = self._tokens_per_tile(pixels.shape[-1])
            if n_tokens != pixels.shape[0] * per_tile:
                raise ValueError(
                    f"input_ids holds {n_tokens} image tokens (id {self.config.image_token_id}) but pixel_values "
                    f"has {pixels.shape[0]} tiles x {per_tile} tokens = {pixels.shape[0] * per_tile}")
        elif n_tokens:
            raise ValueError(f"input_ids holds {n_tokens} image tokens (id {self.config.image_token_id}) "
                             "but no pixel_values were given")
        return ids.astype(np.int32), pixels, mask.astype(np.int32)

    def _check_pixels(self, pixel_values: Any) -> np.ndarray:
        v = self.config.vision
        px = np.asarray(pixel_values)
        unit = v.patch_size * self.config.shuffle
        if px.ndim != 4 or px.shape[1] != v.num_channels or px.shape[2] != px.shape[3] or px.shape[2] % unit:
            raise ValueError(
                f"pixel_values must be [tiles, {v.num_channels}, S, S] with S a multiple of {unit} "
                f"(patch {v.patch_size} x pixel shuffle {self.config.shuffle}); got shape {px.shape}")
        if px.shape[0] == 0:
            raise ValueError("pixel_values has no tiles")
        return px.astype(self.dtype)

    def _tokens_per_tile(self, size: int) -> int:
        return (size // self.config.vision.patch_size // self.config.shuffle) ** 2

    # ----- forward passes -----
    def __call__(self, input_ids: Any, pixel_values: Any = None, attention_mask: Any = None,
                 logits_to_keep: int = 0, position_ids: Any = None) -> jax.Array:
        """Logits [b, t, vocab] (float32), for the same inputs transformers' forward takes.

        Without `position_ids` every row counts positions from its first slot (padding included), exactly
        as transformers' forward does; generation uses per-row positions instead (see the engine).
        """
        ids, pixels, mask = self._inputs(input_ids, pixel_values, attention_mask)
        positions = _positions(ids, position_ids)
        return _logits_fn(self.module, int(logits_to_keep))(self.params, ids, pixels, positions, mask)

    def get_image_features(self, pixel_values: Any) -> jax.Array:
        """[tiles, 3, H, W] -> [tiles, image tokens, text hidden] (vision tower, pixel shuffle, projector)."""
        return _image_fn(self.module)(self.params, self._check_pixels(pixel_values))

    def loss(self, input_ids: Any, labels: Any, pixel_values: Any = None, attention_mask: Any = None,
             params: Params | None = None) -> jax.Array:
        """Mean next-token cross entropy over labels != -100 (transformers' shift), differentiable in `params`.

        `jax.grad(lambda p: model.loss(ids, labels, pixels, params=p))(model.params)` gives the gradients.
        A label right after left padding is predicted from a padding slot (no real key to attend to: we, like
        transformers' eager attention, average all slots; its SDPA path differs): set such labels to -100.
        """
        ids, pixels, mask = self._inputs(input_ids, pixel_values, attention_mask)
        lab = np.asarray(labels)
        if lab.shape != ids.shape:
            raise ValueError(f"labels shape {lab.shape} differs from input_ids shape {ids.shape}")
        positions = _positions(ids, None)
        params = self.params if params is None else params
        return _loss_fn(self.module)(params, ids, pixels, positions, mask, lab.astype(np.int32))

    def generate(self, input_ids: Any, pixel_values: Any = None, attention_mask: Any = None,
                 streamer: Any = None, **generation_kwargs: Any) -> np.ndarray:
        """Token ids [b, prompt + new], like transformers' generate (rows padded with pad_token_id after they
        end). Keyword arguments: max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
        eos_token_id (int or list), pad_token_id, seed; defaults from the checkpoint's generation_config.json."""
        from internvl_jax.engine.generate import run

        return run(self, input_ids, pixel_values, attention_mask, streamer=streamer, **generation_kwargs)

    def stream(self, input_ids: Any, pixel_values: Any = None, attention_mask: Any = None, chunk: int = 8,
               **generation_kwargs: Any):
        """Iterator of new token ids [b, n], a few at a time, as the on-device loop produces them."""
        from internvl_jax.engine.generate import stream

        return stream(self, input_ids, pixel_values, attention_mask, chunk=chunk, **generation_kwargs)

    def num_params(self) -> int:
        """Parameter count as the checkpoint has it (without our vocabulary padding)."""
        return sum(x.size for x in jax.tree.leaves(self.params)) - weights.padding_numel(self.config)


def _positions(ids: np.ndarray, position_ids: Any) -> np.ndarray:
    if position_ids is None:
        return np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    pos = np.asarray(position_ids, np.int32)
    if pos.ndim == 1:
        pos = pos[None]
    return np.broadcast_to(pos, ids.shape)


# Jitted entry points, one per module (the module is hashable: its config is a frozen dataclass).
@functools.lru_cache(maxsize=16)
def _logits_fn(module: InternVLModule, logits_to_keep: int) -> Callable:
    @jax.jit
    def run(params, ids, pixels, positions, mask):
        return module.apply({"params": params}, ids, pixels, positions, causal_mask(mask), None,
                            logits_to_keep)[0]
    return run


@functools.lru_cache(maxsize=16)
def _image_fn(module: InternVLModule) -> Callable:
    return jax.jit(lambda params, pixels: module.apply({"params": params}, pixels,
                                                       method=InternVLModule.image_features))


@functools.lru_cache(maxsize=16)
def _loss_fn(module: InternVLModule) -> Callable:
    @jax.jit
    def run(params, ids, pixels, positions, mask, labels):
        logits = module.apply({"params": params}, ids, pixels, positions, causal_mask(mask))[0]
        target = labels[:, 1:]
        valid = target != -100
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    return run


# ----- loading -----
def _legacy(reader: SafetensorsDir) -> bool:
    return any(k.startswith(("language_model.model.", "vision_tower.")) for k in reader.keys())


def key_in_file(key: str, legacy: bool) -> str:
    if legacy:
        for new, old in weights.LEGACY_PREFIXES:
            if key.startswith(new):
                return old + key[len(new):]
    return key


def _untie_if_head_differs(config: InternVLConfig, reader: SafetensorsDir) -> InternVLConfig:
    """A checkpoint's own lm_head.weight is used when present, even if the config says tied."""
    head = key_in_file("lm_head.weight", _legacy(reader))
    if not config.tie_word_embeddings or head not in reader:
        return config
    embed = reader.get(key_in_file("model.language_model.embed_tokens.weight", _legacy(reader)))
    if np.array_equal(reader.get(head), embed):
        return config
    log.warning("config ties lm_head to the embeddings but the checkpoint has its own lm_head.weight: using it")
    return config.replace(tie_word_embeddings=False)


def load_params(reader: SafetensorsDir, config: InternVLConfig, abstract: Params,
                shardings: dict[str, jax.sharding.Sharding] | None = None) -> Params:
    """Read every parameter from the checkpoint into our layout, one tensor at a time."""
    legacy = _legacy(reader)
    flat = weights.flatten_paths(abstract)
    needed = weights.checkpoint_keys(config, list(flat))
    in_file = {key_in_file(k, legacy): k for k in needed}
    missing = sorted(k for k in in_file if k not in reader)
    # A tied checkpoint may still carry lm_head.weight (equal to the embeddings): not an error.
    ignorable = {key_in_file("lm_head.weight", legacy)}
    extra = sorted(k for k in reader.keys() if k not in in_file and k not in ignorable)
    where = f"checkpoint {next(iter(reader.files.values())).path.parent}"
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} weight(s) the config needs: {missing[:5]}")
    if extra:
        raise CheckpointError(f"{where} has {len(extra)} weight(s) the config does not use: {extra[:5]}")
    out: dict[str, jax.Array] = {}
    for path, spec in flat.items():
        m = weights.mapping(path)
        dtype = spec.dtype
        if m.stacked:
            host = np.empty(spec.shape, dtype)
            for i in range(spec.shape[0]):
                host[i] = _converted(reader, key_in_file(m.key.format(i=i), legacy), m, spec.shape[1:], dtype)
        else:
            host = _converted(reader, key_in_file(m.key, legacy), m, spec.shape, dtype)
        sharding = shardings.get(path) if shardings else None
        out[path] = jax.device_put(host, sharding)  # on one CPU device: no copy, the array keeps `host`
    return weights.unflatten_paths(out)


def _converted(reader: SafetensorsDir, key: str, m: weights.Mapping, shape: tuple[int, ...],
               dtype: np.dtype) -> np.ndarray:
    tensor = reader.get(key, weights.padded_rows(m, reader.shape(key)[0], shape) if key in reader else None)
    try:
        return weights.to_ours(m, tensor, tuple(shape)).astype(dtype, copy=False)
    except ValueError as e:
        raise CheckpointError(f"weight {key!r} has shape {tuple(tensor.shape)}, which does not fit the "
                              f"config's {tuple(shape)} ({e})") from e


# Re-exported for the engine.
__all__ = ["InternVL", "KVCache", "causal_mask", "load_params"]
