"""`InternVLProcessor`: text + images + videos -> the numpy inputs of an InternVL3 model, the same token ids,
masks and pixels as transformers' `InternVLProcessor` (see docs/processor.md for the pixel tolerances)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .chat import collect_media, compile_template, normalize_conversations, render
from .configs import ImageConfig, VideoConfig, read_json, settings_from_file
from .image import num_tiles, process_image
from .loading import DEFAULT_TIMEOUT_S, InputError, check_text, load_rgb
from .tokenizer import Tokenizer
from .video import load_video

IMAGE_BACKENDS = ("torchvision", "pil")
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
)
# Keyword arguments of `__call__` that `apply_chat_template` forwards to it.
PAD_KEYS = ("padding", "padding_side", "max_length", "pad_to_multiple_of")
IMAGE_KWARGS = ("crop_to_patches", "min_patches", "max_patches")
VIDEO_KWARGS = ("num_frames", "fps", "do_sample_frames", "initial_shift")
CALL_KWARGS = (*PAD_KEYS, *IMAGE_KWARGS, *VIDEO_KWARGS, "add_special_tokens", "return_tensors", "return_num_patches")
# Fallbacks for checkpoints whose tokenizer_config.json lacks InternVL's named tokens.
DEFAULT_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


class BatchFeature(dict):
    """The processor's output: a dict of numpy arrays that also allows attribute access."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _resolve_dir(path: str | os.PathLike, revision: str | None) -> pathlib.Path:
    local = pathlib.Path(path)
    if local.is_dir():
        return local
    if local.exists() or os.fspath(path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path} is not a checkpoint directory")
    from huggingface_hub import snapshot_download  # only for hub ids

    return pathlib.Path(snapshot_download(os.fspath(path), revision=revision, allow_patterns=list(PROCESSOR_FILES)))


def _load_chat_template(directory: pathlib.Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja, then chat_template.json, then the tokenizer config, as transformers looks."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            template, origin = jinja_file.read_text(encoding="utf-8"), jinja_file
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{jinja_file}: cannot read the chat template ({exc})") from exc
    else:
        origin = directory / "chat_template.json"
        template = read_json(origin).get("chat_template")
        if template is None:
            template, origin = tokenizer_config.get("chat_template"), directory / "tokenizer_config.json"
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
    if template is not None:
        # Compiled now so that a syntax error names the file it is in, not the first chat call.
        compile_template(template, origin=str(origin))
    return template


def _is_image(x: Any) -> bool:
    return isinstance(x, (Image.Image, str, os.PathLike)) or (isinstance(x, np.ndarray) and x.ndim in (2, 3))


def _expand_batches(images: Sequence[Any]) -> list[Any]:
    """A 4-D array inside a list of images is a batch of images, as in transformers."""
    out: list[Any] = []
    for image in images:
        out.extend(list(image) if isinstance(image, np.ndarray) and image.ndim == 4 else [image])
    return out


def _is_frame(x: Any) -> bool:
    return isinstance(x, Image.Image) or (isinstance(x, np.ndarray) and x.ndim == 3)


def _flatten_videos(videos: Any) -> list[Any]:
    """transformers' `make_batched_videos`: a path, a 4-D array or a list of frames is one video; a 5-D array
    or a (nested) list of those is several."""
    if isinstance(videos, (str, os.PathLike)):
        return [videos]
    if isinstance(videos, np.ndarray):
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 5:
            return list(videos)
        raise InputError(f"videos: expected a 4-D or 5-D array, got shape {videos.shape}")
    if isinstance(videos, (list, tuple)):
        if videos and all(_is_frame(v) for v in videos):
            return [list(videos)]
        flat: list[Any] = []
        for item in videos:
            flat.extend(_flatten_videos(item))
        return flat
    raise InputError(f"videos: unsupported video input of type {type(videos).__name__}")


class InternVLProcessor:
    """Tokenizer, image tiler and video sampler of an InternVL3 checkpoint (`OpenGVLab/InternVL3-*-hf`).

    `image_backend` picks which of transformers' image processors to reproduce bit for bit: "torchvision"
    (`GotOcr2ImageProcessor`, what `AutoProcessor` loads whenever torchvision is installed -- and
    InternVLProcessor cannot load without it) or "pil" (`GotOcr2ImageProcessorPil`). Videos always follow
    the torchvision video processor, the only one transformers has.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_config: ImageConfig | None = None,
        video_config: VideoConfig | None = None,
        image_seq_length: int = 256,
        chat_template: str | None = None,
        image_backend: str = "torchvision",
        timeout: float = DEFAULT_TIMEOUT_S,
        exif_transpose: bool = True,
    ) -> None:
        if image_backend not in IMAGE_BACKENDS:
            raise ValueError(f"image_backend must be one of {IMAGE_BACKENDS}, got {image_backend!r}")
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageConfig()
        self.video_config = video_config or VideoConfig()
        self.image_seq_length = int(image_seq_length)
        self.chat_template = chat_template
        self.image_backend = image_backend
        self.timeout = timeout
        self.exif_transpose = exif_transpose  # False: images as stored (what InternVL's original loader sees)
        tokens = {key: tokenizer.special_tokens_map.get(key, default) for key, default in DEFAULT_TOKENS.items()}
        self.start_image_token = tokens["start_image_token"]
        self.end_image_token = tokens["end_image_token"]
        self.image_token = tokens["context_image_token"]
        self.video_token = tokens["video_token"]
        self.start_image_token_id = self._required_id(self.start_image_token, "start_image_token")
        self.end_image_token_id = self._required_id(self.end_image_token, "end_image_token")
        self.image_token_id = self._required_id(self.image_token, "context_image_token")
        self.video_token_id = tokenizer.token_to_id(self.video_token)
        self._visual_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )

    def _required_id(self, token: str, key: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no token {token!r} (tokenizer_config.json `{key}`)")
        return token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        image_backend: str = "torchvision",
        timeout: float = DEFAULT_TIMEOUT_S,
        revision: str | None = None,
        exif_transpose: bool = True,
    ) -> InternVLProcessor:
        """Load from a checkpoint directory laid out like `OpenGVLab/InternVL3-1B-hf` (or a hub id, fetched
        with huggingface_hub)."""
        directory = _resolve_dir(path, revision)
        tokenizer = Tokenizer.from_dir(directory)
        image_file = directory / "preprocessor_config.json"
        image_config = settings_from_file(image_file, ImageConfig.from_dict)
        # Without a video file the video processor takes the image processor's settings.
        video_config = settings_from_file(
            directory / "video_preprocessor_config.json", VideoConfig.from_dict, fallback=read_json(image_file)
        )
        processor_file = directory / "processor_config.json"
        processor_dict = read_json(processor_file)
        image_seq_length = processor_dict.get("image_seq_length", 256)
        if isinstance(image_seq_length, bool) or not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(
                f"{processor_file}: image_seq_length must be a whole number >= 1, got {image_seq_length!r}"
            )
        chat_template = _load_chat_template(directory, tokenizer.config) or processor_dict.get("chat_template")
        return cls(
            tokenizer,
            image_config,
            video_config,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
            image_backend=image_backend,
            timeout=timeout,
            exif_transpose=exif_transpose,
        )

    # --- ids the engine needs --------------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.special_token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.special_token_id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.special_token_id("bos_token")

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.start_image_token_id, self.end_image_token_id]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def num_image_tokens(self, height: int, width: int, **image_kwargs: Any) -> int:
        """Tokens one image of this size expands to: `<img>` + 256 per tile + `</img>`."""
        config = self._image_config(**image_kwargs)
        return 2 + self.image_seq_length * num_tiles(height, width, config)

    # --- main entry points -----------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        videos: Any = None,
        *,
        return_tensors: str | None = "np",
        padding: bool | str = False,
        padding_side: str = "left",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        add_special_tokens: bool = True,
        crop_to_patches: bool | None = None,
        min_patches: int | None = None,
        max_patches: int | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        do_sample_frames: bool | None = None,
        initial_shift: bool | float | None = None,
        return_num_patches: bool = True,
    ) -> BatchFeature:
        """Expand `<IMG_CONTEXT>` / `<video>` placeholders, tokenize and process the visuals.

        Returns `input_ids` and `attention_mask` (int64, [batch, seq], left padded when `padding`),
        `pixel_values` (float32, [tiles, 3, 448, 448], visuals in the order their placeholders appear, row by
        row) and `num_patches` (int64, tiles per visual in that order; a video counts its frames).
        transformers' InternVLProcessor computes `num_patches` but drops it from its output."""
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors={return_tensors!r}: this processor returns numpy arrays ('np')")
        if text is None:
            raise InputError("text is required: write one <IMG_CONTEXT> per image and one <video> per video")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("text must be a string or a non-empty list of strings")
        for row, sample in enumerate(texts):
            check_text(sample, "text" if isinstance(text, str) else f"text[{row}]")
        if do_sample_frames is None and (num_frames is not None or fps is not None):
            # transformers ignores num_frames/fps in a direct call unless do_sample_frames=True (only its
            # apply_chat_template switches sampling on); asking for frames here always samples them.
            do_sample_frames = True
        image_items = self._image_items(images, texts)
        video_items = [(v, f"videos[{i}]") for i, v in enumerate(_flatten_videos(videos))] if videos is not None else []
        return self._process(
            texts,
            image_items,
            video_items,
            image_kwargs={"crop_to_patches": crop_to_patches, "min_patches": min_patches, "max_patches": max_patches},
            video_kwargs={
                "num_frames": num_frames,
                "fps": fps,
                "do_sample_frames": do_sample_frames,
                "initial_shift": initial_shift,
            },
            pad_kwargs={
                "padding": padding,
                "padding_side": padding_side,
                "max_length": max_length,
                "pad_to_multiple_of": pad_to_multiple_of,
            },
            add_special_tokens=add_special_tokens,
            return_num_patches=return_num_patches,
        )

    def apply_chat_template(
        self,
        conversation: Any,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        processor_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render messages (one conversation, or a list of them) with the chat template; with `tokenize=True`
        also load their images/videos and run `__call__` (keyword arguments of `__call__`, such as `padding`,
        `num_frames`, `fps`, `return_tensors`, may be given directly or in `processor_kwargs`)."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this processor has no chat template (chat_template.jinja / chat_template.json)")
        conversations, is_batched = normalize_conversations(conversation)
        call_kwargs = dict(processor_kwargs or {})
        unknown = set(call_kwargs) - set(CALL_KWARGS)
        if unknown:
            raise TypeError(f"unexpected processor_kwargs {sorted(unknown)}; accepted: {', '.join(CALL_KWARGS)}")
        template_kwargs = {}
        for key, value in kwargs.items():
            # Like transformers, processor arguments may come as plain keywords; the rest feed the template.
            (call_kwargs if key in CALL_KWARGS else template_kwargs)[key] = value
        prompts = render(
            template,
            conversations,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **{**self.tokenizer.special_tokens_map, "tools": None, "documents": None, **template_kwargs},
        )
        if not tokenize:
            return prompts if is_batched else prompts[0]
        media = collect_media(conversations, is_batched)
        if (call_kwargs.get("num_frames") is not None or call_kwargs.get("fps") is not None) and call_kwargs.get(
            "do_sample_frames"
        ) is None:
            # As transformers: asking for a frame count or rate switches sampling on.
            call_kwargs["do_sample_frames"] = True
        bos = self.tokenizer.special_tokens_map.get("bos_token")
        if bos is not None and prompts[0].startswith(bos):
            call_kwargs["add_special_tokens"] = False
        image_items = [[(m.source, m.name) for m in row if m.kind == "image"] for row in media]
        video_items = [(m.source, m.name) for row in media for m in row if m.kind == "video"]
        self._check_counts(prompts, image_items, nested=True)
        flat_images = [item for row in image_items for item in row]
        if call_kwargs.get("return_tensors", "np") not in (None, "np"):
            raise ValueError(f"return_tensors={call_kwargs['return_tensors']!r}: this processor returns numpy")
        out = self._process(
            prompts,
            flat_images,
            video_items,
            image_kwargs={k: call_kwargs.get(k) for k in IMAGE_KWARGS},
            video_kwargs={k: call_kwargs.get(k) for k in VIDEO_KWARGS},
            pad_kwargs={k: call_kwargs[k] for k in PAD_KEYS if k in call_kwargs},
            add_special_tokens=call_kwargs.get("add_special_tokens", True),
            return_num_patches=call_kwargs.get("return_num_patches", True),
        )
        return out if return_dict else out["input_ids"]

    def decode(self, token_ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def post_process_image_text_to_text(self, generated: Any, skip_special_tokens: bool = True) -> list[str]:
        """Generated ids (one sequence or a batch) -> decoded texts, special tokens skipped by default."""
        decoded = self.decode(generated, skip_special_tokens=skip_special_tokens)
        return [decoded] if isinstance(decoded, str) else decoded

    # --- internals -------------------------------------------------------------------------------------------

    def _image_config(
        self, crop_to_patches: bool | None = None, min_patches: int | None = None, max_patches: int | None = None
    ) -> ImageConfig:
        changes = {"crop_to_patches": crop_to_patches, "min_patches": min_patches, "max_patches": max_patches}
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self.image_config, **changes) if changes else self.image_config

    def _image_items(self, images: Any, texts: list[str]) -> list[tuple[Any, str]]:
        """Flatten `images` (one image, a list, an (N, H, W, C) array, or one list per text row) and check the
        count against the placeholders, per row when the images come per row."""
        if images is None:
            self._check_counts(texts, [[]], nested=False)
            return []
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if _is_image(images):
            flat = [(images, "images[0]")]
            self._check_counts(texts, [flat], nested=False)
            return flat
        if not isinstance(images, (list, tuple)):
            raise InputError(f"images: unsupported input of type {type(images).__name__}")
        if images and all(isinstance(row, (list, tuple)) for row in images):
            if len(images) != len(texts):
                raise InputError(
                    f"images: got {len(images)} per-row image lists for {len(texts)} text rows; give one list per row"
                )
            rows = [
                [(img, f"images[{r}][{i}]") for i, img in enumerate(_expand_batches(row))]
                for r, row in enumerate(images)
            ]
            self._check_counts(texts, rows, nested=True)
            return [item for row in rows for item in row]
        flat = [(img, f"images[{i}]") for i, img in enumerate(_expand_batches(images))]
        self._check_counts(texts, [flat], nested=False)
        return flat

    def _check_counts(self, texts: list[str], rows: list[list[Any]], nested: bool) -> None:
        counts = [t.count(self.image_token) for t in texts]
        given = [len(r) for r in rows]
        if sum(counts) != sum(given):
            raise InputError(
                f"the text has {sum(counts)} {self.image_token} placeholder(s) (per row {counts}) but "
                f"{sum(given)} image(s) were given; write one {self.image_token} per image"
            )
        if nested:
            for r, (want, got) in enumerate(zip(counts, given, strict=True)):
                if want != got:
                    raise InputError(
                        f"text row {r} has {want} {self.image_token} placeholder(s) but its image list has {got}"
                    )

    def expanded_length(self, prompt: str, tiles: Sequence[int]) -> int:
        """Tokens that `apply_chat_template(..., tokenize=True)` gives for a rendered prompt whose i-th
        placeholder is an image of `tiles[i]` tiles (or a video of that many frames), as `num_patches` reports
        them; counts past the prompt's placeholders are ignored. What a prefix of a conversation costs without
        loading its images again (fine-tuning's labels)."""
        n = len(self._visual_kinds(prompt))
        if n > len(tiles):
            raise InputError(f"the text has {n} image/video placeholder(s) but {len(tiles)} tile count(s) were given")
        bos = self.tokenizer.special_tokens_map.get("bos_token")
        add_special = not (bos is not None and prompt.startswith(bos))
        return len(self.tokenizer.encode_batch([self._expand(prompt, [int(t) for t in tiles[:n]])], add_special)[0])

    def _visual_kinds(self, sample: str) -> list[str]:
        """"image" / "video" for each placeholder of a text, in order."""
        return [m.lastgroup for m in self._visual_pattern.finditer(sample)]

    def _expand(self, sample: str, tiles: list[int]) -> str:
        """The text with its i-th placeholder replaced by the tokens of `tiles[i]` tiles (or frames)."""
        start, end, ctx = self.start_image_token, self.end_image_token, self.image_token
        pieces, last = [], 0
        for match, n in zip(self._visual_pattern.finditer(sample), tiles, strict=True):
            pieces.append(sample[last : match.start()])
            last = match.end()
            if match.lastgroup == "image":
                pieces.append(f"{start}{ctx * (self.image_seq_length * n)}{end}")
            else:
                frame = f"{start}{ctx * self.image_seq_length}{end}"
                pieces.append("\n".join(f"Frame{i + 1}: {frame}" for i in range(n)))
        pieces.append(sample[last:])
        return "".join(pieces)

    def _process(
        self,
        texts: list[str],
        image_items: list[tuple[Any, str]],
        video_items: list[tuple[Any, str]],
        image_kwargs: dict,
        video_kwargs: dict,
        pad_kwargs: dict,
        add_special_tokens: bool,
        return_num_patches: bool,
    ) -> BatchFeature:
        n_video_tokens = sum(t.count(self.video_token) for t in texts)
        if n_video_tokens != len(video_items):
            raise InputError(
                f"the text has {n_video_tokens} {self.video_token} placeholder(s) but {len(video_items)} video(s) "
                f"were given; write one {self.video_token} per video"
            )
        config = self._image_config(**image_kwargs)
        image_pixels = [
            process_image(
                load_rgb(src, self.image_backend, name, self.timeout, self.exif_transpose), config, self.image_backend
            )
            for src, name in image_items
        ]
        video_pixels = [
            load_video(src, name, self.video_config, timeout=self.timeout, **video_kwargs) for src, name in video_items
        ]
        expanded, visuals = [], []
        image_iter, video_iter = iter(image_pixels), iter(video_pixels)
        for sample in texts:
            row = [next(image_iter if kind == "image" else video_iter) for kind in self._visual_kinds(sample)]
            expanded.append(self._expand(sample, [len(pixels) for pixels in row]))
            visuals += row
        ids, mask = self.tokenizer.pad(self.tokenizer.encode_batch(expanded, add_special_tokens), **pad_kwargs)
        out = BatchFeature(input_ids=ids, attention_mask=mask)
        if visuals:
            out["pixel_values"] = np.concatenate(visuals, axis=0)
            if return_num_patches:
                out["num_patches"] = np.array([len(v) for v in visuals], dtype=np.int64)
        return out
