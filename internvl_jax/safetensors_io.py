"""Read a checkpoint directory of safetensors files, one tensor at a time.

A tensor is read from disk only when asked for (one pread), so loading or converting never holds more
than the tensor in hand. The format is parsed here (an 8-byte header length, a JSON header,
raw little-endian data) because numpy has no bfloat16 of its own; `ml_dtypes` (a JAX dependency) gives it.
The header is not trusted: every entry's offsets are checked against its shape x dtype size and the file's
size when the file is opened, so a corrupt or hostile header is a `CheckpointError`, never an allocation.
"""

from __future__ import annotations

import json
import math
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
                size = os.fstat(f.fileno()).st_size
                (n,) = struct.unpack("<Q", f.read(8))
                if n > min(size - 8, 100_000_000):
                    raise CheckpointError(f"{path}: header length {n} does not fit the file ({size} bytes); "
                                          "not a safetensors file, or a truncated one")
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
            raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        self._start = 8 + n
        for key, entry in header.items():
            _check_entry(path, key, entry, size - self._start)
        self.entries: dict[str, dict] = header

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


def _check_entry(path: Path, key: str, entry: object, data_size: int) -> None:
    """One header entry, before anything is read: its offsets must lie in the file and (for a dtype we know)
    span exactly shape x dtype bytes, so a corrupt or hostile header fails here instead of allocating what it
    claims."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: dtype {dtype!r} is not a string")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_size):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} do not lie within the file's {data_size} "
                              "data bytes (truncated or corrupt file?)")
    if dtype in _DTYPES:
        need = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != need:
            raise CheckpointError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but shape "
                                  f"{shape} of {dtype} needs {need}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsDir:
    """All tensors of a checkpoint directory: single `model.safetensors` or an index-sharded set."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if not d.is_dir():
            raise CheckpointError(f"{d} is not a directory")
        index = d / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # ValueError: JSON, UTF-8
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map is not an object of tensor name -> file name")
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
