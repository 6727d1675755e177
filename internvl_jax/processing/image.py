"""Dynamic tiling of GotOcr2ImageProcessor as InternVLProcessor uses it, on RGB uint8 arrays.

An image becomes `cols * rows` tiles of `size` cut row-major from the image resized to
(rows * tile_h, cols * tile_w), followed by a thumbnail (the whole image resized to one tile) when there is
more than one tile. The grid is the allowed (cols, rows) whose aspect ratio is closest to the image's.
"""

from __future__ import annotations

import functools

import numpy as np

from .configs import ImageConfig
from .resize import resize


@functools.lru_cache(maxsize=16)
def supported_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_tiles <= cols * rows <= max_tiles, stably sorted by tile count (the order
    matters for the tie-break below)."""
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


@functools.lru_cache(maxsize=1024)
def optimal_grid(
    height: int, width: int, tile_height: int, tile_width: int, min_tiles: int, max_tiles: int
) -> tuple[int, int]:
    """(cols, rows) of `get_optimal_tiled_canvas`: the closest aspect ratio wins; on an exact tie the later
    (larger) grid wins while the image area exceeds half the area of that grid's canvas."""
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in supported_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_height * tile_width * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(height: int, width: int, config: ImageConfig, crop_to_patches: bool | None = None) -> int:
    """Tile count for an image of this size (thumbnail included), without touching pixels."""
    crop = config.crop_to_patches if crop_to_patches is None else crop_to_patches
    if not crop or config.max_patches <= 1:
        return 1
    cols, rows = optimal_grid(height, width, *config.size, config.min_patches, config.max_patches)
    return 1 if cols * rows == 1 else cols * rows + 1


def tile_image(rgb: np.ndarray, config: ImageConfig, backend: str, crop_to_patches: bool | None = None) -> np.ndarray:
    """(H, W, 3) uint8 -> (n_tiles, tile_h, tile_w, 3) uint8, tiles row-major, thumbnail last."""
    tile_h, tile_w = config.size
    crop = config.crop_to_patches if crop_to_patches is None else crop_to_patches
    height, width = rgb.shape[:2]
    # The PIL backend skips tiling when max_patches <= 1; the torchvision backend tiles into a 1x1 grid, which
    # is the same single resize.
    if not crop or config.max_patches <= 1:
        if not config.do_resize:
            return rgb[None]
        return resize(rgb, tile_h, tile_w, backend, config.resample)[None]
    cols, rows = optimal_grid(height, width, tile_h, tile_w, config.min_patches, config.max_patches)
    canvas = resize(rgb, rows * tile_h, cols * tile_w, backend, config.resample)
    tiles = canvas.reshape(rows, tile_h, cols, tile_w, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile_h, tile_w, 3)
    if cols * rows > 1:
        thumbnail = resize(rgb, tile_h, tile_w, backend, config.resample)
        tiles = np.concatenate([tiles, thumbnail[None]], axis=0)
    return tiles


def normalize(
    frames: np.ndarray,
    backend: str,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, with each backend's exact float arithmetic."""
    x = frames.transpose(0, 3, 1, 2)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None, None]
    if backend == "pil":
        # image_transforms.rescale: float64 product, then float32; normalize: float32 (x - mean) / std.
        out = (x.astype(np.float64) * rescale_factor).astype(np.float32) if do_rescale else x.astype(np.float32)
        return (out - mean32) / std32 if do_normalize else out
    # TorchvisionBackend.rescale_and_normalize: rescale folded into float32 mean/std, one (x - m) / s.
    out = x.astype(np.float32)
    if do_normalize:
        if do_rescale:
            inv = np.float32(1.0 / rescale_factor)
            mean32, std32 = mean32 * inv, std32 * inv
        return (out - mean32) / std32
    return out * np.float32(rescale_factor) if do_rescale else out


def process_image(
    rgb: np.ndarray, config: ImageConfig, backend: str, crop_to_patches: bool | None = None
) -> np.ndarray:
    """(H, W, 3) uint8 -> (n_tiles, 3, tile_h, tile_w) float32 pixel values."""
    tiles = tile_image(rgb, config, backend, crop_to_patches)
    return normalize(
        tiles,
        backend,
        config.do_rescale,
        config.rescale_factor,
        config.do_normalize,
        config.image_mean,
        config.image_std,
    )
