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
import ctypes
import errno
import fnmatch
import glob
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from internvl_jax import quant, weights
from internvl_jax.interrupts import HOST, alive, held
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


def converted_quantization(directory: str | Path, asked: str | None) -> str:
    """The quantization to load a converted directory with: the one it was written with (its manifest's
    `quantization`: scheme and format version), or `asked` for a float one (quantized while it loads). An unknown
    scheme, another format version, or `asked` differing from a quantized checkpoint's scheme is refused by name."""
    file = Path(directory) / MANIFEST
    q = read_manifest(directory).get("quantization")
    asked = quant.check_scheme(asked)
    if q is None:
        return asked
    scheme, version = (q.get("scheme"), q.get("version")) if isinstance(q, dict) else (q, None)
    if scheme not in quant.SCHEMES:
        raise CheckpointError(f"{file}: quantization scheme {scheme!r} is not one this code reads "
                              f"({', '.join(quant.SCHEMES)})")
    if version != quant.VERSION:
        older = isinstance(version, int) and version < quant.VERSION
        raise CheckpointError(f"{file}: quantized format version {version!r} is {'older' if older else 'not'} "
                              f"{'than ' if older else ''}the one this code reads ({quant.VERSION}); convert the float "
                              "checkpoint again with --quantize")
    if asked and asked != scheme:
        raise CheckpointError(f"{file}: the checkpoint is quantized {scheme}; quantize={asked!r} cannot be honoured "
                              f"(requantizing loses accuracy): convert the float checkpoint with --quantize {asked}")
    return scheme


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
        # Whole or not at all: an interrupt waits for orbax's writer threads (see `interrupts.held`).
        with held():
            try:
                self._ckpt.save(target, args=self._ocp.args.StandardSave({"param": array}))
            except ValueError as e:  # tensorstore's write errors: the OS error is only in the message
                code = re.search(r"os_error_code='(\d+)'", str(e))
                if code is None:
                    raise
                raise OSError(int(code[1]), os.strerror(int(code[1])), str(target)) from e


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
            # Ctrl-C waits for the read: interrupted, orbax's event loop is left open and warns at exit.
            with held():
                # orbax refuses a relative path ("Checkpoint path should be absolute")
                return self._ckpt.restore(folder.absolute(), args=self._ocp.args.StandardRestore(target))["param"]
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"converted checkpoint {self.directory}: cannot restore {path!r} from "
                                  f"{folder} ({e})") from e


def restore_params(directory: str | Path, abstract: dict, shardings: dict[str, jax.sharding.Sharding] | None = None
                   ) -> dict:
    """The parameter tree of a converted directory, each array restored straight into its sharding."""
    reader = ParamReader(directory)
    flat = weights.flatten_paths(abstract)
    stored = flat if reader.manifest.get("quantization") else quant.float_specs(flat)  # float: quantized on loading
    reader.check(stored)
    out: dict[str, jax.Array] = {}
    for p, spec in stored.items():
        array = reader.restore(p, spec, shardings.get(p) if shardings else None)
        out.update(quant.quantize_param(p, array, flat, shardings) if stored is not flat else {p: array})
    return weights.unflatten_paths(out)


# ----- destinations -----
class DestinationError(OSError):
    """The destination cannot be written (read-only, full, not a directory): the message names it and why."""


# The weight files of an -hf directory that export / demo write: model.safetensors, or shards + their index.
_HF_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
# Errors that only a write can cause: reported as the destination's problem.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _is_sidecar(name: str) -> bool:
    return name in SIDECAR_FILES or any(fnmatch.fnmatch(name, p) for p in SIDECAR_PATTERNS)


def _not_ours(directory: Path) -> list[str]:
    """What in `directory` shows that this project did not write it (nothing: it is one of our outputs).

    Ours: a converted directory (a readable manifest, config.json, params/ holding only the folders the
    manifest lists, sidecar files) or an exported -hf one (config.json, model.safetensors or its shards and
    index, sidecar files); every one of those a regular file (params/ a folder), nothing else. An empty
    directory holds nothing to lose.
    """
    entries = sorted(os.listdir(directory))
    converted = MANIFEST in entries
    ours = {"config.json", MANIFEST} if converted else {"config.json"}

    def foreign(name: str) -> str | None:
        path = directory / name
        if path.is_symlink():
            return f"symbolic link {name}"
        if converted and name == PARAMS_DIR and path.is_dir():
            return None
        if not path.is_file():
            return f"folder {name}/"
        weights = not converted and _HF_WEIGHTS.fullmatch(name)
        return None if name in ours or weights or _is_sidecar(name) else name

    found = [f for f in map(foreign, entries) if f]
    if found or not entries:
        return found
    if converted:
        try:
            listed = {Path(e["dir"]).name for e in read_manifest(directory)["params"].values()}
        except (CheckpointError, KeyError, TypeError) as e:
            return [f"a {MANIFEST} that is not ours ({e})"]
        params = directory / PARAMS_DIR
        return [f"{PARAMS_DIR}/{e}" for e in sorted(os.listdir(params)) if e not in listed] if params.is_dir() else []
    if "config.json" not in entries or not any(_HF_WEIGHTS.fullmatch(e) for e in entries):
        return ["no checkpoint (neither our manifest nor config.json with model*.safetensors)"]
    return []


def _ancestors_refused(protect: tuple[Path, ...]) -> list[tuple[str, Path]]:
    """Directories that a destination must neither be nor contain, with what to call them."""
    named = [("the current directory", Path.cwd())]
    with contextlib.suppress(RuntimeError):  # no HOME and no password entry: no home directory to protect
        named.append(("your home directory", Path.home()))
    return named + [("the source", Path(p)) for p in protect]


def check_destination(dst: str | Path, force: bool = False, protect: tuple[Path, ...] = ()) -> Path:
    """`dst` made absolute, if writing it loses nothing the user owns; else an error saying what was found.

    The one rule demo, convert and export follow. Refused always: a `dst` that is or contains the current
    directory, the home directory or a `protect` directory (the source), so never `.` or `/`; a symbolic
    link or a file; a directory holding anything this project would not have written (`_not_ours`). An
    existing directory of ours (or an empty one) is replaced only with `force`.
    """
    dst = Path(os.path.abspath(dst))
    real = dst.resolve()
    above = next(p for p in dst.parents if p.exists())
    if not above.is_dir():
        raise DestinationError(f"cannot create {dst}: {above} is a file, not a directory")
    for what, anchor in _ancestors_refused(protect):
        anchor = anchor.resolve()
        if anchor.is_relative_to(real):
            inside = "" if anchor == real else " (it contains it)"
            raise CheckpointError(f"destination {dst} would overwrite {what} {anchor}{inside}; choose another "
                                  "directory")
    if dst.is_symlink():
        raise FileExistsError(f"{dst} is a symbolic link (to {os.readlink(dst)}); it is not replaced, even with "
                              "--force: remove it or choose another destination")
    if not dst.exists():
        return dst
    if not dst.is_dir():
        raise FileExistsError(f"{dst} is a file, not a checkpoint directory of ours; it is not replaced, even "
                              "with --force: choose another destination")
    found = _not_ours(dst)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise FileExistsError(f"{dst} holds {', '.join(found[:3])}{more}, which internvl_jax did not write; it is "
                              "not replaced, even with --force: choose another destination")
    if not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")
    return dst


def _partial_prefix(dst: Path) -> str:
    # Host and pid in the name, so a later run can tell a sibling left by a killed run from one being written.
    return f".{dst.name}.partial-{HOST}-{os.getpid()}-"


def _remove_stale_partials(dst: Path) -> None:
    """Delete the temporary siblings of `dst` left by runs on this host that no longer exist (SIGKILL)."""
    prefix, host = f".{dst.name}.partial-", HOST
    for sibling in dst.parent.glob(f"{glob.escape(prefix)}*"):
        owner, _, pid = sibling.name[len(prefix):].rpartition("-")[0].rpartition("-")
        if owner == host and pid.isdigit() and not alive(int(pid)) and sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)





def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the filesystem cannot: rename in two steps
        return False
    raise OSError(code, os.strerror(code), str(b))


def _commit(tmp: Path, dst: Path) -> None:
    """Put the complete `tmp` at `dst`; an old `dst` is removed only once the new one is in place."""
    # mkdtemp makes the folder private (0700); give it the permissions of an ordinary new directory.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    if not dst.exists():
        os.rename(tmp, dst)
    elif _exchange(tmp, dst):  # a kill at any moment leaves the old or the new directory at dst
        shutil.rmtree(tmp)
    else:
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old)


def _write_error(e: OSError, tmp: Path) -> bool:
    """Whether `e` is the destination's problem (full, read-only, ...) rather than, say, the source's."""
    name = e.filename if isinstance(e.filename, str) else ""
    return e.errno in _WRITE_ERRNOS or (bool(name) and Path(name).absolute().is_relative_to(tmp))


@contextlib.contextmanager
def atomic_directory(dst: str | Path, force: bool = False, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `dst` to fill; rename it to `dst` only when the block finishes.

    A run killed half way leaves at most a hidden `.NAME.partial-HOST-PID-*` sibling (the next run deletes
    it), never something at `dst` that looks complete. What may be replaced: `check_destination`. An
    interrupt (Ctrl-C) waits for the parameter being written, then everything written is removed.
    """
    dst = check_destination(dst, force, protect)
    created = [d for d in (dst.parent, *dst.parent.parents) if not d.exists()]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(dst)
        tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(dst), dir=dst.parent))
    except OSError as e:
        _discard(created)
        raise DestinationError(f"cannot create {dst}: {e.strerror or e} ({e.filename or dst.parent})") from e
    try:
        yield tmp
    except BaseException as e:
        _discard(created, tmp)
        if isinstance(e, OSError) and not isinstance(e, DestinationError) and _write_error(e, tmp):
            raise DestinationError(f"cannot write {dst}: {e.strerror or e}") from e
        raise
    try:
        with held():
            _commit(tmp, dst)
    except KeyboardInterrupt:  # it came while the complete directory was put in place: the run has succeeded
        pass
    except BaseException:
        _discard(created, tmp)
        raise


def _discard(created: list[Path], tmp: Path | None = None) -> None:
    """Remove what this run wrote: the temporary sibling and the parent folders it created (if still empty)."""
    with held():
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()


def copy_sidecar_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer / processor / generation files that exist in `src`; returns their names."""
    names = {n for n in SIDECAR_FILES if (src / n).is_file()}
    for pattern in SIDECAR_PATTERNS:
        names |= {p.name for p in src.glob(pattern) if p.is_file()}
    for name in sorted(names):
        shutil.copy2(src / name, dst / name)
    return sorted(names)
