"""Image sources -> RGB uint8 arrays, with errors that name the offending item.

Accepted sources: `PIL.Image.Image`, numpy arrays (H, W), (H, W, C) or (C, H, W) of uint8, local paths
(`str` / `os.PathLike`), `file://` URLs, `http(s)://` URLs (urllib, with a timeout), `data:image/...;base64,`
URIs and bare base64 strings.

The RGB conversion mirrors transformers:
* a PIL image passed in is composited onto white when it has an alpha band or a `transparency` entry,
  otherwise `Image.convert("RGB")` (`image_transforms.convert_to_rgb`); both backends do this;
* an image read from a path/URL/base64 is `exif_transpose`d and `convert("RGB")`ed, alpha dropped, as
  `image_utils.load_image` does;
* numpy arrays: one channel is repeated, four channels are composited onto white -- in float64 with rounding
  for the PIL backend, in float32 with torchvision's `to_dtype` truncation for the torchvision backend.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import pathlib
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_TIMEOUT_S = 10.0


class InputError(ValueError):
    """A user input (image, video, text or message) that cannot be processed; the message names it."""


def check_text(text: str, name: str) -> None:
    """Refuse text that cannot be UTF-8 encoded for the tokenizer: lone surrogates, which is what Python makes
    of invalid UTF-8 bytes in a command line (`surrogateescape`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise InputError(f"{name}: not valid UTF-8 ({what} at character {exc.start})") from None


def describe(source: Any) -> str:
    """A short, printable description of a source for error messages."""
    if isinstance(source, str) and source[:5].lower() == "data:":
        # Not the declared media type: it is only a claim (a PNG labelled image/jpeg is common).
        return f"the base64 data URI ({len(source)} characters)"
    if isinstance(source, str) and _is_bare_base64(source):
        return f"the base64 image data ({len(source)} characters)"
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return repr(text if len(text) <= 80 else text[:60] + "..." + text[-12:])
    if isinstance(source, np.ndarray):
        return f"array{tuple(source.shape)} {source.dtype}"
    if isinstance(source, Image.Image):
        return f"PIL image {source.size[0]}x{source.size[1]} mode {source.mode}"
    return type(source).__name__


def fetch_url(url: str, name: str, timeout: float) -> bytes:
    """Bytes behind an http(s) URL; any network failure becomes an `InputError` naming the item."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http(s) only, checked)
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InputError(f"{name}: could not download {describe(url)}: {exc}") from exc


def read_source_bytes(source: str | os.PathLike, name: str, timeout: float) -> tuple[bytes | None, str | None]:
    """(bytes, None) for URL/base64 sources or (None, path) for local files."""
    text = os.fspath(source)
    if isinstance(source, str):
        lowered = text[:16].lower()
        if lowered.startswith(("http://", "https://")):
            return fetch_url(text, name, timeout), None
        if lowered.startswith("file://"):
            parsed = urllib.parse.urlparse(text)
            text = urllib.request.url2pathname(urllib.parse.unquote(parsed.path))
        elif lowered.startswith("data:"):
            header, _, payload = text.partition(",")
            if ";base64" not in header:
                raise InputError(f"{name}: only base64 data URIs are supported, got {describe(source)}")
            return _b64decode(payload, name, source), None
        elif not os.path.exists(text):
            # transformers treats any string that is not a file or URL as base64; do the same, but when it is
            # not valid base64 either, the honest message is that the file is missing.
            decoded = _try_b64decode(text)
            if decoded is not None:
                return decoded, None
    path = pathlib.Path(text)
    if not path.exists():
        raise InputError(f"{name}: no such file {describe(source)}")
    if not path.is_file():
        raise InputError(f"{name}: {describe(source)} is not a regular file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name}: {describe(source)} is not readable")
    return None, str(path)


def _is_bare_base64(text: str) -> bool:
    """Whether `read_source_bytes` reads this string as base64 rather than as a path or URL."""
    if text[:8].lower().startswith(("http://", "https://", "file://")) or os.path.exists(text):
        return False
    return _try_b64decode(text) is not None


def _try_b64decode(text: str) -> bytes | None:
    compact = "".join(text.split())
    if len(compact) < 16:
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _b64decode(payload: str, name: str, source: Any) -> bytes:
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{name}: invalid base64 in {describe(source)}: {exc}") from exc


def open_image(source: str | os.PathLike, name: str, timeout: float = DEFAULT_TIMEOUT_S,
               exif_transpose: bool = True) -> Image.Image:
    """Decode an image source fully (so truncation and decompression bombs surface here) and return it
    upright and in RGB, as transformers' `load_image` does (`exif_transpose=False`: as stored, as
    `Image.open(f).convert('RGB')` gives it -- InternVL's own loader and VLMEvalKit)."""
    data, path = read_source_bytes(source, name, timeout)
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
        # In place and without a same-mode convert: each copy of a large decoded image costs 4 bytes a pixel.
        if exif_transpose:
            ImageOps.exif_transpose(image, in_place=True)
        return image if image.mode == "RGB" else image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"{name}: {describe(source)} exceeds Pillow's decompression-bomb limit "
            f"(Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): {exc}"
        ) from exc
    except UnidentifiedImageError as exc:
        # Pillow's own message shows the repr of the file object (`<_io.BytesIO object at 0x...>`).
        raise InputError(f"{name}: cannot read {describe(source)} as an image: not a format Pillow knows") from exc
    except Exception as exc:  # Pillow's decoders fail on corrupt data with many exception types
        raise InputError(f"{name}: cannot read {describe(source)} as an image: {exc}") from exc


STRIP_PIXELS = 1 << 20


def rgb_array(image: Image.Image) -> np.ndarray:
    """An RGB image as an (H, W, 3) uint8 array, copied in horizontal strips: `np.asarray` of the whole image
    goes through `tobytes()`, which holds two more full-size copies at its peak."""
    width, height = image.size
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        out[top : top + rows] = np.asarray(image.crop((0, top, width, min(top + rows, height))))
    return out


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """transformers' `image_transforms.convert_to_rgb` for PIL images: alpha is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _channels_last(array: np.ndarray, name: str) -> np.ndarray:
    """(H, W, C) view, inferring the layout the way transformers' `infer_channel_dimension_format` does
    (channels first wins when both ends could be channels)."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise InputError(f"{name}: expected a 2-D or 3-D image array, got shape {array.shape}")
    if array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    if array.shape[-1] in (1, 3, 4):
        return array
    raise InputError(f"{name}: cannot find a 1, 3 or 4 channel axis in image array of shape {array.shape}")


def array_to_rgb(array: np.ndarray, backend: str, name: str) -> np.ndarray:
    if array.dtype != np.uint8:
        # transformers' float handling rescales twice (once around the PIL resize, once in `rescale`), so
        # there is no reference to match; ask for the unambiguous input instead.
        raise InputError(f"{name}: image arrays must be uint8 (0..255), got {array.dtype}")
    hwc = _channels_last(array, name)
    channels = hwc.shape[-1]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(hwc, 3, axis=-1))
    if channels == 3:
        return np.ascontiguousarray(hwc)
    if backend == "pil":
        alpha = hwc[..., 3:4] / 255
        composite = alpha * hwc[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    # torchvision: to_dtype(float32, scale=True), blend, to_dtype(uint8, scale=True) (x * 255.999, truncated).
    f = hwc.astype(np.float32) * np.float32(1 / 255)
    alpha = f[..., 3:4]
    blended = f[..., :3] * alpha + (np.float32(1) - alpha)
    return (blended * np.float32(255 + 1.0 - 1e-3)).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Reworked:
    """An image source with the changes an evaluation harness makes before tiling (image blocks with
    `"upscale": 2` / `"save_as": "jpeg"`): VLMEvalKit stores a base64 image under its `image_path` name, so a
    `.jpg` one is re-encoded as JPEG (Pillow's defaults), and MMMU's first image is resized 2x (bilinear)."""

    source: str | os.PathLike
    upscale: int = 1
    save_as: str | None = None  # "jpeg": encoded and decoded once more


def _reworked(job: Reworked, name: str, timeout: float, exif_transpose: bool) -> Image.Image:
    if job.save_as == "jpeg":
        # As VLMEvalKit's decode_base64_to_image_file: only RGBA / P / LA become RGB before the save.
        data, path = read_source_bytes(job.source, name, timeout)
        try:
            image = Image.open(io.BytesIO(data) if data is not None else path)
            image.load()
            if exif_transpose:
                ImageOps.exif_transpose(image, in_place=True)
            if image.mode in ("RGBA", "P", "LA"):
                image = image.convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG")
            image = Image.open(buffer).convert("RGB")
        except Exception as exc:  # Pillow's decoders and encoders fail with many exception types
            raise InputError(f"{name}: cannot read {describe(job.source)} as an image: {exc}") from exc
    else:
        image = open_image(job.source, name, timeout, exif_transpose)
    if job.upscale != 1:
        image = image.resize((image.width * job.upscale, image.height * job.upscale), Image.BILINEAR)
    return image


def load_rgb(source: Any, backend: str, name: str, timeout: float = DEFAULT_TIMEOUT_S,
             exif_transpose: bool = True) -> np.ndarray:
    """Any accepted image source -> (H, W, 3) uint8 RGB array."""
    if isinstance(source, Reworked):
        return rgb_array(_reworked(source, name, timeout, exif_transpose))
    if isinstance(source, Image.Image):
        try:
            rgb = pil_to_rgb(source)
        except (OSError, ValueError) as exc:
            raise InputError(f"{name}: cannot convert {describe(source)} to RGB: {exc}") from exc
    elif isinstance(source, np.ndarray):
        rgb = array_to_rgb(source, backend, name)
    elif isinstance(source, (str, os.PathLike)):
        rgb = rgb_array(open_image(source, name, timeout, exif_transpose))
    else:
        raise InputError(f"{name}: unsupported image type {type(source).__name__}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InputError(f"{name}: image {describe(source)} is empty")
    return rgb
