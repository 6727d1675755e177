"""Bad inputs fail with an error that names the offending item (and never silently misalign visuals)."""

from __future__ import annotations

import base64
import json
import pathlib
import shutil
from collections.abc import Callable

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


# --- broken checkpoint files: one ValueError naming the file (and the field), never a traceback from deep inside


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("good_ckpt")
    F.write_processor_files(directory)
    return directory


def _edit_json(name: str, **changes) -> Callable[[pathlib.Path], None]:
    def edit(directory: pathlib.Path) -> None:
        data = json.loads((directory / name).read_text())
        (directory / name).write_text(json.dumps({**data, **changes}))

    return edit


def _write(name: str, text: str) -> Callable[[pathlib.Path], None]:
    return lambda directory: (directory / name).write_text(text)


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (_write("tokenizer.json", '{"version": "1.0", "model": '), r"tokenizer\.json: cannot load it as a tokenizer"),
        (_write("tokenizer_config.json", "{oops"), r"tokenizer_config\.json: cannot read it as JSON"),
        (_write("tokenizer_config.json", "[1, 2]"), r"tokenizer_config\.json: expected a JSON object, got list"),
        (
            _write("chat_template.jinja", "{% for m in messages %}\n{{ m.content }"),
            r"chat_template\.jinja: chat template syntax error on line 2: unexpected '}'",
        ),
        (
            lambda d: (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}"),
            r"chat_template\.jinja: cannot read the chat template",
        ),
        (
            _edit_json("preprocessor_config.json", max_patches=0),
            r"preprocessor_config\.json: max_patches must be >= 1 and >= min_patches, got .* max_patches=0",
        ),
        (
            _edit_json("preprocessor_config.json", min_patches=13),
            r"preprocessor_config\.json: .*min_patches=13, max_patches=12",
        ),
        (
            _edit_json("preprocessor_config.json", size={"height": 0, "width": 448}),
            r"preprocessor_config\.json: size must be a positive height and width, got \(0, 448\)",
        ),
        (
            _edit_json("preprocessor_config.json", image_std=[0.2, 0.0, 0.2]),
            r"preprocessor_config\.json: image_std must not contain 0",
        ),
        (
            _edit_json("preprocessor_config.json", max_patches="many"),
            r"preprocessor_config\.json: invalid literal for int\(\) with base 10: 'many'",
        ),
        (
            _edit_json("video_preprocessor_config.json", num_frames=0),
            r"video_preprocessor_config\.json: num_frames must be a whole number >= 1 or null, got 0",
        ),
        (
            _edit_json("video_preprocessor_config.json", fps=float("inf")),
            r"video_preprocessor_config\.json: fps must be a finite number > 0 or null, got inf",
        ),
        (
            _edit_json("processor_config.json", image_seq_length=0),
            r"processor_config\.json: image_seq_length must be a whole number >= 1, got 0",
        ),
    ],
)
def test_broken_checkpoint_files_name_the_file(processor_dir: pathlib.Path, tmp_path: pathlib.Path, edit, pattern):
    directory = tmp_path / "ckpt"
    shutil.copytree(processor_dir, directory)
    edit(directory)
    with pytest.raises(ValueError, match=pattern) as info:
        InternVLProcessor.from_pretrained(directory)
    assert str(directory) in str(info.value)


def test_call_time_patch_limits_are_checked(processor: InternVLProcessor) -> None:
    # max_patches=0 used to tile as if it were 1, silently
    with pytest.raises(ValueError, match=r"max_patches=0"):
        processor(text="<IMG_CONTEXT>", images=[F.synthetic_rgb(20, 60, 0)], max_patches=0)


def test_template_errors(processor: InternVLProcessor) -> None:
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}"
    strict += "{% endif %}"
    with pytest.raises(InputError, match=r"the chat template rejected the messages: first message must be from"):
        processor.apply_chat_template([{"role": "assistant", "content": "hi"}], chat_template=strict)
    with pytest.raises(ValueError, match=r"the chat template: chat template syntax error on line 1"):
        processor.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{% if %}")


def test_text_that_is_not_utf8(processor: InternVLProcessor) -> None:
    # "\udcff" is what Python makes of the byte 0xff in a command line; the tokenizer raised a TypeError
    with pytest.raises(InputError, match=r"^text: not valid UTF-8 \(byte 0xff at character 3\)"):
        processor(text="abc\udcffdef")
    with pytest.raises(InputError, match=r"^text\[1\]: not valid UTF-8 \(lone surrogate U\+D800 at character 0\)"):
        processor(text=["fine", "\ud800"], padding=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "x\udcc3"}]}]
    with pytest.raises(InputError, match=r"^messages, message 0, content 1: not valid UTF-8 \(byte 0xc3"):
        processor.apply_chat_template(messages, tokenize=True)
    with pytest.raises(InputError, match=r"^messages, message 0: not valid UTF-8"):
        processor.apply_chat_template([{"role": "system", "content": "\udcff"}])


def test_image_errors_name_the_source_not_a_file_object(processor: InternVLProcessor, files: dict) -> None:
    png = files["good.png"].read_bytes()
    cut = base64.b64encode(png[:40]).decode()
    cases = {
        # a PNG labelled as JPEG (as VLMEvalKit TSVs do): the message must not repeat the label
        f"data:image/jpeg;base64,{cut}": r"images\[0\]: cannot read the base64 data URI \(\d+ characters\)",
        cut: r"images\[0\]: cannot read the base64 image data \(\d+ characters\) as an image: not a format Pillow",
        str(files["notes.txt"]): r"images\[0\]: cannot read '.*notes\.txt' as an image: not a format Pillow knows",
    }
    for source, pattern in cases.items():
        with pytest.raises(InputError, match=pattern) as info:
            one_image([source], processor)
        assert "BytesIO" not in str(info.value) and "jpeg" not in str(info.value)
