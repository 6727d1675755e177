"""The whole model as one linen module: vision tower -> pixel shuffle + projector -> merge -> decoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import InternVLConfig
from internvl_jax.model.attention import KeyMask
from internvl_jax.model.decoder import Decoder, KVCache
from internvl_jax.model.layers import HIDDEN
from internvl_jax.model.projector import Projector, tokens_from_patches
from internvl_jax.model.vision import VisionTower
from internvl_jax.rules import constrain


def merge_image_features(embeds: jax.Array, ids: jax.Array, features: jax.Array, image_token_id: int,
                         feature_rows: jax.Array | None = None) -> jax.Array:
    """Put image features at the positions holding `image_token_id`. Static shapes throughout.

    embeds [b, t, d]; features [tiles, tokens, d]. By default the n-th image token of the batch (row-major, as
    transformers' masked_scatter) takes feature row n. `feature_rows` [b, t] names each token's feature row
    explicitly instead: the engine uses it when processes contribute their own blocks of tiles. The caller
    checks on the host that token and tile counts agree.
    """
    b, t, d = embeds.shape
    flat = features.reshape(-1, d).astype(embeds.dtype)
    is_image = ids == image_token_id
    if feature_rows is None:
        feature_rows = (jnp.cumsum(is_image.reshape(-1)) - 1).reshape(b, t)
    rows = jnp.clip(feature_rows, 0, flat.shape[0] - 1).reshape(-1)
    picked = jnp.take(flat, rows, axis=0).reshape(b, t, d)
    return jnp.where(is_image[..., None], picked, embeds)


def feature_rows(ids: np.ndarray, image_token_id: int, offset: int = 0) -> np.ndarray:
    """Host-side feature row of every image token ([b, t] int32; other positions hold 0)."""
    is_image = ids == image_token_id
    rows = np.cumsum(is_image.reshape(-1)).reshape(ids.shape) - 1 + offset
    return np.where(is_image, rows, 0).astype(np.int32)


class InternVLModule(nn.Module):
    cfg: InternVLConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    quant: str = ""  # weight-only quantization: "int8" | "int4" (`internvl_jax.quant`)
    kv_cache: str = ""  # "int8": the engines allocate an int8 KV cache (`KVCache`); "": the compute dtype

    def setup(self) -> None:
        c = self.cfg
        self.vision = VisionTower(c.vision, c.vision_feature_layer, self.dtype, self.param_dtype, self.quant)
        self.projector = Projector(c, self.param_dtype, self.quant)
        self.text = Decoder(c.text, c.tie_word_embeddings, self.dtype, self.param_dtype, self.quant)

    @property
    def cache_dtype(self) -> jnp.dtype:
        """The dtype of the KV cache the engines allocate for this module."""
        return jnp.dtype(jnp.int8) if self.kv_cache == "int8" else jnp.dtype(self.param_dtype)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """[tiles, 3, H, W] -> [tiles, image_seq_length, text_hidden]."""
        with jax.named_scope("vision"):
            hidden = self.vision(pixels)
        with jax.named_scope("projector"):
            features = self.projector(tokens_from_patches(hidden, self.cfg))
        features = constrain(features, ("tiles", "patches", "act_embed"))
        self.sow(HIDDEN, "projected", features)
        return features

    def __call__(self, ids: jax.Array, pixels: jax.Array | None, positions: jax.Array, mask: KeyMask,
                 cache: KVCache | None = None, logits_to_keep: int = 0, feature_rows: jax.Array | None = None,
                 rows: jax.Array | None = None, features: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """Logits [b, t or logits_to_keep, vocab] (float32) and the updated cache; `logits_to_keep` = 0 keeps
        every position; `feature_rows`: see `merge_image_features`; `features`: image features computed
        beforehand (`image_features`, in groups of tiles) instead of `pixels`; `rows`: see `Decoder`."""
        x = self.text.embed(ids)
        if pixels is not None:
            features = self.image_features(pixels)
        if features is not None:
            x = merge_image_features(x, ids, features, self.cfg.image_token_id, feature_rows)
        x = constrain(x, ("batch", "length", "act_embed"))
        hidden, cache = self.text(x, positions, mask, cache, rows)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        with jax.named_scope("lm_head"):
            return self.text.logits(hidden).astype(jnp.float32), cache

    def init_all(self, ids: jax.Array, pixels: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """Touches every parameter (used only to build the parameter tree); mask [b, t] marks real tokens."""
        return self(ids, pixels, positions, KeyMask.uncached(mask))[0]
