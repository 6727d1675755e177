"""One decode step's bookkeeping, shared by the on-device loop and the CPU layer loop (`layer_loop`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from internvl_jax.engine.sampling import SamplingConfig, choose
from internvl_jax.model.decoder import KVCache


class DecodeState(NamedTuple):
    cache: KVCache
    kv_mask: jax.Array  # [b, s] bool: slots holding real tokens
    logits: jax.Array  # [b, v] float32: scores for the next token
    positions: jax.Array  # [b] int32: position of the next token
    tokens: jax.Array  # [b, s] int32: generated tokens (first max_new_tokens columns used)
    step: jax.Array  # int32 scalar
    done: jax.Array  # [b] bool
    key: jax.Array
    seen: jax.Array  # [b, v] bool (repetition penalty) or [b, 0]


def slot_mask(query_slots: jax.Array, kv_mask: jax.Array) -> jax.Array:
    """[t] query slots, [b, s] valid keys -> [b, t, s]: causal over slots, padding masked."""
    s = kv_mask.shape[1]
    return (jnp.arange(s)[None, None, :] <= query_slots[None, :, None]) & kv_mask[:, None, :]


def choose_next(st: DecodeState, rule: SamplingConfig) -> tuple[DecodeState, jax.Array, jax.Array]:
    """One step's bookkeeping before the forward pass: pick each row's next token from `st.logits`, record it
    (tokens, done, seen, its KV slot). Returns the state, the tokens [b] and the attention mask [b, 1, s]."""
    eos = jnp.asarray(rule.eos_token_id or (-1,), jnp.int32)
    pad = rule.pad_token_id if rule.pad_token_id is not None else 0
    key, sub = jax.random.split(st.key)
    tok = choose(st.logits, sub, rule, st.seen if st.seen.shape[1] else None)
    tok = jnp.where(st.done, pad, tok)
    tokens = jax.lax.dynamic_update_slice(st.tokens, tok[:, None], (0, st.step))
    done = st.done | jnp.isin(tok, eos)
    seen = st.seen.at[jnp.arange(tok.shape[0]), tok].set(True) if st.seen.shape[1] else st.seen
    slot = st.cache.index
    kv_mask = jax.lax.dynamic_update_slice(st.kv_mask, jnp.ones((tok.shape[0], 1), bool), (0, slot))
    st = st._replace(kv_mask=kv_mask, tokens=tokens, done=done, key=key, seen=seen)
    return st, tok, slot_mask(slot[None], kv_mask)
