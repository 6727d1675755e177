"""The prefill's memory follows the prompt, not the cache it fills: it starts the cache, so its layers attend to
the prompt's own keys only (scores [t, t]), whatever the number of slots (compiled memory, XLA:CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from internvl_jax.config import InternVLConfig
from internvl_jax.engine.generate import _prefill_fn
from internvl_jax.model.decoder import KVCache
from internvl_jax.model.params import abstract_params, module_for
from tests import tiny_models as tm


def prefill_temp_bytes(cfg: InternVLConfig, length: int, slots: int) -> int:
    s = jax.ShapeDtypeStruct
    args = (abstract_params(cfg), s((1, length), jnp.int32), None, s((1, length), jnp.int32), s((1, slots), bool),
            KVCache.abstract(cfg.text, 1, slots, jnp.float32), s((1, length), jnp.int32))
    return _prefill_fn(module_for(cfg)).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_prefill_memory_does_not_grow_with_the_cache():
    cfg = InternVLConfig.from_dict(tm.hf_config())
    length, heads = 512, cfg.text.num_heads
    small, large = prefill_temp_bytes(cfg, length, 1024), prefill_temp_bytes(cfg, length, 16384)
    scores_over_slots = heads * length * 16384 * 4  # what attending over every slot would hold at least
    assert large < scores_over_slots / 4, (small, large)
    assert large - small < 0.1 * scores_over_slots, (small, large)


def test_prefill_memory_is_linear_in_the_prompt():
    """Blockwise attention: no [t, t] scores. Quadrupling the prompt quadruples the temp bytes at most (scores
    held whole would grow 16x: 4 heads x 4096^2 x 4 bytes = 268 MB at 4096 tokens)."""
    cfg = InternVLConfig.from_dict(tm.hf_config())
    short, long = prefill_temp_bytes(cfg, 1024, 1024 + 64), prefill_temp_bytes(cfg, 4096, 4096 + 64)
    whole_scores = cfg.text.num_heads * 4096 * 4096 * 4
    assert long < whole_scores / 8, (short, long)
    assert long < 5 * short, (short, long)


def test_slot_engine_prefill_memory_follows_the_chunk():
    """A chunk of the slot engine's prefill reads the cache blockwise: its temp bytes do not grow with the cache
    (a prompt of any length is prefilled by chunks of the same program)."""
    from internvl_jax.engine.slots import _prefill_fn

    cfg = InternVLConfig.from_dict(tm.hf_config())
    s = jax.ShapeDtypeStruct

    def temp(slots: int, chunk: int = 512) -> int:
        args = (abstract_params(cfg), KVCache.abstract(cfg.text, 4, slots, jnp.float32, per_row=True),
                s((1, chunk), jnp.int32), s((1, chunk), bool), s((1,), jnp.int32), s((1,), jnp.int32),
                s((chunk, cfg.text.hidden_size), jnp.float32))
        return _prefill_fn(module_for(cfg), None).lower(*args).compile().memory_analysis().temp_size_in_bytes

    small, large = temp(1024), temp(16384)
    assert large < 1.1 * small + (1 << 20), (small, large)


def test_forward_vision_memory_follows_the_group_not_the_tiles():
    """`model(ids, pixels)` (and `model.loss`, through the same `_forward`) runs the vision tower a group of tiles
    at a time: 32 tiles take less than 4x the temp bytes of 4 (all at once, every tile's attention scores and MLP
    activations are live together: 7.8x, measured on the code before)."""
    import dataclasses

    from internvl_jax.modeling import _logits_fn

    cfg = InternVLConfig.from_dict(tm.hf_config())
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=224))  # 257 tokens a tile
    v, per = cfg.vision, (cfg.vision.grid // 2) ** 2
    s = jax.ShapeDtypeStruct

    def temp(tiles: int) -> int:
        t = tiles * per + 8
        args = (abstract_params(cfg), s((1, t), jnp.int32), s((tiles, 3, v.image_size, v.image_size), jnp.float32),
                s((1, t), jnp.int32), s((1, t), bool))
        # logits_to_keep=1: the vocabulary's logits would outweigh the tiny vision tower
        return _logits_fn(module_for(cfg), 1).lower(*args).compile().memory_analysis().temp_size_in_bytes

    scores = 32 * v.num_heads * (v.grid**2 + 1) ** 2 * 4  # one layer's attention scores for 32 tiles at once
    few, many = temp(4), temp(32)
    assert many < 4 * few and many - few < scores / 4, (few, many, scores)
