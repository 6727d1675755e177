"""The language decoder: Qwen2 and Llama-type (InternLM2/3 map onto it), with an explicit KV cache.

Dimension names in einsum strings: b batch, t query positions, s key slots, d width, n query heads,
k KV heads, g query heads per KV head, h head_dim, f MLP width, v vocabulary.

The cache is a plain pytree passed in and returned (never a mutable collection): `KVCache` holds
`k`/`v` of shape [layers, batch, slots, kv_heads, head_dim]. A call writes its T new keys from slot
`slot` on and attends over all slots allowed by `mask` ([b, t, s] booleans built by the caller), so
prefill, decode and a plain forward without cache all run the same layer code.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from internvl_jax.config import TextConfig
from internvl_jax.model.layers import HIDDEN, Dense, RMSNorm, activation, weight
from internvl_jax.rules import constrain


class KVCache(NamedTuple):
    """Keys and values of every layer, and the slot the next token is written to.

    The one declaration of the cache: its shape (`shape`) and logical axes (`AXES`) are read by the
    shardings (`sharding.cache_shardings`), the memory planner and the engine's memory check.
    """

    k: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    v: jax.Array  # same
    slot: jax.Array  # int32 scalar: the slot the next token's key and value are written to

    AXES = ("layers", "batch", "cache_slots", "kv_heads", "head_dim")  # of k and v; `slot` is a replicated scalar

    @staticmethod
    def shape(cfg: TextConfig, batch: int, slots: int) -> tuple[int, ...]:
        return (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)

    @classmethod
    def abstract(cls, cfg: TextConfig, batch: int, slots: int, dtype: jnp.dtype) -> KVCache:
        """The cache as ShapeDtypeStructs (nothing allocated)."""
        kv = jax.ShapeDtypeStruct(cls.shape(cfg, batch, slots), jnp.dtype(dtype))
        return cls(kv, kv, jax.ShapeDtypeStruct((), jnp.int32))

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, slots: int, dtype: jnp.dtype) -> KVCache:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cls.abstract(cfg, batch, slots, dtype))


def rope_frequencies(cfg: TextConfig, positions: jax.Array) -> jax.Array:
    """Inverse frequencies [h/2], float32; dynamic NTK rescales the base from the longest position seen.

    transformers recomputes dynamic-NTK frequencies from max(position_ids) + 1 on every forward whose length
    exceeds max_position_embeddings; a function of the current positions gives the same numbers.
    """
    dim = cfg.head_dim
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    base = jnp.float32(cfg.rope_theta)
    if cfg.rope_type == "dynamic":
        seq_len = jnp.maximum(jnp.max(positions) + 1, cfg.max_position_embeddings).astype(jnp.float32)
        factor = cfg.rope_factor
        base = base * ((factor * seq_len / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base**exponents)


def rope_tables(cfg: TextConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [b, t, h] (halves duplicated, as rotate_half expects), float32."""
    freqs = positions[..., None].astype(jnp.float32) * rope_frequencies(cfg, positions)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [b, t, heads, h]; rotate_half convention (first half / second half), as Qwen2 and Llama."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attend(q: jax.Array, blocks: list[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """Grouped-query attention over blocks of keys, one softmax across all of them.

    q [b,t,k,g,h]; each block is (k [b,s,k,h], v [b,s,k,h], mask [b,t,s]) -> [b,t,k,g,h]. With a cache the blocks
    are the cache as it was and this call's new keys: the cache is read where it lies and never rewritten
    inside the layer (see `DecoderLayer`)."""
    scale = q.shape[-1] ** -0.5
    # A finite minimum (not -inf) keeps fully masked rows (left padding) finite: they become uniform.
    scores = [jnp.where(m[:, None, None], jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32) * scale,
                        jnp.finfo(jnp.float32).min) for k, _, m in blocks]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(q.dtype)
    bounds = [0]
    for k, _, _ in blocks:
        bounds.append(bounds[-1] + k.shape[1])
    return sum(jnp.einsum("bkgts,bskh->btkgh", probs[..., lo:hi], v)
               for (_, v, _), lo, hi in zip(blocks, bounds, bounds[1:], strict=False))


def cached_blocks(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  slot: jax.Array) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """The two key blocks of a call that writes its T new keys at slots [slot, slot + T): the cache (without
    those slots, which still hold stale values) and the new keys, masked as `mask` [b,t,s] says."""
    t, s = k.shape[1], k_cache.shape[1]
    cols = jnp.arange(s)
    stale = (cols >= slot) & (cols < slot + t)
    new_mask = jax.lax.dynamic_slice_in_dim(mask, slot, t, axis=2)
    return [(k_cache, v_cache, mask & ~stale), (k, v, new_mask)]


class DecoderLayer(nn.Module):
    cfg: TextConfig
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, cache: tuple[jax.Array, jax.Array] | None, rope: tuple[jax.Array, jax.Array],
                 mask: jax.Array, slot: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Hidden [b,t,d] and this layer's cache (k, v [b,s,k,h], or None) -> hidden, this call's new (k, v).

        The layer only reads its cache; the caller writes the returned keys and values at `slot` once for all
        layers. Writing them here (the cache in the scan carry, updated in place) made XLA:TPU keep the carried
        cache in a slot-major layout for the update and copy the whole cache in and out of the loop and each
        layer's slice to the attention's slot-minor layout: 7x the cache's bytes a decode step (docs/tpu.md)."""
        c, pd = self.cfg, self.param_dtype
        b, t, _ = x.shape
        with jax.named_scope("attention"):
            y = RMSNorm(c.rms_norm_eps, "embed", pd, name="attn_norm")(x)
            q = Dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), c.qkv_bias, param_dtype=pd,
                      name="q")(y)
            k = Dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), c.qkv_bias,
                      param_dtype=pd, name="k")(y)
            v = Dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), c.qkv_bias,
                      param_dtype=pd, name="v")(y)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:  # the cache's dtype: the new keys attend exactly as they will be stored
                k, v = k.astype(cache[0].dtype), v.astype(cache[1].dtype)
            new = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
            blocks = [(k, v, mask)] if cache is None else cached_blocks(
                cache[0].astype(q.dtype), cache[1].astype(q.dtype), k, v, mask, slot)
            q = q.reshape(b, t, c.num_kv_heads, c.groups, c.head_dim)
            out = attend(q, blocks).reshape(b, t, c.num_heads, c.head_dim)
            x = x + Dense((c.hidden_size,), ("heads", "head_dim", "embed"), c.o_bias, n_in=2, param_dtype=pd,
                          name="o")(out)
        with jax.named_scope("mlp"):
            y = RMSNorm(c.rms_norm_eps, "embed", pd, name="mlp_norm")(x)
            gate = Dense((c.intermediate_size,), ("embed", "mlp"), c.mlp_bias, param_dtype=pd, name="gate")(y)
            up = Dense((c.intermediate_size,), ("embed", "mlp"), c.mlp_bias, param_dtype=pd, name="up")(y)
            x = x + Dense((c.hidden_size,), ("mlp", "embed"), c.mlp_bias, param_dtype=pd, name="down")(
                activation(c.hidden_act)(gate) * up)
        x = constrain(x, ("batch", "length", "act_embed"))
        self.sow(HIDDEN, "hidden", x)
        return x, new


def write_slots(cache_kv: jax.Array, new: jax.Array, first_layer: jax.Array | int, slot: jax.Array) -> jax.Array:
    """Stacked cache [L,b,s,k,h] with new keys [l,b,t,k,h] written at layers first_layer.., slots slot.. (in place
    when the cache is donated)."""
    return jax.lax.dynamic_update_slice(cache_kv, new.astype(cache_kv.dtype), (first_layer, 0, slot, 0, 0))


class Decoder(nn.Module):
    cfg: TextConfig
    tie_embeddings: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    def setup(self) -> None:
        c = self.cfg
        self.embedding = weight(self, "embedding", (c.padded_vocab, c.hidden_size), ("vocab", "embed"),
                                dtype=self.param_dtype)
        self.layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0, HIDDEN: 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),  # each layer's cache; rope, mask, slot shared
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.param_dtype, name="layers")
        self.final_norm = RMSNorm(c.rms_norm_eps, "embed", self.param_dtype)
        if not self.tie_embeddings:
            self.lm_head = weight(self, "lm_head", (c.hidden_size, c.padded_vocab), ("embed", "vocab"),
                                  dtype=self.param_dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache | None = None,
                 empty_cache: bool = False) -> tuple[jax.Array, KVCache | None]:
        """Embedded inputs [b, t, d] -> final hidden states [b, t, d] (after the last norm), new cache.

        `empty_cache` (static): the cache holds nothing yet (slot 0, as for a prefill), so the layers attend to
        this call's own keys only: scores [t, t] rather than [t, t + slots], and the cache is only written."""
        self.sow(HIDDEN, "input", x)
        rope = rope_tables(self.cfg, positions)
        slot = cache.slot if cache is not None else jnp.zeros((), jnp.int32)
        read = None if cache is None or empty_cache else (cache.k, cache.v)
        if cache is not None and empty_cache:
            mask = mask[:, :, : x.shape[1]]
        x, (k, v) = self.layers(x, read, rope, mask, slot)
        if cache is not None:
            cache = KVCache(write_slots(cache.k, k, 0, slot), write_slots(cache.v, v, 0, slot), slot + x.shape[1])
        x = self.final_norm(x)
        self.sow(HIDDEN, "normed", x)
        return x, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        head = self.embedding.T if self.tie_embeddings else self.lm_head
        logits = jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype))
        logits = constrain(logits, ("batch", "length", "vocab"))  # the padded width: tensor divides it
        return logits[..., : self.cfg.vocab_size]  # drop the padding columns (TextConfig.padded_vocab)
