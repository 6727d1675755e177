"""Host-side checks of what a caller hands the model: ids, mask, pixels, and that image tokens match tiles.

Shared by the forward passes (`modeling.InternVL`) and the engine (`engine.generate`), so both refuse the
same inputs with the same messages before anything is compiled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from internvl_jax.config import InternVLConfig


@dataclass(frozen=True, kw_only=True)
class ModelInputs:
    """Checked inputs of one call, as host arrays."""

    ids: np.ndarray  # [b, t] int32 token ids
    mask: np.ndarray  # [b, t] int32: 1 for real tokens, 0 for (left) padding
    pixels: np.ndarray | None  # [tiles, 3, S, S] in the parameter dtype, or None without images


def check_pixels(config: InternVLConfig, pixel_values: Any, dtype: Any) -> np.ndarray:
    """pixel_values as [tiles, C, S, S] in `dtype`; S a multiple of patch size x pixel-shuffle factor."""
    v = config.vision
    px = np.asarray(pixel_values)
    unit = v.patch_size * config.shuffle
    if px.ndim != 4 or px.shape[1] != v.num_channels or px.shape[2] != px.shape[3] or px.shape[2] % unit:
        raise ValueError(
            f"pixel_values must be [tiles, {v.num_channels}, S, S] with S a multiple of {unit} "
            f"(patch {v.patch_size} x pixel shuffle {config.shuffle}); got shape {px.shape}")
    if px.shape[0] == 0:
        raise ValueError("pixel_values has no tiles")
    return px.astype(dtype)


def tokens_per_tile(config: InternVLConfig, size: int) -> int:
    """Image tokens one tile of `size` pixels becomes (256 for a 448px tile)."""
    return (size // config.vision.patch_size // config.shuffle) ** 2


def check_inputs(config: InternVLConfig, input_ids: Any, pixel_values: Any, attention_mask: Any, dtype: Any
                 ) -> ModelInputs:
    """Refuse malformed inputs with a message naming the problem; ids [t] are taken as one row."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers of shape [batch, length], got {ids.dtype} {ids.shape}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty (length 0)")
    vocab = config.text.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"input_ids holds ids outside [0, {vocab}): min {ids.min()}, max {ids.max()}")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    n_tokens = int((ids == config.image_token_id).sum())
    pixels = None
    if pixel_values is not None:
        pixels = check_pixels(config, pixel_values, dtype)
        per_tile = tokens_per_tile(config, pixels.shape[-1])
        if n_tokens != pixels.shape[0] * per_tile:
            raise ValueError(
                f"input_ids holds {n_tokens} image tokens (id {config.image_token_id}) but pixel_values "
                f"has {pixels.shape[0]} tiles x {per_tile} tokens = {pixels.shape[0] * per_tile}")
    elif n_tokens:
        raise ValueError(f"input_ids holds {n_tokens} image tokens (id {config.image_token_id}) "
                         "but no pixel_values were given")
    return ModelInputs(ids=ids.astype(np.int32), mask=mask.astype(np.int32), pixels=pixels)
