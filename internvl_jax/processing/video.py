"""Videos: PyAV decoding, InternVLVideoProcessor's frame sampling, one 448px tile per frame.

Sampling follows `InternVLVideoProcessor.sample_frames`: with `num_frames` (or `fps`, which becomes
`int(total / video_fps * fps)` frames) the indices are `torch.arange(shift, total, total / num_frames).int()`
with `shift = total / num_frames / 2` -- evaluated here in the same float32-of-double arithmetic. Without
either, every frame is used, as transformers does when `do_sample_frames` is off.

Frames are resized with the torchvision-compatible kernel whatever the image backend is, because
transformers' video processor exists only as a torchvision processor.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import av
import numpy as np
from PIL import Image

from .configs import VideoConfig
from .image import normalize
from .loading import DEFAULT_TIMEOUT_S, InputError, array_to_rgb, describe, pil_to_rgb, read_source_bytes
from .resize import resize


@dataclasses.dataclass(frozen=True)
class VideoMetadata:
    total_num_frames: int
    fps: float | None = None
    height: int | None = None
    width: int | None = None


def sample_indices(
    total: int,
    num_frames: int | None,
    fps: float | None,
    video_fps: float | None,
    initial_shift: bool | float = True,
    name: str = "video",
) -> np.ndarray:
    """Frame indices `InternVLVideoProcessor.sample_frames` picks (int32, as `.int()` gives)."""
    if num_frames is not None and fps is not None:
        raise InputError(f"{name}: `num_frames` and `fps` are mutually exclusive, pass one of them")
    if num_frames is None:
        if fps is None:
            raise InputError(f"{name}: frame sampling needs `num_frames` or `fps`")
        if not video_fps:
            raise InputError(f"{name}: sampling with fps={fps} needs the video's frame rate, which is unknown")
        num_frames = int(total / video_fps * fps)
    if num_frames <= 0:
        raise InputError(f"{name}: sampling asks for {num_frames} frames of a {total}-frame video")
    if num_frames > total:
        raise InputError(f"{name}: asked for {num_frames} frames but the video has only {total}")
    step = total / num_frames
    shift = step / 2 if initial_shift is True else float(initial_shift)
    # torch.arange on CPU: length ceil((end - start) / step) in double, each value start + step * i in
    # double, stored as float32; `.int()` truncates toward zero.
    count = max(math.ceil((total - shift) / step), 0)
    values = (shift + step * np.arange(count, dtype=np.float64)).astype(np.float32)
    return np.trunc(values).astype(np.int32)


def _open_container(source: Any, name: str, timeout: float) -> av.container.InputContainer:
    data, path = read_source_bytes(source, name, timeout)
    try:
        return av.open(io.BytesIO(data) if data is not None else path)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"{name}: cannot open {describe(source)} as a video: {exc}") from exc


def probe(container: av.container.InputContainer, name: str) -> VideoMetadata:
    if not container.streams.video:
        raise InputError(f"{name}: the file has no video stream")
    stream = container.streams.video[0]
    total = int(stream.frames)
    if total <= 0:
        # Some containers (webm, raw streams) do not store a frame count: count packets instead.
        total = sum(1 for packet in container.demux(stream) if packet.size > 0)
        container.seek(0)
    fps = float(stream.average_rate) if stream.average_rate else None
    return VideoMetadata(total_num_frames=total, fps=fps, height=stream.height, width=stream.width)


def decode_video(
    source: str | os.PathLike,
    name: str,
    num_frames: int | None = None,
    fps: float | None = None,
    initial_shift: bool | float = True,
    sample: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> tuple[np.ndarray, VideoMetadata, np.ndarray]:
    """Decode the sampled frames of a video file/URL: ((T, H, W, 3) uint8 RGB, metadata, indices).

    Like transformers' PyAV reader: the frame count and rate come from the stream header, frames are decoded
    in order from the start and converted with `to_ndarray(format="rgb24")`."""
    container = _open_container(source, name, timeout)
    try:
        meta = probe(container, name)
        if sample:
            indices = sample_indices(meta.total_num_frames, num_frames, fps, meta.fps, initial_shift, name)
        else:
            indices = np.arange(meta.total_num_frames, dtype=np.int64)
        if len(indices) == 0:
            raise InputError(f"{name}: the video has no frames")
        wanted = {int(i) for i in indices}
        last = int(indices[-1])
        frames: dict[int, np.ndarray] = {}
        container.seek(0)
        for i, frame in enumerate(container.decode(video=0)):
            if i > last:
                break
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, OSError) as exc:
        raise InputError(f"{name}: cannot decode {describe(source)}: {exc}") from exc
    finally:
        container.close()
    missing = sorted(wanted - frames.keys())
    if missing:
        raise InputError(
            f"{name}: {describe(source)} declares {meta.total_num_frames} frames but frame {missing[0]} "
            f"could not be decoded ({len(frames)} of {len(wanted)} wanted frames decoded)"
        )
    return np.stack([frames[int(i)] for i in indices]), meta, indices


def frames_to_array(video: Any, name: str) -> np.ndarray:
    """An in-memory video (4-D array or a sequence of PIL/array frames) -> (T, H, W, 3) uint8."""
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise InputError(f"{name}: a video array must be 4-D (frames, H, W, C), got shape {video.shape}")
        frames: Sequence[Any] = list(video)
    else:
        frames = list(video)
    if not frames:
        raise InputError(f"{name}: the video has no frames")
    out = []
    for t, frame in enumerate(frames):
        label = f"{name} frame {t}"
        if isinstance(frame, Image.Image):
            out.append(pil_to_rgb(frame))
        elif isinstance(frame, np.ndarray):
            if frame.ndim == 3 and 4 in (frame.shape[0], frame.shape[-1]):
                alpha = frame[3] if frame.shape[0] == 4 else frame[..., 3]
                if (alpha < 255).any():
                    # transformers blends such frames in float and then resizes them with torch's float
                    # kernel, a path this package does not reproduce.
                    raise InputError(f"{label}: video frames with transparency are not supported")
            out.append(array_to_rgb(frame, "torchvision", label))
        else:
            raise InputError(f"{label}: unsupported frame type {type(frame).__name__}")
    shapes = {f.shape for f in out}
    if len(shapes) > 1:
        raise InputError(f"{name}: frames have different sizes {sorted(shapes)}")
    return np.stack(out)


def process_frames(frames: np.ndarray, config: VideoConfig) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, tile_h, tile_w) float32, as InternVLVideoProcessor does."""
    if config.do_resize:
        height, width = config.size
        # One frame at a time: the integer intermediates of a whole HD clip would not fit in memory.
        frames = np.stack([resize(f, height, width, "torchvision", config.resample) for f in frames])
    return normalize(
        frames,
        "torchvision",
        config.do_rescale,
        config.rescale_factor,
        config.do_normalize,
        config.image_mean,
        config.image_std,
    )


def load_video(
    video: Any,
    name: str,
    config: VideoConfig,
    num_frames: int | None = None,
    fps: float | None = None,
    initial_shift: bool | float | None = None,
    do_sample_frames: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> np.ndarray:
    """Any accepted video -> (T, 3, tile_h, tile_w) float32 pixel values of its sampled frames."""
    num_frames = config.num_frames if num_frames is None else num_frames
    fps = config.fps if fps is None else fps
    shift = config.initial_shift if initial_shift is None else initial_shift
    sample = config.do_sample_frames if do_sample_frames is None else do_sample_frames
    if isinstance(video, (str, os.PathLike)):
        frames, _, _ = decode_video(video, name, num_frames, fps, shift, sample, timeout)
    else:
        frames = frames_to_array(video, name)
        if sample:
            # In-memory frames carry no frame rate, as in transformers (its default metadata has fps=None).
            frames = frames[sample_indices(len(frames), num_frames, fps, None, shift, name)]
    return process_frames(frames, config)
