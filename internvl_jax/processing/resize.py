"""Bicubic resizing of uint8 RGB images, bit-exact with either of transformers' image backends.

transformers resizes with one of two engines and they disagree by a level or two on most images:

* the PIL backend (`GotOcr2ImageProcessorPil`) calls `PIL.Image.resize(..., BICUBIC)`; we call the same
  function, so the result is identical by construction;
* the torchvision backend (`GotOcr2ImageProcessor`, and the video processor, which only exists in that form)
  calls `torchvision...resize(uint8, antialias=True)`, which on CPU runs ATen's separable uint8 kernel
  (`UpSampleKernel.cpp`: `_compute_index_ranges_int16_weights` + `basic_loop_separable_1d_*<uint8_t>`).
  `resize_bicubic_torch` re-implements that kernel in numpy: double-precision Keys-cubic weights (a=-0.5),
  normalised per output pixel, rounded to int16 with a per-axis precision, integer accumulation with a
  +0.5 rounding bias, horizontal pass first, a uint8 intermediate, clamping to 0..255.

Both need nothing from torch at run time.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

# Pillow's resampling filter ids (PIL.Image.Resampling values), the ints transformers stores in `resample`.
PIL_BICUBIC = 3


def _keys_cubic(x: float, a: float = -0.5) -> float:
    """ATen's `HelperInterpCubic::aa_filter` (a=-0.5 with antialias, the value Pillow uses). The operation
    order matters: the weights are rounded to int16 later, so they must be the same doubles."""
    x = abs(x)
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


@functools.lru_cache(maxsize=256)
def _axis_plan(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(source indices [out, k], int16-valued weights [out, k], precision bits) for one axis."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    kmax = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    starts = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, kmax), dtype=np.float64)
    wt_max = 0.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        # int() truncates toward zero like the C++ static_cast<int64_t>.
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(max(min(int(center + support + 0.5), in_size) - xmin, 0), kmax)
        row = [_keys_cubic((j + xmin - center + 0.5) * invscale) for j in range(xsize)]
        total = 0.0
        for w in row:
            total += w
        if total != 0.0:
            row = [w / total for w in row]
            wt_max = max([wt_max, *row])
        starts[i] = xmin
        weights[i, :xsize] = row
    # Largest precision (at most 22 bits) that keeps every weight inside int16.
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    int_weights = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    # Taps past the end carry weight 0; clip their index so the gather stays in bounds.
    index = np.minimum(starts[:, None] + np.arange(kmax)[None, :], in_size - 1)
    return index, int_weights, precision


def _resample_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    index, weights, precision = _axis_plan(image.shape[axis], out_size)
    shape = [1] * image.ndim
    shape[axis] = out_size
    # int32 is enough: |sum| <= 255 * (sum of positive weights) * 2**22 < 2**31.
    acc = np.full(image.shape[:axis] + (out_size,) + image.shape[axis + 1 :], 1 << (precision - 1), np.int32)
    for k in range(index.shape[1]):
        # Gather the uint8 taps first and widen only the output-sized gather: an int32 copy of the whole
        # source cost 4 bytes per input value (1.7 GB for a 12000x12000 image); the sums are the same.
        acc += np.take(image, index[:, k], axis=axis) * weights[:, k].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_bicubic_torch(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (..., H, W, C) uint8 images the way torchvision's antialiased bicubic resize does on CPU."""
    if image.dtype != np.uint8 or image.ndim < 3:
        raise ValueError(f"expected (..., H, W, C) uint8 images, got {image.dtype} {image.shape}")
    h_axis, w_axis = image.ndim - 3, image.ndim - 2
    out = image
    if width != image.shape[w_axis]:
        out = _resample_axis(out, width, axis=w_axis)
    if height != image.shape[h_axis]:
        out = _resample_axis(out, height, axis=h_axis)
    return out


def resize_pil(image: np.ndarray, height: int, width: int, resample: int = PIL_BICUBIC) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image with Pillow, as transformers' PIL backend does."""
    resized = Image.fromarray(image).resize((width, height), resample=resample)
    return np.asarray(resized)


def resize(image: np.ndarray, height: int, width: int, backend: str, resample: int = PIL_BICUBIC) -> np.ndarray:
    if backend == "pil":
        return resize_pil(image, height, width, resample)
    if backend == "torchvision":
        if resample != PIL_BICUBIC:
            raise NotImplementedError(f"the torchvision-compatible resize only implements bicubic, got {resample}")
        if (height, width) == image.shape[-3:-1]:
            return image
        return resize_bicubic_torch(image, height, width)
    raise ValueError(f"unknown image backend {backend!r}; expected 'torchvision' or 'pil'")
