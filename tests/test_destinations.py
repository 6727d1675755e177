"""Destinations are never lost: what `--force` may replace, unwritable destinations, Ctrl-C and SIGKILL.

The rule is `internvl_jax.checkpoint.check_destination`, used by demo, convert and export alike. Interrupts
and kills are sent to real `python -m ...` processes at seeded random moments of their write phase.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert import convert
from convert.cli import convert_main, export_main
from internvl_jax import checkpoint
from internvl_jax.cli import main as cli_main
from internvl_jax.export import export_converted
from tests import tiny_models as tm

REPO = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return tm.save(tm.torch_model(tm.hf_config()), tmp_path_factory.mktemp("tiny") / "hf", "legacy")


@pytest.fixture(scope="module")
def ours(tiny_hf, tmp_path_factory) -> Path:
    return convert(tiny_hf, tmp_path_factory.mktemp("ours") / "ours", dtype="float32", progress=False)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with a hash of its bytes (folders: "dir")."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def user_files(root: Path) -> Path:
    """A directory of the user's own: a file, a subfolder with a file, a hidden file."""
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "todo.txt").write_text("buy milk\n")
    (root / "thesis.tex").write_text("\\documentclass{article}\n")
    (root / ".profile").write_text("export A=1\n")
    return root


def one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def commands(tiny_hf: Path, ours: Path, dst: Path) -> dict[str, list[str]]:
    return {"convert": ["convert", str(tiny_hf), str(dst), "--quiet"],
            "export": ["export", str(ours), str(dst)],
            "demo": ["demo", str(dst)]}


# ----- what --force may replace -----
REFUSALS = [(command, case) for command in ("convert", "export", "demo")
            for case in ("cwd", "ancestor_of_cwd", "user_dir", "home", "source_parent", "file")
            if (command, case) != ("demo", "source_parent")]  # demo has no source


@pytest.mark.parametrize(("command", "case"), REFUSALS)
def test_force_refuses_what_we_did_not_write(tmp_path, tiny_hf, ours, monkeypatch, capsys, command, case):
    user = user_files(tmp_path / "user")
    dst, found = user, "thesis.tex"
    if case == "cwd":
        monkeypatch.chdir(user)
        dst, found = Path("."), "current directory"
    elif case == "ancestor_of_cwd":
        monkeypatch.chdir(user / "notes")
        found = "current directory"
    elif case == "home":
        monkeypatch.setenv("HOME", str(user))
        found = "home directory"
    elif case == "source_parent":
        dst = user = tiny_hf.parent if command == "convert" else ours.parent
        found = "the source"
    elif case == "file":
        dst = user / "thesis.tex"
        found = "is a file"
    before = snapshot(user)
    assert cli_main([*commands(tiny_hf, ours, dst)[command], "--force"]) == 2
    line = one_error_line(capsys.readouterr().err, found)
    assert "pass --force" not in line  # never advise forcing these
    assert snapshot(user) == before
    assert not [p for p in user.parent.iterdir() if ".partial-" in p.name]


def test_refusal_names_what_was_found(tmp_path, tiny_hf, ours, capsys):
    """Our own output with a file of the user's added is not ours any more; a stranger's manifest neither."""
    dst = tmp_path / "out"
    export_converted(ours, dst)
    (dst / "my-results.csv").write_text("a,b\n")
    (dst / "runs").mkdir()
    before = snapshot(dst)
    assert export_main([str(ours), str(dst), "--force"]) == 2
    one_error_line(capsys.readouterr().err, str(dst), "my-results.csv", "folder runs/", "not replaced")
    assert snapshot(dst) == before

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / checkpoint.MANIFEST).write_text('{"format": "someone-else"}')
    (fake / "config.json").write_text("{}")
    assert convert_main([str(tiny_hf), str(fake), "--force", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, checkpoint.MANIFEST, "not ours")

    link = tmp_path / "link"
    link.symlink_to(dst)
    assert export_main([str(ours), str(link), "--force"]) == 2
    one_error_line(capsys.readouterr().err, "symbolic link")
    assert snapshot(dst) == before


def test_force_replaces_our_own_output(tmp_path, tiny_hf, ours, capsys):
    converted, exported = tmp_path / "converted", tmp_path / "exported"
    for dst, argv, main in ((converted, [str(tiny_hf), str(converted), "--quiet"], convert_main),
                            (exported, [str(ours), str(exported)], export_main)):
        assert main(argv) == 0
        capsys.readouterr()
        assert main(argv) == 2
        one_error_line(capsys.readouterr().err, "already exists; pass --force")
        names, inode = sorted(os.listdir(dst)), dst.stat().st_ino
        assert main([*argv, "--force"]) == 0
        assert sorted(os.listdir(dst)) == names and dst.stat().st_ino != inode  # a new directory in its place
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_main([str(ours), str(empty), "--force"]) == 0  # an empty directory holds nothing to lose
    assert checkpoint.is_converted(converted) and (exported / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "empty", "exported"]


def test_demo_refuses_an_existing_directory_before_building(tmp_path, capsys, monkeypatch):
    import internvl_jax.modeling

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "config.json").write_text("{}")
    (tmp_path / "demo" / "model.safetensors").write_text("")

    def no_building(*args, **kwargs):
        raise AssertionError("the model was built before the destination was checked")

    monkeypatch.setattr(internvl_jax.modeling.InternVL, "from_config", no_building)
    assert cli_main(["demo", str(tmp_path / "demo")]) == 2
    one_error_line(capsys.readouterr().err, "already exists; pass --force")


# ----- unwritable destinations -----
def test_destination_under_a_file(tmp_path, tiny_hf, ours, capsys):
    (tmp_path / "afile").write_text("x")
    for command in ("convert", "export", "demo"):
        assert cli_main(commands(tiny_hf, ours, tmp_path / "afile" / "sub" / "out")[command]) == 2
        one_error_line(capsys.readouterr().err, f"{tmp_path / 'afile'} is a file")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_read_only_destination(tmp_path, ours, capsys, monkeypatch):
    """mkdir raising EROFS (root ignores chmod, so the error is simulated): one line, no new folders left."""
    import errno

    real_mkdtemp = checkpoint.tempfile.mkdtemp

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))

    monkeypatch.setattr(checkpoint.tempfile, "mkdtemp", read_only)
    assert export_main([str(ours), str(tmp_path / "new" / "out")]) == 2
    one_error_line(capsys.readouterr().err, str(tmp_path / "new" / "out"), "Read-only file system")
    monkeypatch.setattr(checkpoint.tempfile, "mkdtemp", real_mkdtemp)
    assert list(tmp_path.iterdir()) == []  # the parent folder it made is gone again


# A file-size limit makes writes past 1 MB fail (EFBIG) as on a full disk, without root or a mount; set in the
# child itself (a preexec_fn would fork this multithreaded jax process).
_FULL_DISK = """
import resource, runpy, signal
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
runpy.run_module("internvl_jax.cli", run_name="__main__")
"""


@pytest.mark.parametrize("command", ["convert", "export"])
def test_full_destination_one_line_no_orbax_log(tmp_path, tiny_hf, ours, command):
    dst = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", _FULL_DISK, *commands(tiny_hf, ours, dst)[command]], cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    one_error_line(run.stderr, f"cannot write {dst}: File too large")
    assert list(tmp_path.iterdir()) == []


# ----- Ctrl-C and SIGKILL at random moments -----
def _interrupted_run(argv: list[str], parent: Path, sig: int, delay: float) -> subprocess.CompletedProcess:
    """Start `python -m internvl_jax.cli ARGV`; once its temporary sibling exists, wait `delay` s, send `sig`."""
    proc = subprocess.Popen([sys.executable, "-m", "internvl_jax.cli", *argv], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not any(".partial-" in p.name for p in parent.iterdir()):
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _is_complete(dst: Path, command: str) -> bool:
    """Every parameter folder committed (convert) / the safetensors file as long as its header says (export)."""
    if command == "convert":
        manifest = checkpoint.read_manifest(dst)
        return all((dst / e["dir"] / "_METADATA").is_file() for e in manifest["params"].values())
    raw = (dst / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    return (dst / "config.json").is_file() and len(raw) == 8 + n + end


INTERRUPTED = "interrupted; nothing was written at the destination"


def _check_interrupts(tmp_path, tiny_hf, ours, command, sig, tries, seed, first=0):
    rng = random.Random(seed)
    write_s = {"convert": 3.0, "export": 1.5}[command]  # measured length of the write phase
    for k in range(first, first + tries):
        parent = tmp_path / f"{command}-{k}"
        parent.mkdir()
        dst = parent / "out"
        argv = commands(tiny_hf, ours, dst)[command]
        old = None
        if k % 2:  # every other try replaces an earlier output of ours
            assert cli_main(argv) == 0
            old = snapshot(dst)
            argv = [*argv, "--force"]
        run = _interrupted_run(argv, parent, sig, rng.uniform(0, 1.3 * write_s))
        finished = run.stderr.strip().splitlines() == [f"wrote {dst}"]
        if sig == signal.SIGINT:
            # 130 and one line; or it had finished (the signal may still end the exiting interpreter: -SIGINT).
            assert run.returncode == 130 and run.stderr.strip() == INTERRUPTED or (
                finished and run.returncode in (0, -signal.SIGINT)), (run.returncode, run.stderr[-3000:])
            assert [p.name for p in parent.iterdir()] == (["out"] if dst.exists() else [])  # no .partial-* left
        else:
            assert run.returncode in (0, -signal.SIGKILL), run.stderr[-3000:]
        if finished:
            assert _is_complete(dst, command)
        elif old is not None:  # the old output, or (killed right after the swap) the complete new one
            assert snapshot(dst) == old or (sig == signal.SIGKILL and _is_complete(dst, command))
        else:
            assert not dst.exists() or _is_complete(dst, command)
        if sig == signal.SIGKILL:  # whatever was left, the next run works and clears the stale sibling
            assert cli_main([*commands(tiny_hf, ours, dst)[command], "--force"]) == 0
            assert _is_complete(dst, command) and [p.name for p in parent.iterdir()] == ["out"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
@pytest.mark.parametrize("command", ["convert", "export"])
def test_interrupted_at_random_moments(tmp_path, tiny_hf, ours, command, sig):
    # One try each (the default run's time): a fresh destination for two of the four, replacing an output of
    # ours for the other two, so each command and each signal meets both cases. The slow test below does 12 each.
    replaces = (command == "convert") == (sig == signal.SIGKILL)
    _check_interrupts(tmp_path, tiny_hf, ours, command, sig, tries=1, seed=19, first=int(replaces))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
@pytest.mark.parametrize("command", ["convert", "export"])
def test_interrupted_at_random_moments_many_times(tmp_path, tiny_hf, ours, command, sig):
    _check_interrupts(tmp_path, tiny_hf, ours, command, sig, tries=12, seed=1919)


_DEMO_INTERRUPT = """
import os, signal, sys
from internvl_jax import export
from internvl_jax.cli import main
write = export._write_file
def interrupted(*args):
    write(*args)
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C once a file of the checkpoint is written
export._write_file = interrupted
sys.exit(main(sys.argv[1:]))
"""


def test_demo_interrupted(tmp_path):
    run = subprocess.run([sys.executable, "-c", _DEMO_INTERRUPT, "demo", str(tmp_path / "demo")], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 130 and run.stderr.strip() == INTERRUPTED, run.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["convert", "export"])
def test_help_names_the_command_it_was_called_as(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli_main([command, "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith(f"usage: internvl-jax {command} ")


def test_interrupt_in_a_garbage_collection_callback_is_not_lost(capsys):
    """Python prints a Ctrl-C raised in a gc callback (jax has one) as "Exception ignored" and goes on."""
    import gc

    from convert.cli import run_command

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(phase)
            raise KeyboardInterrupt  # as a signal handler would, when SIGINT arrives during the callback

    def work():
        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)
        time.sleep(5)  # where the interrupt is delivered again

    fired: list[str] = []
    assert run_command(work) == 130
    assert capsys.readouterr().err == INTERRUPTED + "\n"
