"""Frozen views of a checkpoint's `preprocessor_config.json` and `video_preprocessor_config.json`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size(value: Any, default: tuple[int, int]) -> tuple[int, int]:
    """(height, width) from transformers' size spellings: {"height", "width"}, an int, or a pair."""
    if value is None:
        return default
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        raise ValueError(f"unsupported size {dict(value)}: only {{'height', 'width'}} is implemented")
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


def _triple(value: Any, default: tuple[float, ...]) -> tuple[float, ...]:
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


def _pixel_fields(data: Mapping[str, Any], d: Any) -> dict[str, Any]:
    """Resize / rescale / normalise settings, which image and video preprocessor configs share."""
    return {
        "size": _size(data.get("size"), d.size),
        "resample": int(data.get("resample", d.resample)),
        "do_resize": bool(data.get("do_resize", d.do_resize)),
        "do_rescale": bool(data.get("do_rescale", d.do_rescale)),
        "rescale_factor": float(data.get("rescale_factor", d.rescale_factor)),
        "do_normalize": bool(data.get("do_normalize", d.do_normalize)),
        "image_mean": _triple(data.get("image_mean"), d.image_mean),
        "image_std": _triple(data.get("image_std"), d.image_std),
    }


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """GotOcr2 image processor settings (InternVL3-1B-hf values as defaults)."""

    size: tuple[int, int] = (448, 448)  # (height, width) of one tile
    crop_to_patches: bool = True
    min_patches: int = 1
    max_patches: int = 12
    resample: int = 3  # PIL BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageConfig:
        d = cls()
        return cls(
            **_pixel_fields(data, d),
            # InternVLProcessor always passes crop_to_patches=True to its image processor (its class-level
            # `images_kwargs`), whatever the file says; a call-time argument can still turn it off.
            crop_to_patches=True,
            min_patches=int(data.get("min_patches", d.min_patches)),
            max_patches=int(data.get("max_patches", d.max_patches)),
            do_convert_rgb=bool(data.get("do_convert_rgb", d.do_convert_rgb) is not False),
        )


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """InternVLVideoProcessor settings: one resized tile per frame, optional frame sampling."""

    size: tuple[int, int] = (448, 448)
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    do_sample_frames: bool = False
    num_frames: int | None = None
    fps: float | None = None
    initial_shift: bool | float = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VideoConfig:
        d = cls()
        return cls(
            **_pixel_fields(data, d),
            do_sample_frames=bool(data.get("do_sample_frames") or False),
            num_frames=data.get("num_frames"),
            fps=data.get("fps"),
            initial_shift=data.get("initial_shift", d.initial_shift),
        )
