"""Frozen views of a checkpoint's `preprocessor_config.json` and `video_preprocessor_config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_json(path: pathlib.Path) -> dict:
    """A checkpoint's JSON settings file as a dict, {} when it is absent; a broken one is a ValueError that
    names the file (json's own message names only a line and column)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or not UTF-8
        raise ValueError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def settings_from_file(path: pathlib.Path, parse: Any, fallback: Mapping[str, Any] | None = None) -> Any:
    """`parse(dict)` of a JSON settings file (or of `fallback` when the file is absent), with any bad value
    reported against the file."""
    data = read_json(path)
    try:
        return parse(data if data or fallback is None else fallback)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


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


def _check_pixel_fields(config: Any) -> None:
    """What both configs need to give pixels at all (a zero tile size or std would divide by zero)."""
    if len(config.size) != 2 or min(config.size) < 1:
        raise ValueError(f"size must be a positive height and width, got {config.size}")
    if not math.isfinite(config.rescale_factor):
        raise ValueError(f"rescale_factor must be finite, got {config.rescale_factor}")
    for key in ("image_mean", "image_std"):
        values = getattr(config, key)
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"{key} must be 3 finite numbers (R, G, B), got {list(values)}")
    if 0.0 in config.image_std:
        raise ValueError(f"image_std must not contain 0, got {list(config.image_std)}")


def _is_number(value: Any, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)


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

    def __post_init__(self) -> None:
        _check_pixel_fields(self)
        # min_patches <= 1 all mean the same (every grid has a tile); no grid fits max_patches < 1.
        if self.max_patches < max(1, self.min_patches):
            raise ValueError(
                f"max_patches must be >= 1 and >= min_patches, got min_patches={self.min_patches}, "
                f"max_patches={self.max_patches}"
            )

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

    def __post_init__(self) -> None:
        _check_pixel_fields(self)
        if self.num_frames is not None and not (_is_number(self.num_frames, int) and self.num_frames >= 1):
            raise ValueError(f"num_frames must be a whole number >= 1 or null, got {self.num_frames!r}")
        if self.fps is not None and not (_is_number(self.fps, (int, float)) and 0 < self.fps < math.inf):
            raise ValueError(f"fps must be a finite number > 0 or null, got {self.fps!r}")

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
