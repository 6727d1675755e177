"""Converted checkpoint directories: one orbax checkpoint per parameter, a manifest, atomic writes.

Layout of a directory written by `python -m convert` (or `internvl-jax convert`):

    DST/config.json                the -hf config (`InternVLConfig.to_hf_dict()`), what `from_pretrained` reads
    DST/internvl_jax_params.json   manifest: format version, dtype, each parameter's shape and folder
    DST/params/<path>/             an orbax checkpoint of one parameter (`{"param": array}`), path with "." for "/"
    DST/tokenizer.json, ...        the source's tokenizer, chat template, processor and generation configs

Why one orbax checkpoint per parameter and not one for the whole tree: orbax writes a tree in one call, so
the whole tree must exist as arrays first, which for a 78B model is the host-memory wall the converter
exists to avoid. Writing parameter by parameter bounds the converter's memory by the largest parameter;
restoring is still orbax's, each device reading only its own shards, onto any mesh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from internvl_jax import weights
from internvl_jax.safetensors_io import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "internvl_jax_params.json"
FORMAT = "internvl_jax.orbax_per_param"
VERSION = 1
PARAMS_DIR = "params"

# Files copied next to the weights (when the source has them) so the processor and generation defaults load
# from the converted directory as they do from the source.
SIDECAR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "processor_config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model",
)
SIDECAR_PATTERNS = ("vocab.*", "*.tiktoken")


def param_dir(path: str) -> str:
    """Folder (relative to the checkpoint directory) of one parameter's orbax checkpoint."""
    return f"{PARAMS_DIR}/{path.replace('/', '.')}"


def is_converted(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    file = Path(directory) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read the parameter manifest ({e})") from e
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("params"), dict):
        raise CheckpointError(f"{file}: not an {FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{file}: format version {manifest['version']} is newer than this code reads "
                              f"({VERSION}); upgrade internvl_jax")
    return manifest


def write_manifest(directory: Path, params: dict[str, jax.ShapeDtypeStruct], **extra: Any) -> None:
    entries = {p: {"shape": list(s.shape), "dtype": str(np.dtype(s.dtype)), "dir": param_dir(p)}
               for p, s in params.items()}
    manifest = {"format": FORMAT, "version": VERSION, **extra, "params": entries}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _checkpointer():
    # Imported here: orbax is heavy and only the converter, export and converted-directory loading need it.
    import orbax.checkpoint as ocp

    # Synchronous: each save returns once its files are committed, so the array can be freed right after.
    return ocp, ocp.Checkpointer(ocp.StandardCheckpointHandler())


class ParamWriter:
    """Saves parameters one at a time into `directory` (each its own orbax checkpoint)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._ocp, self._ckpt = _checkpointer()

    def save(self, path: str, array: jax.Array) -> None:
        target = self.directory / param_dir(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._ckpt.save(target, args=self._ocp.args.StandardSave({"param": array}))


class ParamReader:
    """Restores parameters one at a time from a converted directory, checked against the manifest."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.entries: dict[str, dict[str, Any]] = self.manifest["params"]
        self._ocp, self._ckpt = _checkpointer()

    def check(self, abstract: dict[str, jax.ShapeDtypeStruct]) -> None:
        """Every parameter the config needs is there with its shape, and nothing else."""
        where = f"converted checkpoint {self.directory}"
        missing = sorted(set(abstract) - set(self.entries))
        extra = sorted(set(self.entries) - set(abstract))
        if missing:
            raise CheckpointError(f"{where} lacks {len(missing)} parameter(s) the config needs: {missing[:5]}")
        if extra:
            raise CheckpointError(f"{where} has {len(extra)} parameter(s) the config does not use: {extra[:5]}")
        for path, spec in abstract.items():
            saved = tuple(self.entries[path]["shape"])
            if saved != tuple(spec.shape):
                raise CheckpointError(f"{where}: parameter {path!r} has shape {saved}, the config needs "
                                      f"{tuple(spec.shape)}")

    def restore(self, path: str, spec: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding | None = None
                ) -> jax.Array:
        """One parameter, cast to `spec.dtype`, placed with `sharding` (default: the first device)."""
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        folder = self.directory / self.entries[path]["dir"]
        if not folder.is_dir():
            raise CheckpointError(f"converted checkpoint {self.directory}: parameter {path!r} is listed but its "
                                  f"folder {folder} is missing")
        target = {"param": jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)}
        try:
            return self._ckpt.restore(folder, args=self._ocp.args.StandardRestore(target))["param"]
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"converted checkpoint {self.directory}: cannot restore {path!r} from "
                                  f"{folder} ({e})") from e


def restore_params(directory: str | Path, abstract: dict, shardings: dict[str, jax.sharding.Sharding] | None = None
                   ) -> dict:
    """The parameter tree of a converted directory, each array restored straight into its sharding."""
    reader = ParamReader(directory)
    flat = weights.flatten_paths(abstract)
    reader.check(flat)
    out = {p: reader.restore(p, spec, shardings.get(p) if shardings else None) for p, spec in flat.items()}
    return weights.unflatten_paths(out)


# ----- directories -----
@contextlib.contextmanager
def atomic_directory(dst: str | Path, force: bool = False, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `dst` to fill; rename it to `dst` only when the block finishes.

    A run killed half way leaves at most a hidden `.NAME.partial-*` sibling, never something at `dst` that
    looks complete. An existing `dst` is refused unless `force`; it is replaced only after the new one is
    complete. `protect`: directories (the source) that `dst` must neither be nor contain.
    """
    dst = Path(dst).absolute()
    for p in protect:
        p = Path(p).absolute()
        if dst == p or p.is_relative_to(dst):
            raise CheckpointError(f"destination {dst} would overwrite the source {p}; choose another directory")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        # mkdtemp makes the folder private (0700); give it the permissions of an ordinary new directory.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        if dst.exists() or dst.is_symlink():
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_sidecar_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer / processor / generation files that exist in `src`; returns their names."""
    names = {n for n in SIDECAR_FILES if (src / n).is_file()}
    for pattern in SIDECAR_PATTERNS:
        names |= {p.name for p in src.glob(pattern) if p.is_file()}
    for name in sorted(names):
        shutil.copy2(src / name, dst / name)
    return sorted(names)
