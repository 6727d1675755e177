"""Parity of `internvl_jax.InternVLProcessor` with transformers' `InternVLProcessor` loaded from the same
checkpoint directory: token ids and masks exactly, pixel values within PIXEL_ATOL (see docs/processor.md),
tile counts exactly.

transformers runs in a subprocess (see `tests.fixtures.transformers_reference`: its video processor needs
torchvision, whose registry wheel only imports with a workaround); these tests are skipped when no torchvision
can be found (`INTERNVL_TORCHVISION_DIR`).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from internvl_jax import InternVLProcessor
from tests import fixtures as F

# Skipped only outside CI: CI installs torchvision (README's test command), so there a missing one fails loudly.
pytestmark = pytest.mark.skipif(
    not F.torchvision_available() and not os.environ.get("CI"),
    reason=f"transformers' InternVLProcessor needs torchvision: pip install --no-deps --target DIR "
    f"torchvision==0.28.0 and set {F.TORCHVISION_DIR_ENV}=DIR",
)

BACKENDS = ("torchvision", "pil")
# Measured: both backends are reproduced bit for bit (docs/processor.md).
PIXEL_ATOL = {"torchvision": 0.0, "pil": 0.0}
PROMPT = "<|im_start|>user\n<IMG_CONTEXT>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
CTX_ID, START_ID, END_ID = 151667, 151665, 151666


@dataclasses.dataclass(frozen=True)
class ImageCase:
    id: str
    make: Callable[[], Any]
    backends: tuple[str, ...] = BACKENDS


def _rgb(h: int, w: int, seed: int) -> Callable[[], Image.Image]:
    return lambda: Image.fromarray(F.synthetic_rgb(h, w, seed))


def _mode(mode: str, h: int, w: int, seed: int) -> Callable[[], Image.Image]:
    return lambda: F.synthetic_image(mode, h, w, seed)


RGB_SIZES = [
    (1, 1),
    (2, 2),
    (3, 5),
    (16, 16),
    (100, 100),
    (447, 449),
    (448, 448),
    (224, 672),
    (672, 224),
    (300, 4000),
    (4000, 300),
    (480, 640),
    (640, 480),
    (720, 1280),
    (1000, 1000),
    (97, 333),
    (333, 97),
    (2, 900),
    (900, 2),
    (896, 448),
    (448, 896),
    (1344, 448),
    (449, 1343),
    (1500, 1500),
    (512, 2048),
]
IMAGE_CASES = [ImageCase(f"rgb{h}x{w}", _rgb(h, w, i)) for i, (h, w) in enumerate(RGB_SIZES)]
IMAGE_CASES += [
    ImageCase("RGBA97x333", _mode("RGBA", 97, 333, 100)),
    ImageCase("LA200x150", _mode("LA", 200, 150, 101)),
    ImageCase("P150x200", _mode("P", 150, 200, 102)),
    ImageCase("P-transparency120x90", _mode("P-transparency", 120, 90, 103)),
    ImageCase("L300x301", _mode("L", 300, 301, 104)),
    ImageCase("CMYK64x80", _mode("CMYK", 64, 80, 105)),
    ImageCase("I16_50x60", _mode("I;16", 50, 60, 106)),
    ImageCase("1bit40x70", _mode("1", 40, 70, 107)),
    ImageCase("I32_30x40", _mode("I", 30, 40, 108)),
    ImageCase("np_rgb123x456", lambda: F.synthetic_rgb(123, 456, 109)),
    ImageCase(
        "np_rgba77x150",
        lambda: np.concatenate(
            [F.synthetic_rgb(77, 150, 110), np.random.default_rng(110).integers(0, 256, (77, 150, 1), np.uint8)], -1
        ),
    ),
    ImageCase("np_hw1_60x80", lambda: F.synthetic_rgb(60, 80, 111)[..., :1]),
    ImageCase("np_chw90x120", lambda: np.ascontiguousarray(F.synthetic_rgb(90, 120, 112).transpose(2, 0, 1))),
    ImageCase("np_rgb_batch_of_one", lambda: F.synthetic_rgb(250, 180, 113)[None]),
]


def _b64(path: pathlib.Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("ckpt")
    F.write_processor_files(directory)
    return directory


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("media")
    files = {
        "h264": F.write_video(d / "clip.mp4", F.synthetic_video(17, 120, 160, 1), fps=10),
        "mpeg4": F.write_video(d / "clip_mpeg4.mp4", F.synthetic_video(30, 96, 304, 2), fps=24, codec="mpeg4"),
        "mjpeg": F.write_video(
            d / "clip.avi", F.synthetic_video(9, 64, 64, 3), fps=5, codec="mjpeg", pix_fmt="yuvj420p"
        ),
    }
    rgb = F.synthetic_rgb(333, 500, 7)
    Image.fromarray(rgb).save(d / "a.png")
    Image.fromarray(rgb).save(d / "a.jpg", quality=90)
    F.synthetic_image("RGBA", 200, 300, 8).save(d / "rgba.png")
    F.synthetic_image("I;16", 120, 90, 9).save(d / "i16.png")
    F.synthetic_image("P-transparency", 120, 90, 9).save(d / "ptrans.png", transparency=0)
    exif_image = Image.fromarray(F.synthetic_rgb(200, 300, 10))
    exif = exif_image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    exif_image.save(d / "exif.jpg", exif=exif)
    Image.fromarray(F.synthetic_rgb(50, 70, 11)).convert("CMYK").save(d / "cmyk.jpg")
    for name in ("a.png", "a.jpg", "rgba.png", "i16.png", "ptrans.png", "exif.jpg", "cmyk.jpg"):
        files[name] = d / name
    return files


# --- the requests sent to transformers ----------------------------------------------------------------------

FILE_IMAGES = ("a.png", "a.jpg", "rgba.png", "i16.png", "ptrans.png", "exif.jpg", "cmyk.jpg")


def _video_calls(media: dict[str, pathlib.Path]) -> dict[str, dict]:
    """Processor calls with videos (and images); `videos` are paths, which transformers gets decoded."""
    img = [F.synthetic_image("RGBA", 97, 333, 100), Image.fromarray(F.synthetic_rgb(300, 500, 5))]
    return {
        "h264_num_frames8": {"text": "<video>\nDescribe.", "videos": [media["h264"]], "num_frames": 8},
        "h264_num_frames17": {"text": "<video>\nDescribe.", "videos": [media["h264"]], "num_frames": 17},
        "h264_num_frames2": {"text": "<video>", "videos": [media["h264"]], "num_frames": 2},
        "mpeg4_fps6": {"text": "<video>\nWhat happens?", "videos": [media["mpeg4"]], "fps": 6},
        "mpeg4_num_frames5": {"text": "<video>", "videos": [media["mpeg4"]], "num_frames": 5},
        "mjpeg_all_frames": {"text": "Clip: <video>\n", "videos": [media["mjpeg"]]},
        "two_videos_padded": {
            "text": ["<video> a", "a much longer row: <video> and more text after it"],
            "videos": [media["h264"], media["mpeg4"]],
            "num_frames": 4,
            "padding": True,
        },
        "interleaved_rows": {
            "text": ["<IMG_CONTEXT>\n<video>\nq1", "<video>\n<IMG_CONTEXT> then q2"],
            "images": img,
            "videos": [media["mjpeg"], media["h264"]],
            "num_frames": 3,
            "padding": True,
        },
    }


def _chat_cases(media: dict[str, pathlib.Path]) -> dict[str, dict]:
    """apply_chat_template calls: (kwargs, transformers image backend, our image backend)."""
    pil = [Image.fromarray(F.synthetic_rgb(h, w, s)) for h, w, s in [(300, 500, 20), (64, 900, 21), (800, 600, 22)]]
    system = {"role": "system", "content": "You are a careful assistant."}
    tok = {"tokenize": True, "return_dict": True, "add_generation_prompt": True}
    cases = {
        "pipeline_url": (
            {
                "conversation": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "url": str(media["a.png"])},
                            {"type": "text", "text": "Describe this image."},
                        ],
                    }
                ],
                **tok,
            },
            "pil",
        ),
        "single_pil_image": (
            {
                "conversation": [
                    {"role": "user", "content": [{"type": "image", "image": pil[0]}, {"type": "text", "text": "Hi"}]}
                ],
                **tok,
            },
            "torchvision",
        ),
        "base64_image": (
            {
                "conversation": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "base64": _b64(media["a.jpg"])}, {"type": "text", "text": "?"}],
                    }
                ],
                **tok,
            },
            "pil",
        ),
        "text_only_multi_turn": (
            {
                "conversation": [
                    system,
                    {"role": "user", "content": "Write a haiku about tiles."},
                    {"role": "assistant", "content": [{"type": "text", "text": "Four tiles and a thumb,"}]},
                    {"role": "user", "content": [{"type": "text", "text": "Another, in Français: été, naïve."}]},
                ],
                **tok,
            },
            "torchvision",
        ),
        "batched_different_image_counts": (
            {
                "conversation": [
                    [{"role": "user", "content": [{"type": "image", "image": pil[0]}, {"type": "text", "text": "A?"}]}],
                    [
                        system,
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "Compare "},
                                {"type": "image", "image": pil[1]},
                                {"type": "text", "text": " and "},
                                {"type": "image", "image": pil[2]},
                                {"type": "image", "image": pil[0]},
                            ],
                        },
                    ],
                ],
                "padding": True,
                **tok,
            },
            "torchvision",
        ),
        "video_num_frames": (
            {
                "conversation": [
                    {
                        "role": "user",
                        "content": [{"type": "video", "path": media["h264"]}, {"type": "text", "text": "What moves?"}],
                    }
                ],
                "num_frames": 8,
                **tok,
            },
            "torchvision",
        ),
        "video_fps": (
            {
                "conversation": [
                    system,
                    {
                        "role": "user",
                        "content": [{"type": "video", "url": media["h264"]}, {"type": "text", "text": "?"}],
                    },
                ],
                "fps": 5,
                **tok,
            },
            "torchvision",
        ),
        "interleaved_image_video_batch": (
            {
                "conversation": [
                    [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image", "image": pil[1]},
                                {"type": "video", "path": media["mpeg4"]},
                                {"type": "text", "text": "Same scene?"},
                            ],
                        }
                    ],
                    [
                        {
                            "role": "user",
                            "content": [{"type": "video", "path": media["h264"]}, {"type": "text", "text": "?"}],
                        }
                    ],
                ],
                "num_frames": 4,
                "padding": True,
                **tok,
            },
            "torchvision",
        ),
    }
    return cases


def _text_chat_cases() -> dict[str, dict]:
    """Rendering only (tokenize=False)."""
    image = {"type": "image", "url": "http://example.invalid/x.png"}
    return {
        "render_single": {
            "conversation": [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}],
            "add_generation_prompt": True,
        },
        "render_batched": {
            "conversation": [
                [{"role": "user", "content": "plain"}],
                [
                    {"role": "system", "content": "sys"},
                    {
                        "role": "user",
                        "content": [image, {"type": "video", "url": "v.mp4"}, {"type": "text", "text": "x"}],
                    },
                    {"role": "assistant", "content": "answer"},
                ],
            ],
        },
        "render_continue_final_message": {
            "conversation": [
                {"role": "user", "content": "Count to three."},
                {"role": "assistant", "content": [{"type": "text", "text": "One, two,"}]},
            ],
            "continue_final_message": True,
        },
    }


@pytest.fixture(scope="module")
def reference(ckpt: pathlib.Path, media: dict[str, pathlib.Path]) -> dict[tuple, dict]:
    requests: dict[tuple, dict] = {}
    for case in IMAGE_CASES:
        for backend in case.backends:
            requests[("image", case.id, backend)] = {
                "backend": backend,
                "kwargs": {"text": PROMPT, "images": [case.make()], "return_tensors": "pt"},
            }
    for name in FILE_IMAGES:
        # transformers' torchvision backend decodes paths with torchvision.io, whose extension does not load
        # from the CUDA wheel here; its PIL backend decodes with `load_image`. For the torchvision backend we
        # feed it `load_image`'s output, which is what our loader produces for a path.
        requests[("file", name, "pil")] = {
            "backend": "pil",
            "kwargs": {"text": PROMPT, "images": [str(media[name])], "return_tensors": "pt"},
        }
        requests[("file", name, "torchvision")] = {
            "backend": "torchvision",
            "load_images_with_transformers": True,
            "kwargs": {"text": PROMPT, "images": [str(media[name])], "return_tensors": "pt"},
        }
    for name, call in _video_calls(media).items():
        kwargs = {**call, "videos": [str(v) for v in call["videos"]], "return_tensors": "pt"}
        if "num_frames" in call or "fps" in call:
            kwargs["do_sample_frames"] = True
        requests[("video", name)] = {"kwargs": kwargs}
    for name, (kwargs, backend) in _chat_cases(media).items():
        requests[("chat", name)] = {
            "backend": backend,
            "pass_video_metadata": True,  # frame count and rate of each decoded video, for fps sampling
            "method": "apply_chat_template",
            "kwargs": {**_stringify_paths(kwargs), "return_tensors": "pt"},
        }
    for name, kwargs in _text_chat_cases().items():
        requests[("render", name)] = {"method": "apply_chat_template", "kwargs": kwargs}
    results = F.transformers_reference(ckpt, list(requests.values()))
    return dict(zip(requests, results, strict=True))


def _stringify_paths(value: Any) -> Any:
    if isinstance(value, pathlib.Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _stringify_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify_paths(v) for v in value]
    return value


@pytest.fixture(scope="module")
def processors(ckpt: pathlib.Path) -> dict[str, InternVLProcessor]:
    return {b: InternVLProcessor.from_pretrained(ckpt, image_backend=b) for b in BACKENDS}


# --- comparison ---------------------------------------------------------------------------------------------


def tiles_from_ids(input_ids: np.ndarray) -> list[int]:
    """Tiles per visual, read off transformers' token ids: each image is <img> + 256 * tiles context tokens +
    </img>; a video contributes one such block per frame."""
    counts = []
    for row in np.atleast_2d(input_ids):
        starts = np.flatnonzero(row == START_ID)
        ends = np.flatnonzero(row == END_ID)
        counts += [int((row[s:e] == CTX_ID).sum()) // 256 for s, e in zip(starts, ends, strict=True)]
    return counts


def assert_matches(ours: dict, ref: dict, atol: float, per_visual_counts: bool = True) -> None:
    assert "error" not in ref, ref.get("error")
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    assert ours["input_ids"].dtype == np.int64
    if "pixel_values" not in ref:
        assert "pixel_values" not in ours
        return
    assert ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=atol)
    assert ours["pixel_values"].shape[0] == int(ours["num_patches"].sum())
    blocks = tiles_from_ids(ref["input_ids"])
    assert int(ours["num_patches"].sum()) == sum(blocks)
    if per_visual_counts:  # images only: one <img>...</img> block per image
        np.testing.assert_array_equal(ours["num_patches"], blocks)


# --- tests ----------------------------------------------------------------------------------------------------


# Only the (image, backend) pairs transformers' backend accepts: no test is collected just to be skipped.
@pytest.mark.parametrize(
    "case, backend",
    [pytest.param(c, b, id=f"{c.id}-{b}") for c in IMAGE_CASES for b in BACKENDS if b in c.backends],
)
def test_image_parity(case: ImageCase, backend: str, reference: dict, processors: dict) -> None:
    ours = processors[backend](text=PROMPT, images=[case.make()], return_tensors="np")
    assert_matches(ours, reference[("image", case.id, backend)], PIXEL_ATOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FILE_IMAGES)
def test_file_image_parity(name: str, backend: str, reference: dict, processors: dict, media: dict) -> None:
    ours = processors[backend](text=PROMPT, images=[str(media[name])])
    assert_matches(ours, reference[("file", name, backend)], PIXEL_ATOL[backend])


def test_the_two_backends_really_differ(reference: dict) -> None:
    """The zero tolerances above mean something only if transformers' two backends disagree: measure how much
    (the numbers quoted in docs/processor.md) and require a visible difference on resized photos."""
    diffs = {}
    for case in IMAGE_CASES:
        if set(BACKENDS) <= set(case.backends):
            a = reference[("image", case.id, "torchvision")]["pixel_values"]
            b = reference[("image", case.id, "pil")]["pixel_values"]
            diffs[case.id] = float(np.abs(a - b).max())
    # One level of a uint8 channel is 1 / (255 * std) ~ 0.0175 after ImageNet normalisation.
    levels = {k: round(v * 255 * 0.229, 1) for k, v in diffs.items()}
    print("\ntransformers torchvision vs PIL backend, max |diff| in uint8 levels:", levels)
    assert max(diffs.values()) > 0.017, diffs
    assert sum(d > 0 for d in diffs.values()) >= len(diffs) // 2, diffs


@pytest.mark.parametrize("name", list(_video_calls({k: pathlib.Path(k) for k in ("h264", "mpeg4", "mjpeg")})))
def test_video_parity(name: str, reference: dict, processors: dict, media: dict) -> None:
    call = dict(_video_calls(media)[name])
    ours = processors["torchvision"](**call)
    ref = reference[("video", name)]
    assert_matches(ours, ref, PIXEL_ATOL["torchvision"], per_visual_counts=False)
    if "num_frames" in call and "images" not in call:
        assert list(ours["num_patches"]) == [call["num_frames"]] * len(call["videos"])


@pytest.mark.parametrize(
    "name",
    [
        "pipeline_url",
        "single_pil_image",
        "base64_image",
        "text_only_multi_turn",
        "batched_different_image_counts",
        "video_num_frames",
        "video_fps",
        "interleaved_image_video_batch",
    ],
)
def test_chat_template_parity(name: str, reference: dict, processors: dict, media: dict) -> None:
    kwargs, backend = _chat_cases(media)[name]
    ours = processors[backend].apply_chat_template(**kwargs)
    assert_matches(ours, reference[("chat", name)], PIXEL_ATOL[backend], per_visual_counts="video" not in name)


@pytest.mark.parametrize("name", list(_text_chat_cases()))
def test_rendered_prompt_parity(name: str, reference: dict, processors: dict) -> None:
    ref = reference[("render", name)]
    assert "error" not in ref, ref.get("error")
    assert processors["torchvision"].apply_chat_template(**_text_chat_cases()[name]) == ref["text"]
