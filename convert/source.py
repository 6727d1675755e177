"""A source checkpoint seen through the weight table: layout detection and one -hf tensor at a time.

`Source.tensor(path, layer)` gives the tensor the -hf checkpoint would hold for one of our parameters (one
layer of it for stacked ones), whatever the source layout: the key comes from `weights.mapping`, and a
fused original q/k/v tensor is cut with `weights.split_fused`. Reads go through the memory-mapped
`SafetensorsDir`, so only the bytes asked for are read.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from internvl_jax import weights
from internvl_jax.config import InternVLConfig
from internvl_jax.modeling import key_in_file
from internvl_jax.safetensors_io import CheckpointError, SafetensorsDir

log = logging.getLogger(__name__)

# Buffers some exported checkpoints carry that are not parameters (recomputed from the config).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def detect_layout(reader: SafetensorsDir) -> str:
    """'hf', 'original' or 'original-internlm2', from the tensor names (one of LAYOUTS)."""
    keys = reader.keys()
    hf = any(k.startswith(("model.vision_tower.", "vision_tower.")) for k in keys)
    original = any(k.startswith("vision_model.") for k in keys)
    if hf == original:
        sample = ", ".join(sorted(keys)[:4])
        what = "both -hf (vision_tower.*) and original (vision_model.*)" if hf else "neither -hf (vision_tower.*) " \
            "nor original (vision_model.*)"
        raise CheckpointError(f"{_where(reader)}: cannot tell the checkpoint layout: it has {what} vision tensors "
                              f"(first keys: {sample})")
    if hf:
        return "hf"
    return "original-internlm2" if any(".attention.wqkv." in k for k in keys) else "original"


def _where(reader: SafetensorsDir) -> Path:
    return next(iter(reader.files.values())).path.parent


class Source:
    """Tensors of one checkpoint, addressed by our parameter path."""

    def __init__(self, reader: SafetensorsDir, config: InternVLConfig, layout: str = "auto"):
        detected = detect_layout(reader)
        if layout == "original" and detected == "original-internlm2":
            layout = detected  # the InternLM2 flavour of the original layout is a detail of its LLM
        if layout not in ("auto", detected):
            raise CheckpointError(f"{_where(reader)}: --layout {layout} was asked for, but the tensor names are "
                                  f"those of the {detected!r} layout")
        self.reader = reader
        self.config = config
        self.layout = detected
        self.directory = _where(reader)
        self.legacy = detected == "hf" and any(k.startswith(("vision_tower.", "language_model.model."))
                                               for k in reader.keys())

    def key(self, path: str, layer: int | None = None) -> str:
        """The key in this checkpoint that holds (a part of) parameter `path` (for `layer`)."""
        m = weights.mapping(path)
        key = m.source_key(self.layout)
        if layer is not None:
            key = key.format(i=layer)
        return key_in_file(key, self.legacy) if self.layout == "hf" else key

    def __contains__(self, path: str) -> bool:
        m = weights.mapping(path)
        return self.key(path, 0 if m.stacked else None) in self.reader

    def tensor(self, path: str, layer: int | None = None, rows: int | None = None) -> np.ndarray:
        """The -hf tensor of parameter `path` (of `layer` when stacked), in the checkpoint's dtype; `rows`: read
        into that many rows, the extra ones zero (`weights.padded_rows`).

        Read with pread into a fresh buffer, not through a memory map: mapped pages stay resident (counted in the
        process's memory) after the tensor is converted, which over a conversion adds up to the checkpoint.
        """
        m = weights.mapping(path)
        key = self.key(path, layer)
        if key not in self.reader:
            raise CheckpointError(f"{self.directory}: checkpoint has no tensor {key!r}")
        tensor = self.reader.get(key, rows)
        kind = m.fused(self.layout)
        if kind is None:
            return tensor
        t = self.config.text
        groups, head_dim = (t.groups, t.head_dim) if kind == "wqkv" else (1, 1)
        try:
            return weights.split_fused(kind, tensor, m.part, groups, head_dim)
        except ValueError as e:
            raise CheckpointError(f"{self.directory}: fused tensor {key!r} of shape {tuple(tensor.shape)} does not "
                                  f"fit the config ({e})") from e

    def needed_sizes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, list[str]]]:
        """Checkpoint key -> (number of values the config needs from it, our parameters it feeds)."""
        out: dict[str, tuple[int, list[str]]] = {}
        for path, shape in shapes.items():
            m = weights.mapping(path)
            layers = range(shape[0]) if m.stacked else [None]
            size = math.prod(shape[1:] if m.stacked else shape)
            if m.vocab_axis is not None:  # our vocabulary is padded (TextConfig.padded_vocab); the file's is not
                size = size // self.config.text.padded_vocab * self.config.text.vocab_size
            for i in layers:
                key = self.key(path, i)
                n, users = out.get(key, (0, []))
                out[key] = (n + size, [*users, path])  # fused q/k/v add up to the fused tensor's size
        return out

    def check_keys(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every tensor the config needs is present with the right number of values and no tensor is left unused;
        checked from the file headers alone, before anything is converted."""
        needed = self.needed_sizes(shapes)
        missing = sorted(set(needed) - set(self.reader.keys()))
        # A tied checkpoint may still carry its lm_head (equal to the embeddings): not an error.
        head = weights.mapping("text/lm_head").source_key(self.layout)
        ignorable = {key_in_file(head, self.legacy) if self.layout == "hf" else head}
        extra = sorted(k for k in self.reader.keys() if k not in needed and k not in ignorable
                       and not k.endswith(_IGNORED_SUFFIXES))
        where = f"checkpoint {self.directory} ({self.layout} layout)"
        if missing:
            raise CheckpointError(f"{where} lacks {len(missing)} tensor(s) the config needs: {missing[:5]}")
        if extra:
            raise CheckpointError(f"{where} has {len(extra)} tensor(s) the config does not use: {extra[:5]}")
        for key, (size, users) in needed.items():
            shape = self.reader.shape(key)
            if math.prod(shape) != size:
                ours = " + ".join(f"{u} {_layer_shape(u, shapes[u])}" for u in users)
                raise CheckpointError(f"{where}: tensor {key!r} has shape {shape} ({math.prod(shape)} values), but "
                                      f"the config needs {size} values from it: {ours}")

    def _layers(self, path: str) -> int:
        return self.config.vision.num_layers if path.startswith("vision/") else self.config.text.num_layers

    def nbytes(self, path: str, shape: tuple[int, ...]) -> int:
        """Bytes read from the checkpoint for parameter `path` of our (stacked) `shape`."""
        key = self.key(path, 0 if weights.mapping(path).stacked else None)
        dtype = self.reader.where[key].entries[key]["dtype"]
        return math.prod(shape) * _ITEMSIZE.get(dtype, 4)

    def source_dtype(self) -> str:
        """The floating dtype most of the checkpoint's bytes are in ('BF16', 'F32', 'F16', ...)."""
        sizes: dict[str, int] = {}
        for f in self.reader.files.values():
            for e in f.entries.values():
                sizes[e["dtype"]] = sizes.get(e["dtype"], 0) + e["data_offsets"][1] - e["data_offsets"][0]
        return max(sizes, key=sizes.get)

    def untie_if_head_differs(self) -> InternVLConfig:
        """A checkpoint's own lm_head is used when present and different, even if the config says tied."""
        cfg = self.config
        if not cfg.tie_word_embeddings or "text/lm_head" not in self:
            return cfg
        if np.array_equal(self.tensor("text/lm_head"), self.tensor("text/embedding")):
            return cfg
        log.warning("%s: config ties lm_head to the embeddings but the checkpoint has its own lm_head: using it",
                    self.directory)
        self.config = cfg.replace(tie_word_embeddings=False)
        return self.config


def _layer_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[1:] if weights.mapping(path).stacked else shape


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}
