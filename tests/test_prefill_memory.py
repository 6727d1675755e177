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
