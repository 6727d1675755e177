"""`convert()`: a safetensors checkpoint directory (-hf or original layout) -> a converted orbax directory."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import jax
from jax.sharding import Mesh

from convert.progress import Progress
from internvl_jax import quant, weights
from internvl_jax.checkpoint import ParamWriter, atomic_directory, copy_sidecar_files, write_manifest
from internvl_jax.config import InternVLConfig
from internvl_jax.model.params import abstract_params
from internvl_jax.safetensors_io import CheckpointError
from internvl_jax.sharding import make_mesh, param_shardings
from internvl_jax.source import Source

log = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float32", "float16")
# "auto" keeps the checkpoint's own floating dtype.
_AUTO = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}
# Default mesh: every local device on the FSDP axis, so each parameter is split across devices (not copied).
DEFAULT_MESH = "fsdp=-1"


def convert(src: str | Path, dst: str | Path, *, dtype: str = "auto", layout: str = "auto", force: bool = False,
            mesh: Mesh | str | None = None, progress: bool = True, quantize: str | None = None) -> Path:
    """Convert the checkpoint directory `src` into `dst` (see `internvl_jax.checkpoint` for what it holds).

    dtype: auto (the checkpoint's own) | bfloat16 | float32 | float16. layout: auto | hf | original.
    mesh: where the parameters are placed while they are written (a Mesh or a spec like "tensor=4");
    the result restores onto any mesh. quantize: int8 | int4 (`internvl_jax.quant`): each weight is quantized
    as soon as it is read and written quantized; dtype is then the scales' (and unquantized parameters') dtype.
    Returns `dst`.
    """
    quantize = quant.check_scheme(quantize)
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such checkpoint directory")
    if layout not in ("auto", "hf", "original"):
        raise ValueError(f"layout {layout!r}: one of auto, hf, original")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    config = InternVLConfig.from_pretrained(src)
    source = Source(src, config, layout)
    config = source.config  # its own lm_head, when the checkpoint has one
    _check_config_round_trip(config, src)
    target = _AUTO.get(source.source_dtype(), "float32") if dtype == "auto" else dtype
    abstract: dict[str, jax.ShapeDtypeStruct] = weights.flatten_paths(abstract_params(config, target, quant=quantize))
    floats = quant.float_specs(abstract)  # what is read: every weight in float, quantized once read
    source.check_keys({p: tuple(s.shape) for p, s in floats.items()})
    mesh = mesh if isinstance(mesh, Mesh) else parse_mesh(mesh)
    shardings = param_shardings(config, mesh, target, quantize)

    total_bytes = sum(source.nbytes(p, s.shape) for p, s in floats.items())
    total_tensors = sum(s.shape[0] if weights.mapping(p).stacked else 1 for p, s in floats.items())
    log.info("converting %s (%s layout, %d tensors, %.2f GB) to %s in %s", src, source.layout, total_tensors,
             total_bytes / 1e9, dst, target)
    with atomic_directory(dst, force, protect=(src,)) as tmp:
        writer = ParamWriter(tmp)
        with Progress(total_bytes, total_tensors, len(floats), enabled=progress) as bar:
            for path, spec in floats.items():
                array = source.read_param(path, spec, shardings[path], bar.read)
                written = quant.quantize_param(path, array, abstract, shardings)  # {path: array} unless quantized
                for name, stored in written.items():
                    writer.save(name, stored)
                # Freed now, not whenever the last reference goes: at most one parameter is alive at a time.
                for stored in {id(a): a for a in (array, *written.values())}.values():
                    stored.delete()
                del array, stored, written
                _return_freed_memory()
                bar.param_done()
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        copied = copy_sidecar_files(src, tmp)
        scheme = {"quantization": {"scheme": quantize, "version": quant.VERSION}} if quantize else {}
        write_manifest(tmp, abstract, dtype=target, **scheme,
                       source={"path": str(src.absolute()), "layout": source.layout, "bytes": total_bytes,
                               "files": copied})
    return Path(dst)


def _trim() -> Callable[[], object] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _trim()


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. Why: orbax/tensorstore write through many mid-sized buffers on
    their own threads; glibc keeps those freed arenas mapped, and over a conversion they add up to about one
    more parameter's worth of resident memory (measured: 1.8 -> 1.3 GB peak for InternVL3-1B, float32)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _check_config_round_trip(config: InternVLConfig, src: Path) -> None:
    """The written config.json must parse back to this config, or the converted model would differ."""
    back = InternVLConfig.from_dict(config.to_hf_dict())
    if back == config:
        return
    diffs = [f"{name}: {getattr(config, name)!r} -> {getattr(back, name)!r}"
             for name in (f.name for f in dataclasses.fields(config)) if getattr(config, name) != getattr(back, name)]
    raise CheckpointError(f"{src}/config.json does not survive the -hf config format: {'; '.join(diffs)}")


def parse_mesh(spec: str | None) -> Mesh:
    """A mesh over the local devices from a spec like "tensor=4" (default: all devices on fsdp)."""
    try:
        return make_mesh(spec or DEFAULT_MESH)
    except ValueError as e:
        raise ValueError(f"--mesh {spec!r}: {e} ({len(jax.devices())} devices here)") from e


__all__ = ["DTYPES", "convert", "parse_mesh"]
