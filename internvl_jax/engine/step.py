"""One decode step's bookkeeping, shared by the on-device loop and the CPU layer loop (`layer_loop`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from internvl_jax.engine.sampling import SamplingConfig, choose
from internvl_jax.model.attention import KeyMask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeState:
    """What the decode loop carries from step to step, besides the KV cache (which travels next to it)."""

    kv_mask: jax.Array  # [b, s] bool: cache slots that hold real tokens (left padding stays False)
    logits: jax.Array  # [b, v] float32: scores for the next token
    positions: jax.Array  # [b] int32: RoPE position of the next token (counts each row's real tokens only)
    tokens: jax.Array  # [b, s] int32: the generated tokens (the first max_new_tokens columns are used)
    step: jax.Array  # int32 scalar: tokens generated so far
    done: jax.Array  # [b] bool: rows that produced an EOS id (or are batch padding)
    key: jax.Array  # PRNG key for sampling
    seen: jax.Array  # [b, v] bool: ids seen so far (repetition penalty), or [b, 0] when the penalty is off


def step_mask(slot: jax.Array, kv_mask: jax.Array) -> KeyMask:
    """The keys of one decode step of every row, written at the shared `slot`: the cache's real tokens before it
    (`kv_mask` [b, s]) and the step's own token."""
    b = kv_mask.shape[0]
    return KeyMask(jnp.broadcast_to(slot, (b,)).astype(jnp.int32), kv_mask, jnp.ones((b, 1), bool))


def choose_next(st: DecodeState, slot: jax.Array, sampling: SamplingConfig
                ) -> tuple[DecodeState, jax.Array, jax.Array]:
    """One step's bookkeeping before the forward pass: pick each row's next token from `st.logits`, record it
    (tokens, done, seen) and open cache `slot`, where its key and value go. Returns the state, the tokens [b] and
    the key mask of the forward pass."""
    eos = jnp.asarray(sampling.eos_token_id or (-1,), jnp.int32)
    key, sub = jax.random.split(st.key)
    tok = choose(st.logits, sub, sampling, st.seen if st.seen.shape[1] else None)
    tok = jnp.where(st.done, sampling.pad_id, tok)
    tokens = jax.lax.dynamic_update_slice(st.tokens, tok[:, None], (0, st.step))
    done = st.done | jnp.isin(tok, eos)
    seen = st.seen.at[jnp.arange(tok.shape[0]), tok].set(True) if st.seen.shape[1] else st.seen
    kv_mask = jax.lax.dynamic_update_slice(st.kv_mask, jnp.ones((tok.shape[0], 1), bool), (0, slot))
    st = dataclasses.replace(st, kv_mask=kv_mask, tokens=tokens, done=done, key=key, seen=seen)
    return st, tok, step_mask(slot, kv_mask)


def advanced(st: DecodeState, logits: jax.Array) -> DecodeState:
    """The state after the forward pass of a step: the new scores [b, 1, v], the next position and step."""
    return dataclasses.replace(st, logits=logits[:, -1], positions=st.positions + 1, step=st.step + 1)
