"""Bad inputs fail with an error that names the offending item (and never silently misalign visuals)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from internvl_jax import InternVLProcessor
from internvl_jax.processing.loading import InputError
from tests import fixtures as F


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> InternVLProcessor:
    directory = tmp_path_factory.mktemp("ckpt")
    F.write_processor_files(directory)
    return InternVLProcessor.from_pretrained(directory)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("bad")
    good_png = d / "good.png"
    Image.fromarray(F.synthetic_rgb(100, 100, 0)).save(good_png)
    (d / "truncated.png").write_bytes(good_png.read_bytes()[:600])
    (d / "notes.txt").write_text("not an image at all")
    F.write_video(d / "clip.mp4", F.synthetic_video(17, 64, 64, 1), fps=10)
    (d / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    # index first (faststart), then cut: the header still promises 17 frames
    full = F.write_video(
        d / "faststart.mp4", F.synthetic_video(17, 64, 64, 1), fps=10, container_options={"movflags": "faststart"}
    )
    (d / "truncated.mp4").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (d / "a_directory.png").mkdir()
    return {p.name: p for p in d.iterdir()}


def one_image(images, processor: InternVLProcessor, text: str = "look: <IMG_CONTEXT>"):
    return processor(text=text, images=images)


@pytest.mark.parametrize(
    "name,pattern",
    [
        ("missing.png", r"images\[0\]: no such file .*missing\.png"),
        ("a_directory.png", r"images\[0\]: .*a_directory\.png' is not a regular file"),
        ("notes.txt", r"images\[0\]: cannot read .*notes\.txt' as an image"),
        ("truncated.png", r"images\[0\]: cannot read .*truncated\.png' as an image"),
    ],
)
def test_bad_image_files(processor: InternVLProcessor, files: dict, name: str, pattern: str) -> None:
    path = files.get(name, pathlib.Path(next(iter(files.values()))).parent / name)
    with pytest.raises(InputError, match=pattern):
        one_image([path], processor)
    # the same through a chat message names the message and content item
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "path": str(path)}]}]
    with pytest.raises(InputError, match=r"message 0, content 1 \(image\)"):
        processor.apply_chat_template(messages, tokenize=True)


def test_decompression_bomb(processor: InternVLProcessor, files: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 is more than twice this
    with pytest.raises(InputError, match=r"images\[1\]: .*good\.png' exceeds Pillow's decompression-bomb limit"):
        processor(text="<IMG_CONTEXT><IMG_CONTEXT>", images=[F.synthetic_rgb(8, 8, 0), files["good.png"]])


def test_bad_base64_and_urls(processor: InternVLProcessor) -> None:
    with pytest.raises(InputError, match=r"images\[0\]: invalid base64"):
        one_image(["data:image/png;base64,@@not-base64@@"], processor)
    with pytest.raises(InputError, match=r"images\[0\]: cannot read .* as an image"):
        one_image(["data:image/png;base64,aGVsbG8gd29ybGQ="], processor)
    with pytest.raises(InputError, match=r"images\[0\]: could not download 'http://127\.0\.0\.1:9/x\.png'"):
        one_image(["http://127.0.0.1:9/x.png"], processor)


def test_bad_image_objects(processor: InternVLProcessor) -> None:
    with pytest.raises(InputError, match=r"images\[0\]: image arrays must be uint8"):
        one_image([np.zeros((10, 10, 3), np.float32)], processor)
    with pytest.raises(InputError, match=r"images\[0\]: cannot find a 1, 3 or 4 channel axis"):
        one_image([np.zeros((10, 10, 5), np.uint8)], processor)
    with pytest.raises(InputError, match=r"images\[0\]: unsupported image type int"):
        one_image([7], processor)
    with pytest.raises(InputError, match=r"images\[0\]: image .* is empty"):
        one_image([Image.new("RGB", (0, 5))], processor)


@pytest.mark.parametrize(
    "name,pattern",
    [
        ("garbage.mp4", r"videos\[0\]: cannot (open|decode) .*garbage\.mp4"),
        # depending on where the cut falls, the decoder errors out or runs out of frames early
        ("truncated.mp4", r"videos\[0\]: (cannot decode .*truncated\.mp4'|.*truncated\.mp4' declares 17 frames but)"),
        ("nope.mp4", r"videos\[0\]: no such file .*nope\.mp4"),
    ],
)
def test_bad_video_files(processor: InternVLProcessor, files: dict, name: str, pattern: str) -> None:
    path = pathlib.Path(files["clip.mp4"]).parent / name
    with pytest.raises(InputError, match=pattern):
        processor(text="<video>", videos=[path], num_frames=16 if name == "truncated.mp4" else None)


def test_video_with_too_few_frames(processor: InternVLProcessor, files: dict) -> None:
    with pytest.raises(InputError, match=r"videos\[0\]: asked for 50 frames but the video has only 17"):
        processor(text="<video>", videos=[files["clip.mp4"]], num_frames=50)
    messages = [{"role": "user", "content": [{"type": "video", "url": str(files["clip.mp4"])}]}]
    with pytest.raises(InputError, match=r"message 0, content 0 \(video\): asked for 18 frames .* only 17"):
        processor.apply_chat_template(messages, tokenize=True, num_frames=18)
    with pytest.raises(InputError, match=r"videos\[0\]: asked for 11 frames but the video has only 10"):
        processor(text="<video>", videos=F.synthetic_video(10, 8, 8, 0), num_frames=11)
    with pytest.raises(InputError, match=r"videos\[0\]: sampling asks for 0 frames"):
        processor(text="<video>", videos=[files["clip.mp4"]], fps=0.01)
    with pytest.raises(InputError, match=r"videos\[0\]: sampling with fps=2 needs the video's frame rate"):
        processor(text="<video>", videos=F.synthetic_video(10, 8, 8, 0), fps=2)


def test_placeholder_counts(processor: InternVLProcessor) -> None:
    img = F.synthetic_rgb(20, 20, 0)
    with pytest.raises(InputError, match=r"1 <IMG_CONTEXT> placeholder\(s\) .* but 2 image\(s\) were given"):
        processor(text="<IMG_CONTEXT>", images=[img, img])
    with pytest.raises(InputError, match=r"3 <IMG_CONTEXT> placeholder\(s\) \(per row \[2, 1\]\) but 2 image"):
        processor(text=["<IMG_CONTEXT><IMG_CONTEXT>", "<IMG_CONTEXT>"], images=[img, img])
    with pytest.raises(InputError, match=r"1 <IMG_CONTEXT> placeholder\(s\) .* but 0 image"):
        processor(text="<IMG_CONTEXT>")
    # per-row lists must line up with the rows (transformers would silently shift images between rows)
    with pytest.raises(InputError, match=r"text row 0 has 1 <IMG_CONTEXT> placeholder\(s\) but its image list has 2"):
        processor(text=["<IMG_CONTEXT>", "<IMG_CONTEXT><IMG_CONTEXT>"], images=[[img, img], [img]])
    with pytest.raises(InputError, match=r"got 1 per-row image lists for 2 text rows"):
        processor(text=["<IMG_CONTEXT>", "x"], images=[[img]])
    with pytest.raises(InputError, match=r"1 <video> placeholder\(s\) but 0 video"):
        processor(text="<video>")
    with pytest.raises(InputError, match=r"0 <video> placeholder\(s\) but 1 video"):
        processor(text="no video here", videos=[F.synthetic_video(3, 8, 8, 0)])


@pytest.mark.parametrize(
    "messages,pattern",
    [
        ({"role": "user", "content": "hi"}, r"messages must be a non-empty list"),
        ("hello", r"messages must be a non-empty list"),
        ([], r"messages must be a non-empty list"),
        (["hello"], r"messages, message 0: a message must be a dict"),
        ([{"content": "hi"}], r"messages, message 0: missing or non-string 'role'"),
        ([{"role": "user", "content": 5}], r"messages, message 0: 'content' must be a string or a list"),
        ([{"role": "user", "content": ["hi"]}], r"message 0, content 0: a content item must be a dict"),
        ([{"role": "user", "content": [{"text": "hi"}]}], r"content 0: unknown content type None"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio", "url": "a.wav"}]}],
            r"messages, message 0, content 1: unknown content type 'audio'",
        ),
        ([{"role": "user", "content": [{"type": "image"}]}], r"content 0: an image item needs exactly one of"),
        ([{"role": "user", "content": [{"type": "text"}]}], r"content 0: a text item needs a string 'text'"),
        ([[{"role": "user", "content": "a"}], {"role": "user"}], r"conversation 1: expected a list of message dicts"),
    ],
)
def test_malformed_messages(processor: InternVLProcessor, messages, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        processor.apply_chat_template(messages, tokenize=True)


def test_bad_arguments(processor: InternVLProcessor) -> None:
    with pytest.raises(InputError, match="text is required"):
        processor(images=[F.synthetic_rgb(8, 8, 0)])
    with pytest.raises(InputError, match="text must be a string or a non-empty list of strings"):
        processor(text=[1, 2])
    with pytest.raises(ValueError, match="returns numpy"):
        processor(text="hi", return_tensors="pt")
    with pytest.raises(TypeError, match="unexpected processor_kwargs"):
        processor.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True, processor_kwargs={"foo": 1})
    with pytest.raises(ValueError, match="image_backend must be one of"):
        InternVLProcessor(processor.tokenizer, image_backend="opencv")
