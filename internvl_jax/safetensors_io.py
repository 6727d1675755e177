"""Read a checkpoint directory of safetensors files, one tensor at a time.

A tensor is read from disk only when asked for (one pread), so loading or converting never holds more
than the tensor in hand. The format is parsed here (an 8-byte header length, a JSON header,
raw little-endian data) because numpy has no bfloat16 of its own; `ml_dtypes` (a JAX dependency) gives it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model (the message names file and key)."""


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise CheckpointError(f"{path}: header length {n} is implausible; not a safetensors file")
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from e
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self._start = 8 + n

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str, rows: int | None = None) -> np.ndarray:
        """Tensor `key`; with `rows` above its first dimension, read into a buffer of that many rows whose extra
        rows are zero (the vocabulary padding, without a second copy of the embedding)."""
        e = self.entries[key]
        if e["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        shape = list(e["shape"])
        size = end - begin
        if rows is not None and shape and 0 < shape[0] < rows:
            size, shape[0] = size // shape[0] * rows, rows
        # pread into a fresh buffer rather than a memory map: mapped pages stay resident (and count in RSS)
        # until the whole file is unmapped, which made loading hold the checkpoint twice.
        raw = bytearray(size)  # zero-filled
        fd = os.open(self.path, os.O_RDONLY)
        try:
            view, done = memoryview(raw)[: end - begin], 0
            while done < len(view):  # one read returns at most ~2 GiB on Linux
                n = os.preadv(fd, [view[done:]], self._start + begin + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: file ends inside tensor {key!r} (truncated download?)")
                done += n
        finally:
            os.close(fd)
        return np.frombuffer(raw, _DTYPES[e["dtype"]]).reshape(shape)


class SafetensorsDir:
    """All tensors of a checkpoint directory: single `model.safetensors` or an index-sharded set."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if not d.is_dir():
            raise CheckpointError(f"{d} is not a directory")
        index = d / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            names = sorted(set(weight_map.values()))
        elif (d / "model.safetensors").is_file():
            names, weight_map = ["model.safetensors"], {}
        else:
            pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt*"))
            if pickles:
                raise CheckpointError(
                    f"{d} holds only pickle checkpoints ({', '.join(pickles[:3])}): they are refused because "
                    "unpickling can run arbitrary code. Convert them to safetensors first (e.g. with "
                    "transformers: model.save_pretrained(dir, safe_serialization=True))."
                )
            raise CheckpointError(f"{d} has no model.safetensors nor model.safetensors.index.json")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        for name in names:
            if not (d / name).is_file():
                raise CheckpointError(f"{index}: lists {name}, which is missing from {d}")
            f = SafetensorsFile(d / name)
            self.files[name] = f
            for key in f.keys():
                self.where[key] = f
        for key, name in weight_map.items():
            if key not in self.where:
                raise CheckpointError(f"{index}: key {key!r} is mapped to {name} but that file does not hold it")

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, rows: int | None = None) -> np.ndarray:
        if key not in self.where:
            raise CheckpointError(f"checkpoint has no tensor {key!r}")
        return self.where[key].get(key, rows)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[key].entries[key]["shape"])

    def nbytes(self) -> int:
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for f in self.files.values()
                   for e in f.entries.values())


def itemsize(dtype: str) -> int:
    """Bytes per value of a safetensors dtype name ('BF16' -> 2); 4 for a name this reader does not know."""
    return np.dtype(_DTYPES[dtype]).itemsize if dtype in _DTYPES else 4
