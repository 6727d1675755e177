"""Fuzzing the image path of the processor: any input either gives the promised outputs or an `InputError`.

Random sizes (1x1 up to a few thousand pixels, extreme aspect ratios), Pillow modes, numpy layouts, random
bytes, truncated and corrupted files, both image backends. The example counts keep the default run at about
half a minute; raise them with e.g. `--hypothesis-seed` / a profile when hunting.
"""

from __future__ import annotations

import base64
import io
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from internvl_jax import InternVLProcessor
from internvl_jax.processing.image import num_tiles
from internvl_jax.processing.loading import InputError
from tests import fixtures as F

MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F")
# Formats Pillow 13 writes (and reads back) each mode in, for the "read it back from a file" examples.
ALL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
FILE_FORMATS = {
    "1": ALL_FORMATS,
    "L": ALL_FORMATS,
    "LA": ("PNG", "TIFF", "WEBP", "GIF"),
    "P": ("PNG", "BMP", "TIFF", "WEBP", "GIF"),
    "RGB": ALL_FORMATS,
    "RGBA": ("PNG", "BMP", "TIFF", "WEBP", "GIF"),
    "CMYK": ("JPEG", "TIFF", "WEBP"),
    "I;16": ("PNG", "TIFF", "WEBP", "GIF"),
    "I": ("TIFF", "WEBP", "GIF"),
    "F": ("TIFF", "WEBP", "GIF"),
}
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# The examples that process big images cost ~0.2 s each: fewer of them.
FUZZ_LARGE = settings(FUZZ, max_examples=30)


@pytest.fixture(scope="module")
def processors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, InternVLProcessor]:
    directory = tmp_path_factory.mktemp("ckpt")
    F.write_processor_files(directory)
    return {b: InternVLProcessor.from_pretrained(directory, image_backend=b) for b in ("torchvision", "pil")}


@st.composite
def sizes(draw: st.DrawFn, max_side: int = 4000, max_area: int = 400_000) -> tuple[int, int]:
    """(width, height): either side from 1 to `max_side`, the other bounded by the area (extreme aspect
    ratios included), drawn in either order."""
    long = draw(st.integers(1, max_side))
    short = draw(st.integers(1, max(1, min(max_side, max_area // long))))
    return (long, short) if draw(st.booleans()) else (short, long)


def pil_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width), dtype=np.uint8).astype(bool))
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        values = rng.integers(-1000 if mode != "I;16" else 0, 66000 if mode != "I;16" else 65536, (height, width))
        return Image.fromarray(values.astype(dtype))
    bands = len(mode) if mode != "P" else 1
    data = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    image = Image.frombytes(mode, (width, height), data.tobytes())
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if seed % 3 == 0:
            image.info["transparency"] = int(seed % 256)
    return image


def check_outputs(out: dict, processor: InternVLProcessor, size: tuple[int, int] | None = None) -> None:
    """What `__call__` promises for one image: float32 [tiles, 3, 448, 448], tiles = num_patches, and one
    <img> + 256 <IMG_CONTEXT> per tile + </img> in the ids."""
    pixels, patches, ids = out["pixel_values"], out["num_patches"], out["input_ids"]
    assert pixels.dtype == np.float32 and pixels.shape[1:] == (3, 448, 448)
    assert patches.dtype == np.int64 and patches.shape == (1,) and pixels.shape[0] == patches[0]
    assert patches[0] == 1 or 3 <= patches[0] <= 13  # one tile, or a 2..12 tile grid plus the thumbnail
    assert np.isfinite(pixels).all()
    assert int((ids == processor.image_token_id).sum()) == processor.image_seq_length * patches[0]
    assert ids.dtype == np.int64 and out["attention_mask"].shape == ids.shape
    if size is not None:
        width, height = size
        assert patches[0] == num_tiles(height, width, processor.image_config)
        assert processor.num_image_tokens(height, width) == 2 + processor.image_seq_length * patches[0]


def run(processor: InternVLProcessor, image, size: tuple[int, int] | None = None) -> None:
    """Process one image: an InputError is an accepted answer, anything else must have the promised shapes."""
    try:
        out = processor(text="look: <IMG_CONTEXT>", images=[image])
    except InputError as exc:
        assert str(exc).startswith("images[0]: ") and "\n" not in str(exc)
        assert "BytesIO" not in str(exc)
        return
    check_outputs(out, processor, size)


@FUZZ_LARGE
@given(st.sampled_from(MODES), sizes(), st.integers(0, 2**16), st.sampled_from(("torchvision", "pil")))
def test_pil_images(processors: dict, mode: str, size: tuple[int, int], seed: int, backend: str) -> None:
    image = pil_image(mode, *size, seed)
    out = processors[backend](text="look: <IMG_CONTEXT>", images=[image])  # every mode must work in memory
    check_outputs(out, processors[backend], size)


@FUZZ_LARGE
@given(
    st.sampled_from(MODES),
    sizes(max_side=2500, max_area=150_000),
    st.integers(0, 2**16),
    st.sampled_from(("torchvision", "pil")),
    st.data(),
)
def test_image_files(processors: dict, tmp_path: pathlib.Path, mode, size, seed, backend, data) -> None:
    fmt = data.draw(st.sampled_from(FILE_FORMATS[mode]))
    buffer = io.BytesIO()
    pil_image(mode, *size, seed).save(buffer, format=fmt)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(buffer.getvalue())
    as_base64 = data.draw(st.booleans())
    source = base64.b64encode(buffer.getvalue()).decode() if as_base64 else str(path)
    out = processors[backend](text="look: <IMG_CONTEXT>", images=[source])  # a valid file must be readable
    check_outputs(out, processors[backend], size)


@st.composite
def array_shapes(draw: st.DrawFn, max_values: int = 300_000) -> list[int]:
    """1 to 4 dimensions of 1..1000 each, at most `max_values` values in all."""
    shape: list[int] = []
    for _ in range(draw(st.integers(1, 4))):
        room = max_values // max(1, int(np.prod(shape)))
        shape.append(draw(st.integers(1, max(1, min(1000, room)))))
    return shape


@FUZZ
@given(
    array_shapes(),
    st.sampled_from((np.uint8, np.uint16, np.float32, np.bool_, np.int64)),
    st.integers(0, 2**16),
    st.sampled_from(("torchvision", "pil")),
)
def test_numpy_arrays(processors: dict, shape: list[int], dtype, seed: int, backend: str) -> None:
    # odd shapes (1, 2, 5 channels, 1-D, 4-D batches) and dtypes: the promised outputs or an InputError
    if len(shape) == 3 and shape[-1] <= 6 and np.random.default_rng(seed).random() < 0.5:
        shape[-1] = int(np.random.default_rng(seed).integers(1, 6))
    array = (np.random.default_rng(seed).random(shape) * 255).astype(dtype)
    if array.ndim == 4:
        array = array[:1]  # a batch of one image: still one placeholder
    size = None
    if array.dtype == np.uint8 and array.ndim in (2, 3):
        hwc = array if array.ndim == 2 or array.shape[0] not in (1, 3, 4) else np.moveaxis(array, 0, -1)
        size = (hwc.shape[1], hwc.shape[0])
    run(processors[backend], array, size)


@FUZZ
@given(st.binary(max_size=3000), st.sampled_from(("file", "base64", "data-uri")))
def test_random_bytes(processors: dict, tmp_path: pathlib.Path, blob: bytes, how: str) -> None:
    source = _source(blob, how, tmp_path)
    run(processors["torchvision"], source)


@FUZZ
@given(
    st.sampled_from(("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")),
    sizes(max_side=600, max_area=40_000),
    st.integers(0, 2**16),
    st.sampled_from(("truncate", "corrupt")),
    st.data(),
)
def test_truncated_and_corrupted_files(processors: dict, tmp_path: pathlib.Path, fmt, size, seed, damage, data):
    buffer = io.BytesIO()
    Image.fromarray(F.synthetic_rgb(size[1], size[0], seed % 1000)).save(buffer, format=fmt)
    blob = bytearray(buffer.getvalue())
    if damage == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        for offset in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8)):
            blob[offset] ^= 1 << data.draw(st.integers(0, 7))
    source = _source(bytes(blob), data.draw(st.sampled_from(("file", "base64", "data-uri"))), tmp_path)
    run(processors[data.draw(st.sampled_from(("torchvision", "pil")))], source)


def _source(blob: bytes, how: str, directory: pathlib.Path) -> str:
    if how == "file":
        path = directory / "fuzzed.bin"
        path.write_bytes(blob)
        return str(path)
    encoded = base64.b64encode(blob).decode()
    return encoded if how == "base64" else f"data:image/png;base64,{encoded}"
