"""Export our parameters to a `-hf` safetensors checkpoint that transformers' InternVLForConditionalGeneration loads.

Tensors are written one at a time, in the layout and under the keys of transformers' module tree
(`model.vision_tower.*`, `model.language_model.*`, `lm_head.weight`), through the same weight table the
loader reads (`weights.to_torch`). The safetensors files are written here rather than with
`safetensors.save_file`, which needs every tensor of a file in memory at once: the host holds one
parameter (from a converted directory) or one layer's tensor (from a model in memory) at a time.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from internvl_jax import weights
from internvl_jax.checkpoint import ParamReader, atomic_directory, copy_sidecar_files
from internvl_jax.config import InternVLConfig
from internvl_jax.model.params import abstract_params
from internvl_jax.planner import parse_bytes
from internvl_jax.safetensors_io import CheckpointError

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}
DEFAULT_SHARD = 5 * 1024**3


@dataclass(frozen=True)
class _Entry:
    key: str
    path: str
    layer: int | None
    shape: tuple[int, ...]  # torch shape
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _entries(config: InternVLConfig, abstract: dict[str, jax.ShapeDtypeStruct], dtype: np.dtype | None
             ) -> list[_Entry]:
    """Every -hf tensor to write, parameter-major (so each parameter is fetched once)."""
    out = []
    for path, spec in abstract.items():
        m = weights.mapping(path)
        dt = np.dtype(dtype or spec.dtype)
        if dt not in _ST_DTYPES:
            raise ValueError(f"cannot export {path!r} as {dt}: float32, bfloat16 or float16 only")
        layer_shape = tuple(spec.shape[1:] if m.stacked else spec.shape)
        torch_shape = weights.to_torch(m, np.empty(layer_shape, np.int8), config.text.vocab_size).shape
        layers = range(spec.shape[0]) if m.stacked else [None]
        out += [_Entry(m.key.format(i=i) if i is not None else m.key, path, i, tuple(torch_shape), dt)
                for i in layers]
    return out


def _plan(entries: list[_Entry], max_shard: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _write_file(file: Path, entries: list[_Entry], tensor: Callable[[_Entry], np.ndarray]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.key] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape),
                         "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data that follows starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            t = np.ascontiguousarray(tensor(e), dtype=e.dtype)
            if t.shape != e.shape:
                raise ValueError(f"{e.key}: expected shape {e.shape}, got {t.shape}")
            f.write(t.reshape(-1).view(np.uint8).data)  # bytes view: buffers cannot carry bfloat16


class _Fetcher:
    """The -hf tensor of an entry; keeps the current parameter on the host until the next one is needed."""

    def __init__(self, get: Callable[[str], jax.Array], vocab_size: int):
        self._get = get
        self._vocab = vocab_size
        self._path: str | None = None
        self._value: Any = None

    def __call__(self, e: _Entry) -> np.ndarray:
        if e.path != self._path:
            self._path, self._value = None, None
            self._value = self._get(e.path)
            self._path = e.path
        value = self._value if e.layer is None else self._value[e.layer]
        return weights.to_torch(weights.mapping(e.path), np.asarray(value), self._vocab).astype(e.dtype)


def export_params(config: InternVLConfig, abstract: dict[str, jax.ShapeDtypeStruct], get: Callable[[str], Any],
                  dst: str | Path, *, dtype: str | None = None, max_shard_size: str | int = DEFAULT_SHARD,
                  force: bool = False, sidecar_from: Path | None = None) -> Path:
    """Write `dst`: config.json + model.safetensors (or shards + index); `get(path)` gives one parameter."""
    entries = _entries(config, abstract, np.dtype(dtype) if dtype else None)
    shards = _plan(entries, parse_bytes(max_shard_size))
    fetch = _Fetcher(get, config.text.vocab_size)
    protect = (sidecar_from,) if sidecar_from else ()
    with atomic_directory(dst, force, protect=protect) as tmp:
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
        for name, shard in zip(names, shards, strict=True):
            _write_file(tmp / name, shard, fetch)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                     "weight_map": {e.key: name for name, shard in zip(names, shards, strict=True) for e in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf = config.to_hf_dict()
        hf["dtype"] = str(entries[0].dtype) if entries else "float32"
        if sidecar_from is not None:
            copy_sidecar_files(Path(sidecar_from), tmp)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return Path(dst)


# -hf files hold float weights: integer values written there would be misread by transformers as the weights.
_QUANTIZED = ("{what} is quantized {scheme}; -hf export writes float weights only: export the float checkpoint it "
              "was made from")


def export_model(model: Any, dst: str | Path, **kwargs: Any) -> Path:
    """An `InternVL` in memory (e.g. after fine-tuning) -> -hf safetensors at `dst`."""
    if model.module.quant:
        raise ValueError(_QUANTIZED.format(what="the model", scheme=model.module.quant))
    flat = weights.flatten_paths(model.params)
    abstract = {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in flat.items()}
    return export_params(model.config, abstract, lambda p: _LayerView(flat[p]), dst, **kwargs)


def export_converted(src: str | Path, dst: str | Path, **kwargs: Any) -> Path:
    """A converted directory (`python -m convert`) -> -hf safetensors, one parameter in memory at a time."""
    src = Path(src)
    reader = ParamReader(src)
    if (q := reader.manifest.get("quantization")) is not None:
        raise CheckpointError(_QUANTIZED.format(what=src, scheme=q.get("scheme") if isinstance(q, dict) else q))
    config = InternVLConfig.from_pretrained(src)
    abstract = weights.flatten_paths(abstract_params(config, reader.manifest.get("dtype", "float32")))
    reader.check(abstract)
    saved = {p: jax.ShapeDtypeStruct(s.shape, np.dtype(reader.entries[p]["dtype"])) for p, s in abstract.items()}

    def get(path: str) -> np.ndarray:
        return np.asarray(reader.restore(path, saved[path]))

    kwargs.setdefault("sidecar_from", src)
    return export_params(config, saved, get, dst, **kwargs)


class _LayerView:
    """A device array fetched to the host one layer at a time (`view[i]`) or whole (`np.asarray(view)`)."""

    def __init__(self, array: jax.Array):
        self.array = array

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(jax.device_get(self.array[i]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(jax.device_get(self.array))
        return out if dtype is None else out.astype(dtype)
