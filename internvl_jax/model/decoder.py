"""The language decoder: Qwen2 and Llama-type (InternLM2/3 map onto it), with an explicit KV cache.

Dimension names in einsum strings: b batch, t query positions, s key slots, d width, n query heads,
k KV heads, g query heads per KV head, h head_dim, f MLP width, v vocabulary.

The cache is a plain pytree passed in and returned (never a mutable collection): `KVCache` holds
`k`/`v` of shape [layers, rows, slots, kv_heads, head_dim]. A call writes its T new keys from each row's start
slot on and attends as its `KeyMask` says (`model.attention`), so prefill, decode, a chunk of a long prompt and
a plain forward without cache all run the same layer code.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from internvl_jax import quant
from internvl_jax.config import TextConfig
from internvl_jax.model.attention import CachedKeys, KeyMask, attention
from internvl_jax.model.dot import contract
from internvl_jax.model.layers import HIDDEN, Dense, RMSNorm, activation, quantized_weight, weight
from internvl_jax.rules import constrain


class KVCache(NamedTuple):
    """Keys and values of every layer, and the slot the next token is written to.

    The one declaration of the cache: its shape (`shape`) and logical axes (`AXES`) are read by the
    shardings (`sharding.cache_shardings`), the memory planner and the engine's memory check.
    """

    k: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    v: jax.Array  # same
    # int32: the slot the next token's key and value are written to; a scalar when every row writes at the same
    # slot (`generate`: left padded rows), [rows] when each row has its own length (the slot engine)
    slot: jax.Array
    # An int8 cache (`quant`): one float32 scale per token and KV head, [layers, batch, slots, kv_heads, 1]
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    AXES = ("layers", "batch", "cache_slots", "kv_heads", "head_dim")  # of k and v (and scales); `slot` replicated

    @staticmethod
    def shape(cfg: TextConfig, batch: int, slots: int) -> tuple[int, ...]:
        return (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)

    @classmethod
    def abstract(cls, cfg: TextConfig, batch: int, slots: int, dtype: jnp.dtype, per_row: bool = False) -> KVCache:
        """The cache as ShapeDtypeStructs (nothing allocated); `per_row`: a slot for each row."""
        shape = cls.shape(cfg, batch, slots)
        kv = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        scale = jax.ShapeDtypeStruct((*shape[:-1], 1), jnp.float32) if kv.dtype == jnp.int8 else None
        return cls(kv, kv, jax.ShapeDtypeStruct((batch,) if per_row else (), jnp.int32), scale, scale)

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, slots: int, dtype: jnp.dtype, per_row: bool = False) -> KVCache:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cls.abstract(cfg, batch, slots, dtype, per_row))


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


class DecoderLayer(nn.Module):
    cfg: TextConfig
    param_dtype: jnp.dtype
    quant: str = ""  # weight-only quantization of the linear layers (`internvl_jax.quant`)

    @nn.compact
    def __call__(self, x: jax.Array, layer: jax.Array, cache: tuple | None,
                 rope: tuple[jax.Array, jax.Array], mask: KeyMask) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Hidden [b,t,d] -> hidden, this call's new (k, v) [b,t,k,h]. `cache`: the whole stacked cache (k, v
        [L,rows,s,k,h]), the cache row of each query row (None: row i is cache row i) and, for an int8 cache, the
        scales (k_scale, v_scale), or None; `layer`: this layer's index in it.

        The layer only reads the cache; the caller writes the returned keys and values once for all layers.
        Writing them here (the cache in the scan carry, updated in place) made XLA:TPU keep the carried
        cache in a slot-major layout for the update and copy the whole cache in and out of the loop and each
        layer's slice to the attention's slot-minor layout: 7x the cache's bytes a decode step (docs/tpu.md)."""
        c, pd, qz = self.cfg, self.param_dtype, self.quant
        b, t, _ = x.shape
        with jax.named_scope("attention"):
            y = RMSNorm(c.rms_norm_eps, "embed", pd, name="attn_norm")(x)
            q = Dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), c.qkv_bias, param_dtype=pd, quant=qz,
                      name="q")(y)
            k = Dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), c.qkv_bias,
                      param_dtype=pd, quant=qz, name="k")(y)
            v = Dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), c.qkv_bias,
                      param_dtype=pd, quant=qz, name="v")(y)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:  # the cache's dtype: the new keys attend exactly as they will be stored
                k, v = stored(k, cache[0].dtype, q.dtype), stored(v, cache[1].dtype, q.dtype)
            new = (k, v)
            cached = None if cache is None else CachedKeys(cache[0], cache[1], layer, cache[2], *cache[3:])
            q = q.reshape(b, t, c.num_kv_heads, c.groups, c.head_dim)
            out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, cached)
            x = x + Dense((c.hidden_size,), ("heads", "head_dim", "embed"), c.o_bias, n_in=2, param_dtype=pd, quant=qz,
                          name="o")(out.reshape(b, t, c.num_heads, c.head_dim))
        with jax.named_scope("mlp"):
            y = RMSNorm(c.rms_norm_eps, "embed", pd, name="mlp_norm")(x)
            gate = Dense((c.intermediate_size,), ("embed", "mlp"), c.mlp_bias, param_dtype=pd, quant=qz, name="gate")(y)
            up = Dense((c.intermediate_size,), ("embed", "mlp"), c.mlp_bias, param_dtype=pd, quant=qz, name="up")(y)
            x = x + Dense((c.hidden_size,), ("mlp", "embed"), c.mlp_bias, param_dtype=pd, quant=qz, name="down")(
                activation(c.hidden_act)(gate) * up)
        x = constrain(x, ("batch", "length", "act_embed"))
        self.sow(HIDDEN, "hidden", x)
        return x, new


def stored(x: jax.Array, cache_dtype: jnp.dtype, dtype: jnp.dtype) -> jax.Array:
    """New keys (or values) as the cache will hold them, in `dtype`: rounded to an int8 cache's values and back."""
    if cache_dtype != jnp.int8:
        return x.astype(cache_dtype)
    return quant.dequantize(*quantize_kv(x), dtype)


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys or values [..., k, h] -> int8 values and one float32 scale per token and head [..., k, 1]."""
    return quant.quantize(x, (*x.shape[:-1], 1), "int8")


def write_kv(cache: KVCache, k: jax.Array, v: jax.Array, slot: jax.Array, rows: jax.Array | None = None
             ) -> tuple[jax.Array, ...]:
    """`write_slots` of new keys and values [L,b,t,k,h] into the cache: (k, v) or, int8, (k, v, k_scale, v_scale)."""
    if cache.k_scale is None:
        return write_slots(cache.k, k, slot, rows), write_slots(cache.v, v, slot, rows)
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    return (write_slots(cache.k, kq, slot, rows), write_slots(cache.v, vq, slot, rows),
            write_slots(cache.k_scale, ks, slot, rows), write_slots(cache.v_scale, vs, slot, rows))


def write_slots(cache_kv: jax.Array, new: jax.Array, slot: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """Stacked cache [L,R,s,k,h] with new keys [L,b,t,k,h] written from slot `slot` on (in place when the cache is
    donated). `slot`: a scalar (every row, rows 0..b-1) or [b] (row i from slot[i], into cache row rows[i], or i).

    Per-row writes are b contiguous updates rather than one scatter: each stays a cheap in-place copy on every
    backend."""
    new = new.astype(cache_kv.dtype)
    if slot.ndim == 0:
        return jax.lax.dynamic_update_slice(cache_kv, new, (0, 0, slot, 0, 0))
    for i in range(new.shape[1]):
        row = i if rows is None else rows[i]
        cache_kv = jax.lax.dynamic_update_slice(cache_kv, new[:, i:i + 1], (0, row, slot[i], 0, 0))
    return cache_kv


class Decoder(nn.Module):
    cfg: TextConfig
    tie_embeddings: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    quant: str = ""  # weight-only quantization of the layers, the embedding and lm_head (`internvl_jax.quant`)

    def setup(self) -> None:
        c = self.cfg
        self.embedding_scale = None
        if self.quant:  # one scale per vocabulary row: the row a lookup takes, the column of the tied head
            self.embedding, self.embedding_scale = quantized_weight(
                self, "embedding", (c.padded_vocab, c.hidden_size), ("vocab", "embed"), (1,), self.quant,
                self.param_dtype)
        else:
            self.embedding = weight(self, "embedding", (c.padded_vocab, c.hidden_size), ("vocab", "embed"),
                                    dtype=self.param_dtype)
        self.layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0, HIDDEN: 0},
            split_rngs={"params": True},
            # each layer's index; the cache (read in place, by index), rope and mask shared
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.param_dtype, self.quant, name="layers")
        self.final_norm = RMSNorm(c.rms_norm_eps, "embed", self.param_dtype)
        if self.tie_embeddings:
            return
        if self.quant:
            self.lm_head, self.lm_head_scale = quantized_weight(
                self, "lm_head", (c.hidden_size, c.padded_vocab), ("embed", "vocab"), (0,), self.quant,
                self.param_dtype)
        else:
            self.lm_head = weight(self, "lm_head", (c.hidden_size, c.padded_vocab), ("embed", "vocab"),
                                  dtype=self.param_dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        rows = jnp.take(self.embedding, ids, axis=0)
        if self.embedding_scale is None:
            return rows.astype(self.dtype)
        return quant.dequantize(rows, jnp.take(self.embedding_scale, ids, axis=0), self.dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: KeyMask, cache: KVCache | None = None,
                 rows: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Embedded inputs [b, t, d] -> final hidden states [b, t, d] (after the last norm), new cache.

        With a cache the call's tokens are written from `mask.start` on (a scalar `cache.slot` moves by t; a
        per-row one is left to the caller, who knows the real lengths), into cache rows `rows` (None: 0..b-1)."""
        self.sow(HIDDEN, "input", x)
        rope = rope_tables(self.cfg, positions)
        read = None if cache is None else (cache.k, cache.v, rows, cache.k_scale, cache.v_scale)
        x, (k, v) = self.layers(x, jnp.arange(self.cfg.num_layers), read, rope, mask)
        if cache is not None:
            slot = cache.slot if cache.slot.ndim == 0 else mask.start
            k, v, *scales = write_kv(cache, k, v, slot, rows)
            cache = KVCache(k, v, cache.slot + x.shape[1] if cache.slot.ndim == 0 else cache.slot, *scales)
        x = self.final_norm(x)
        self.sow(HIDDEN, "normed", x)
        return x, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.quant:
            head, scale = ((self.embedding.T, self.embedding_scale.T) if self.tie_embeddings
                           else (self.lm_head, self.lm_head_scale))
            logits = quant.dot(hidden, head, scale, 1)
        else:
            head = self.embedding.T if self.tie_embeddings else self.lm_head
            logits = contract(hidden, head)
        logits = constrain(logits, ("batch", "length", "vocab"))  # the padded width: tensor divides it
        return logits[..., : self.cfg.vocab_size]  # drop the padding columns (TextConfig.padded_vocab)
