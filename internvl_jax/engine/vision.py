"""The vision tower over many tiles, a group at a time, so its memory follows the group and not the tile count.

A prompt with a 32-frame video or a batch of photos brings tens of tiles; running them all in one pass holds every
tile's attention scores and MLP activations at once (16 heads x 1025^2 float32 scores = 67 MB a tile at the 1B
shape). `lax.map` over groups runs one group at a time inside the same program, reusing its buffers.
"""

from __future__ import annotations

from typing import Any

import jax

from internvl_jax.model.internvl import InternVLModule

VISION_GROUP = 4  # tiles a pass: ~0.35 GB of activations at the 1B shape, large enough for efficient matmuls


def group_size(tiles: int, group: int = VISION_GROUP) -> int:
    """Tiles per pass for `tiles` tiles: `group`, or fewer when they do not divide (tile counts are bucketed to
    powers of two by the engine, so this is rarely below `group`)."""
    g = min(group, tiles)
    while tiles % g:
        g -= 1
    return g


def image_features(module: InternVLModule, params: dict[str, Any], pixels: jax.Array,
                   group: int = VISION_GROUP) -> jax.Array:
    """[tiles, 3, S, S] -> [tiles, image tokens, text width], `group` tiles at a time (call inside jit)."""
    g = group_size(pixels.shape[0], group)

    def one(px: jax.Array) -> jax.Array:
        return module.apply({"params": params}, px, method=InternVLModule.image_features)

    if g == pixels.shape[0]:
        return one(pixels)
    out = jax.lax.map(one, pixels.reshape(-1, g, *pixels.shape[1:]))
    return out.reshape(pixels.shape[0], *out.shape[2:])
