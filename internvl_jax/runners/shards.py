"""Who does which record, where its result goes, and how the parts become one file.

Every process reads the whole input and takes the records whose row % count == index: a deterministic
share that needs no coordination. It appends one JSON line per finished record to its own part file
(`<output>.part<I>-of-<N>`), flushed and fsynced per batch. A record is done when its line is complete
(ends in a newline); on restart a torn last line is cut off and every done row is skipped, so a run killed
at any moment loses at most the batch in flight and never writes a record twice. The merge reads every
part (any process count: a run may be resumed with another one), keeps the first line of each row, and
writes the final file in input order through a temporary file and an atomic rename. One process at a time
appends to a part: it holds `<part>.lock` (an flock, with its pid and host written in it for the message a
second process gets); a lock left by a killed process is free again and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from internvl_jax.interrupts import HOST, alive

PART_PATTERN = re.compile(r"\.part(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Share:
    """Process `index` of `count`."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= index < count")

    def owns(self, row: int) -> bool:
        return row % self.count == self.index

    @classmethod
    def parse(cls, text: str) -> Share:
        """"i/n" (0-based i)."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"--shard {text!r}: expected INDEX/COUNT such as 0/4")
        return cls(int(m.group(1)), int(m.group(2)))


class RunMismatch(ValueError):
    """Existing output that does not belong to this input or these settings."""


# ----- part files -----
def part_path(base: Path, share: Share) -> Path:
    return base.with_name(f"{base.name}.part{share.index}-of-{share.count}")


def find_parts(base: Path) -> list[Path]:
    """Every part file of `base`, whatever process count wrote it, in a fixed order."""
    if not base.parent.is_dir():
        return []
    found = []
    for p in base.parent.iterdir():
        if p.name.startswith(base.name + ".part"):
            m = PART_PATTERN.search(p.name[len(base.name):])
            if m and p.is_file():
                found.append((int(m.group(2)), int(m.group(1)), p))
    return [p for _, _, p in sorted(found)]


def repair_tail(path: Path) -> int:
    """Cut a torn last line (a kill during a write) off `path`; returns the bytes removed."""
    if not path.exists():
        return 0
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        end, step = size, 1 << 16
        while end > 0:
            start = max(0, end - step)
            f.seek(start)
            chunk = f.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


def complete_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line with its newline) of every complete line; a torn last line is left out (it may be
    another process's line being written right now)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.endswith(b"\n"):
                yield number, line


def load_done(paths: Sequence[Path], check: Callable[[int, Any], str | None]) -> dict[int, bytes]:
    """row -> its line, over all parts (first one wins). `check(row, id)` returns why a line does not
    belong to this input, or None."""
    done: dict[int, bytes] = {}
    for path in paths:
        for number, line in complete_lines(path):
            try:
                obj = json.loads(line)
                row = obj["row"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise RunMismatch(f"{path}:{number} is not a result line of this tool ({e}); "
                                  "use a fresh output path") from e
            problem = check(row, obj.get("id"))
            if problem:
                raise RunMismatch(f"{path}:{number}: {problem}; the output belongs to another input: "
                                  "use a fresh output path")
            done.setdefault(row, line)
    return done


class PartWriter:
    """Append-only results of one process; `write` returns once the lines are on disk."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, lines: Sequence[bytes]) -> None:
        # Unbuffered: an interrupt inside the loop leaves a torn last line (cut off by the restart), never
        # bytes held in a buffer that a later close would append after it.
        if not lines:
            return
        view = memoryview(b"".join(lines))
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def result_line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a half-written one (also after a kill)."""
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error or Ctrl-C: leave nothing behind
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries of `path` left by killed processes of this host (a live or another host's
    process may be writing its own right now: those are left alone)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-{re.escape(HOST)}-(\d+)")
    if not path.parent.is_dir():
        return
    for p in path.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and not alive(int(m.group(1))):
            p.unlink(missing_ok=True)


class PartBusy(ValueError):
    """Another process is appending to the same part file."""


class PartLock:
    """`<part>.lock`, held while this process appends to `part`: a second run on the same output would
    redo the same records. The lock is an flock (released by the kernel when its process dies, even by
    SIGKILL); the pid and host in the file are there to say who holds it. Where the filesystem has no flock,
    the file alone decides: held unless it names a dead process of this host (then it is taken over)."""

    def __init__(self, part: Path):
        self.part = part
        self.path = part.with_name(part.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> PartLock:
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._take(fd)
                # The holder before us may have deleted the file between our open and our flock: then we hold
                # a lock on a file nobody else sees. Start again on the one at the path.
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    holder = {"pid": os.getpid(), "host": HOST, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
                    self._fd, fd = fd, -1
            except FileNotFoundError:
                pass
            finally:
                if fd >= 0:
                    os.close(fd)
        return self

    def _take(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        holder = self._holder(fd)
        if not busy and (holder is None or (holder.get("host") == HOST and not alive(holder.get("pid")))):
            return  # no flock here, and the file names nobody alive: ours
        who = "another process" if holder is None else \
            f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"
        raise PartBusy(f"{self.part} is being written by {who}: another run on the same output is going on "
                       f"(lock {self.path}); wait for it to finish, or give this run another output")

    @staticmethod
    def _holder(fd: int) -> dict | None:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            return None
        return holder if isinstance(holder, dict) else None

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: nobody can take the file in between
            os.close(self._fd)
            self._fd = None


def merged_lines(paths: Sequence[Path], total: int, check: Callable[[int, Any], str | None]
                 ) -> tuple[list[bytes] | None, int]:
    """All rows' lines in input order when every row 0..total-1 is done (else None) and the missing count."""
    done = load_done(paths, check)
    missing = sum(1 for r in range(total) if r not in done)
    if missing:
        return None, missing
    return [done[r] for r in range(total)], 0


# ----- fingerprint of a run -----
def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_fingerprint(path: Path, fingerprint: dict[str, Any]) -> None:
    """Write the run's settings the first time; later runs (resumes, other processes) must match them, or
    the output would mix answers of two different runs."""
    if path.exists():
        remove_stale_temporaries(path)  # a kill while the first process wrote it
        try:
            old = _flat(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
            raise RunMismatch(f"{path} is not the settings file of a run of this tool ({e}); move it away or "
                              "use a fresh output path") from e
        new = _flat(fingerprint)
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            details = "; ".join(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in differ)
            raise RunMismatch(f"{path} records a run with other settings ({details}); resume with the same "
                              "settings or use a fresh output path")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(fingerprint, indent=2, sort_keys=True) + "\n").encode("utf-8"))


# ----- processes -----

def init_distributed(coordinator: str, num_processes: int, process_id: int) -> Share:
    """Join a `jax.distributed` job; this process's share comes from JAX's process index and count."""
    import jax

    from internvl_jax import distributed

    distributed.initialize(coordinator, num_processes, process_id)
    return Share(jax.process_index(), jax.process_count())


def barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
