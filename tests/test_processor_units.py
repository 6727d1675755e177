"""Processor pieces checked against independent references that run in-process (no torchvision needed): the
tokenizer against tiktoken and transformers' Qwen2Tokenizer, the resize kernel against torch's own uint8
kernel, tile grids against transformers' `get_optimal_tiled_canvas`, frame sampling against `torch.arange`,
the PIL-backend pixels against `GotOcr2ImageProcessorPil`, the chat rendering against transformers'
`render_jinja_template`; plus the input sources (file://, http, base64, EXIF) and the output API."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import pathlib
import threading
import tracemalloc
import unicodedata

import numpy as np
import pytest
from PIL import Image

from internvl_jax import InternVLProcessor
from internvl_jax.processing import loading
from internvl_jax.processing import resize as resize_mod
from internvl_jax.processing.image import optimal_grid
from internvl_jax.processing.loading import load_rgb
from internvl_jax.processing.video import decode_video, sample_indices
from tests import fixtures as F

TEXTS = [
    "Hello world!",
    "  multiple   spaces\n\n\ttabs\r\n",
    "日本語のテキストと中文",
    "émoji 🤖🚀 code: def f(x):\n    return x**2",
    "12345 numbers 3.14159 and 1e-9",
    "I'm don't they'll WE'RE",
    "e\u0301 composed vs é precomposed",  # NFC normalisation matters here
    "<|im_start|>user\n<img><IMG_CONTEXT></img> <quad></quad><ref>x</ref><box>(1,2)</box><|im_end|>",
    '<tool_call>{"a": 1}</tool_call><|fim_prefix|>',
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("ckpt")
    F.write_processor_files(directory)
    return directory


@pytest.fixture(scope="module")
def processor(ckpt: pathlib.Path) -> InternVLProcessor:
    return InternVLProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def hf_tokenizer(ckpt: pathlib.Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


# --- tokenizer -------------------------------------------------------------------------------------------------


def test_tokenizer_json_is_qwen2_bpe(processor: InternVLProcessor) -> None:
    import tiktoken

    enc = tiktoken.Encoding("qwen", pat_str=F.QWEN2_SPLIT_REGEX, mergeable_ranks=F.qwen_bpe_ranks(), special_tokens={})
    for text in TEXTS[:7]:
        assert processor.tokenizer.encode_batch([text])[0] == enc.encode(unicodedata.normalize("NFC", text))


def test_tokenizer_matches_transformers(processor: InternVLProcessor, hf_tokenizer) -> None:
    ours = processor.tokenizer.encode_batch(TEXTS)
    assert ours == [hf_tokenizer(t)["input_ids"] for t in TEXTS]
    # The same ids come back from every special and added token, at the ids the files give them.
    for tid, token, _ in F.all_added_tokens():
        assert processor.tokenizer.token_to_id(token) == tid == hf_tokenizer.convert_tokens_to_ids(token)
    assert len(processor.tokenizer) == len(hf_tokenizer)


@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_transformers(processor: InternVLProcessor, hf_tokenizer, skip: bool) -> None:
    rng = np.random.default_rng(0)
    specials = [tid for tid, _, _ in F.all_added_tokens()]
    batch = [
        list(rng.integers(0, 151643, 40)) + specials + list(rng.integers(0, 151643, 5)),
        processor.tokenizer.encode_batch(TEXTS[7:8])[0],
        processor.tokenizer.encode_batch(["Réponse: oui 👍"])[0],
    ]
    for ids in batch:
        assert processor.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)
    assert processor.batch_decode(batch, skip_special_tokens=skip) == hf_tokenizer.batch_decode(
        batch, skip_special_tokens=skip
    )
    padded = np.array([batch[1], batch[1]])
    assert processor.decode(padded, skip_special_tokens=skip) == hf_tokenizer.decode(padded, skip_special_tokens=skip)


def test_token_ids_are_read_from_the_files(tmp_path: pathlib.Path) -> None:
    """Move InternVL's tokens to other ids in the files: the processor must follow, nothing is hard-coded."""
    F.write_processor_files(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    moved = {"<img>": 151670, "</img>": 151668, "<IMG_CONTEXT>": 151672}
    for entry in data["added_tokens"]:
        if entry["content"] in moved:
            entry["id"] = moved[entry["content"]]
        elif entry["id"] in moved.values():
            entry["id"] = {151670: 151665, 151668: 151666, 151672: 151667}[entry["id"]]
    data["added_tokens"].sort(key=lambda e: e["id"])  # `tokenizers` numbers added tokens in file order
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_length": 64}))
    p = InternVLProcessor.from_pretrained(tmp_path)
    assert (p.start_image_token_id, p.end_image_token_id, p.image_token_id) == (151670, 151668, 151672)
    assert (p.eos_token_id, p.pad_token_id, p.image_seq_length) == (151643, 151643, 64)
    out = p(text="<IMG_CONTEXT>", images=[F.synthetic_rgb(20, 20, 0)])
    assert out["input_ids"].tolist() == [[151670] + [151672] * 64 + [151668]]


def test_engine_ids(processor: InternVLProcessor) -> None:
    assert processor.image_token_id == 151667 and processor.image_token == "<IMG_CONTEXT>"
    assert (processor.start_image_token_id, processor.end_image_token_id) == (151665, 151666)
    assert (processor.eos_token_id, processor.pad_token_id, processor.bos_token_id) == (151645, 151643, None)
    assert processor.image_seq_length == 256 and processor.video_token == "<video>"


# --- resize, grids, sampling -------------------------------------------------------------------------------------

RESIZE_CASES = [
    (1, 1, 448, 448),
    (2, 3, 448, 896),
    (300, 4000, 448, 5376),
    (4000, 300, 5376, 448),
    (480, 640, 448, 448),
    (97, 333, 448, 1344),
    (672, 224, 448, 448),
    (449, 1343, 448, 1344),
    (1080, 1920, 448, 448),
    (7, 2500, 448, 448),
]


@pytest.mark.parametrize("h,w,oh,ow", RESIZE_CASES)
def test_resize_kernel_matches_torch(h: int, w: int, oh: int, ow: int) -> None:
    import torch

    img = F.synthetic_rgb(h, w, h * 7 + w)
    ours = resize_mod.resize_bicubic_torch(img, oh, ow)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False)
    np.testing.assert_array_equal(ours, ref[0].permute(1, 2, 0).numpy())


def test_resize_pil_is_pillow() -> None:
    img = F.synthetic_rgb(123, 77, 3)
    expected = np.asarray(Image.fromarray(img).resize((448, 896), Image.BICUBIC))
    np.testing.assert_array_equal(resize_mod.resize(img, 896, 448, "pil"), expected)


def test_grid_choice_matches_transformers() -> None:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    rng = np.random.default_rng(0)
    sizes = [(h, w) for h in (1, 2, 100, 224, 448, 449, 896, 1000, 1344) for w in (1, 3, 224, 448, 672, 900, 1792)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    for h, w in sizes:
        for lo, hi in ((1, 12), (1, 6), (2, 9), (1, 1)):
            assert optimal_grid(h, w, 448, 448, lo, hi) == get_optimal_tiled_canvas((h, w), (448, 448), lo, hi)


def test_sample_indices_match_torch_arange() -> None:
    import torch

    for total in range(1, 130):
        for n in range(1, total + 1):
            ref = torch.arange(total / n / 2, total, total / n).int().numpy()
            np.testing.assert_array_equal(sample_indices(total, n, None, None), ref, err_msg=f"{total=} {n=}")
    # fps: int(total / video_fps * fps) frames
    assert len(sample_indices(30, None, 6, 24.0)) == 7
    np.testing.assert_array_equal(sample_indices(10, 4, None, None, initial_shift=False), [0, 2, 5, 7])


# --- pixels against the PIL backend in-process -----------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,h,w", [("RGB", 300, 4000), ("RGBA", 61, 87), ("P", 448, 449), ("I;16", 33, 1), ("LA", 5, 900)]
)
def test_pil_backend_pixels(ckpt: pathlib.Path, mode: str, h: int, w: int) -> None:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    cfg = {k: v for k, v in F.preprocessor_config().items() if k not in ("image_processor_type", "processor_class")}
    ref = GotOcr2ImageProcessorPil(**cfg)
    image = F.synthetic_image(mode, h, w, 5)
    expected = ref(image, crop_to_patches=True, return_tensors="np")
    ours = InternVLProcessor.from_pretrained(ckpt, image_backend="pil")(text="<IMG_CONTEXT>", images=image)
    np.testing.assert_array_equal(ours["pixel_values"], expected["pixel_values"])
    assert ours["num_patches"].tolist() == list(expected["num_patches"])


# --- chat rendering ------------------------------------------------------------------------------------------------


def test_render_matches_transformers(processor: InternVLProcessor) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    image = {"type": "image", "image": Image.new("RGB", (4, 4))}
    convs = [
        [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}],
        [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "video", "url": "v.mp4"}, {"type": "text", "text": "x"}]},
            {"role": "assistant", "content": "answer"},
            {"role": "user", "content": [{"type": "text", "text": "é"}, image, image]},
        ],
    ]
    for gen in (False, True):
        ours = [processor.apply_chat_template(c, add_generation_prompt=gen) for c in convs]
        ref, _ = render_jinja_template(
            conversations=convs, chat_template=processor.chat_template, add_generation_prompt=gen
        )
        assert ours == ref
    assert processor.apply_chat_template(convs) == ref[:0] + [processor.apply_chat_template(c) for c in convs]


def test_chat_template_sources(tmp_path: pathlib.Path) -> None:
    F.write_processor_files(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    p = InternVLProcessor.from_pretrained(tmp_path)
    assert p.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    (tmp_path / "chat_template.json").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "[{{ messages | length }}]"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    p = InternVLProcessor.from_pretrained(tmp_path)
    assert p.apply_chat_template([{"role": "user", "content": "hi"}]) == "[1]"


# --- sources ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def png(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("img") / "pic ture.png"
    Image.fromarray(F.synthetic_rgb(90, 130, 3)).save(path)
    return path


def test_image_sources_agree(processor: InternVLProcessor, png: pathlib.Path) -> None:
    expected = processor(text="<IMG_CONTEXT>", images=Image.open(png))["pixel_values"]
    b64 = base64.b64encode(png.read_bytes()).decode()
    for source in (str(png), png, png.as_uri(), f"data:image/png;base64,{b64}", b64, np.asarray(Image.open(png))):
        np.testing.assert_array_equal(processor(text="<IMG_CONTEXT>", images=source)["pixel_values"], expected)


def test_http_image(processor: InternVLProcessor, png: pathlib.Path) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(png.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/pic%20ture.png"
        got = processor(text="<IMG_CONTEXT>", images=url)["pixel_values"]
        np.testing.assert_array_equal(got, processor(text="<IMG_CONTEXT>", images=png)["pixel_values"])
        with pytest.raises(ValueError, match=r"images\[0\].*could not download.*missing\.png"):
            processor(text="<IMG_CONTEXT>", images=url.replace("pic%20ture", "missing"))
    finally:
        server.shutdown()


def test_exif_orientation_like_transformers(processor: InternVLProcessor, tmp_path: pathlib.Path) -> None:
    from transformers.image_utils import load_image

    image = Image.fromarray(F.synthetic_rgb(60, 200, 4))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.jpg", exif=exif)
    upright = load_image(str(tmp_path / "rot.jpg"))
    assert upright.size == (60, 200)
    got = processor(text="<IMG_CONTEXT>", images=str(tmp_path / "rot.jpg"))
    np.testing.assert_array_equal(got["pixel_values"], processor(text="<IMG_CONTEXT>", images=upright)["pixel_values"])


def test_gray_arrays(processor: InternVLProcessor) -> None:
    gray = F.synthetic_rgb(40, 70, 6)[..., 0]
    expected = processor(text="<IMG_CONTEXT>", images=Image.fromarray(gray))["pixel_values"]
    for arr in (gray, gray[..., None], gray[None]):
        np.testing.assert_array_equal(processor(text="<IMG_CONTEXT>", images=arr)["pixel_values"], expected)


def test_video_decoding(tmp_path: pathlib.Path) -> None:
    frames = F.synthetic_video(12, 64, 96, 1)
    mp4 = F.write_video(tmp_path / "a.mp4", frames, fps=12)
    webm = F.write_video(tmp_path / "a.webm", frames, fps=12, codec="libvpx-vp9")  # no frame count in header
    for path in (mp4, webm):
        got, meta, idx = decode_video(path, "v", num_frames=4, sample=True)
        assert meta.total_num_frames == 12 and meta.fps == 12.0 and got.shape == (4, 64, 96, 3)
        assert idx.tolist() == [1, 4, 7, 10]
        # Lossy codecs: each decoded frame must be closest to the source frame of its index.
        for k, i in enumerate(idx):
            dist = [np.abs(got[k].astype(int) - f.astype(int)).mean() for f in frames]
            assert int(np.argmin(dist)) == i


def test_in_memory_videos(processor: InternVLProcessor) -> None:
    frames = F.synthetic_video(10, 50, 60, 2)
    as_array = processor(text="<video>", videos=frames, num_frames=5)
    as_pil = processor(text="<video>", videos=[Image.fromarray(f) for f in frames], num_frames=5)
    np.testing.assert_array_equal(as_array["pixel_values"], as_pil["pixel_values"])
    np.testing.assert_array_equal(
        as_array["pixel_values"], processor(text="<video>", videos=frames[[1, 3, 5, 7, 9]])["pixel_values"]
    )
    assert as_array["num_patches"].tolist() == [5]


# --- output API ---------------------------------------------------------------------------------------------------


def test_outputs_layout(processor: InternVLProcessor) -> None:
    images = [F.synthetic_rgb(300, 900, 1), F.synthetic_rgb(50, 50, 2), F.synthetic_rgb(900, 300, 3)]
    out = processor(
        text=["a <IMG_CONTEXT> b", "<IMG_CONTEXT> and <IMG_CONTEXT> longer row"],
        images=[[images[0]], [images[1], images[2]]],
        padding=True,
        return_tensors="np",
    )
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "num_patches"}
    assert out.input_ids is out["input_ids"]
    counts = [processor.num_image_tokens(*im.shape[:2]) for im in images]
    assert out["num_patches"].tolist() == [(c - 2) // 256 for c in counts] == [4, 1, 4]
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape
    assert (ids == processor.image_token_id).sum(axis=1).tolist() == [256 * 4, 256 * 5]
    # left padding with the pad id
    pad = mask.shape[1] - mask[0].sum()
    assert pad > 0 and (mask[0, :pad] == 0).all() and (ids[0, :pad] == processor.pad_token_id).all()
    assert (mask[1] == 1).all()
    assert out["pixel_values"].shape == (9, 3, 448, 448) and out["pixel_values"].dtype == np.float32
    with pytest.raises(ValueError, match="padding=True"):
        processor(text=["a", "longer text"])
    right = processor(text=["a", "longer text"], padding=True, padding_side="right")
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0


def test_chat_tokenize_and_return_dict(processor: InternVLProcessor) -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": F.synthetic_rgb(32, 32, 0)}, {"type": "text", "text": "Hi"}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<IMG_CONTEXT>\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    full = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    np.testing.assert_array_equal(ids, full["input_ids"])
    decoded = processor.decode(full["input_ids"][0])
    assert decoded.startswith("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT>") and decoded.endswith("assistant\n")
    assert processor.decode(full["input_ids"][0], skip_special_tokens=True) == "user\n\nHi\nassistant\n"
    assert processor.post_process_image_text_to_text(full["input_ids"]) == ["user\n\nHi\nassistant\n"]


def _traced_peak(fn, *args):
    """Peak bytes allocated through Python's allocators (numpy arrays and bytes included) while fn runs."""
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_resize_does_not_copy_the_source_to_int32() -> None:
    # It used to widen the whole source to int32 first: 4 bytes per value (1.7 GB for a 12000x12000 image).
    image = F.synthetic_rgb(2000, 3000, 0)
    peak = _traced_peak(resize_mod.resize_bicubic_torch, image, 448, 448)
    assert peak < 2 * image.nbytes, f"{peak / 2**20:.0f} MiB for a {image.nbytes / 2**20:.0f} MiB image"


def test_large_image_file_is_read_without_full_size_byte_copies(tmp_path: pathlib.Path) -> None:
    # np.asarray(pil_image) goes through tobytes(), which held two more full-size copies at its peak.
    path = tmp_path / "large.png"
    rgb = F.synthetic_rgb(3000, 3000, 0)
    Image.fromarray(rgb).save(path, compress_level=1)
    peak = _traced_peak(load_rgb, str(path), "torchvision", "images[0]")
    assert peak < 1.5 * rgb.nbytes, f"{peak / 2**20:.0f} MiB for a {rgb.nbytes / 2**20:.0f} MiB image"
    np.testing.assert_array_equal(load_rgb(str(path), "torchvision", "images[0]"), rgb)


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (17, 2), (3, 40)])
def test_rgb_array_strips_are_exact(monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]) -> None:
    monkeypatch.setattr(loading, "STRIP_PIXELS", 7)  # several strips, the last one short
    image = Image.fromarray(F.synthetic_rgb(size[1], size[0], 3))
    np.testing.assert_array_equal(loading.rgb_array(image), np.asarray(image))
