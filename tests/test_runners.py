"""`internvl-jax batch` / `eval` end to end on a tiny model: outputs equal one-record-at-a-time `generate`,
bad records reported, SIGKILL at several points then resume, two shards, two jax.distributed processes."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from internvl_jax import InternVL, InternVLProcessor
from internvl_jax.cli import main as cli_main
from internvl_jax.demo import make_demo_checkpoint
from internvl_jax.runners.profiles import INTERNVL_SYSTEM
from internvl_jax.runners.scoring import extract_option
from tests import fixtures as F

NEW = 12  # new tokens per answer
TEMPLATE = {"max_patches": 2, "num_frames": 4}
OPTS = ["--max-new-tokens", str(NEW), "--max-patches", "2", "--num-frames", "4", "--save-token-ids"]
MAX_POSITIONS = 1200  # a small model limit, so that a "prompt too long" record is cheap to make


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The demo checkpoint (byte tokenizer, tiny widths, real 448px tiles) with a short maximum length."""
    directory = make_demo_checkpoint(tmp_path_factory.mktemp("runners") / "demo")
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = MAX_POSITIONS
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def model(ckpt):
    return InternVL.from_pretrained(ckpt), InternVLProcessor.from_pretrained(ckpt)


def b64_image(h: int, w: int, seed: int, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    Image.fromarray(F.synthetic_rgb(h, w, seed)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """A JSONL input: text, images (1 and 3 tiles, a path and a data URI), a video, and three bad records.
    Returns (path, [(id, messages the test builds itself, or None for a bad record)])."""
    d = tmp_path_factory.mktemp("prompts")
    Image.fromarray(F.synthetic_rgb(150, 400, 1)).save(d / "wide.png")  # 2 tiles + thumbnail at max_patches 2
    Image.fromarray(F.synthetic_rgb(120, 100, 2)).save(d / "tall.png")  # one tile
    F.write_video(d / "clip.mp4", F.synthetic_video(8, 64, 80, 3), fps=4)
    uri = "data:image/png;base64," + b64_image(90, 90, 4, "PNG")
    wide, tall, clip = str(d / "wide.png"), str(d / "tall.png"), str(d / "clip.mp4")

    def user(*content):
        return [{"role": "user", "content": list(content)}]

    def text(t):
        return {"type": "text", "text": t}

    records = [
        ({"id": "t1", "prompt": "Say something."}, user(text("Say something."))),
        ({"id": "w", "prompt": "What is this?", "images": [wide]},
         user({"type": "image", "url": wide}, text("What is this?"))),
        ({"id": 3, "messages": user({"type": "image", "url": uri}, text("Describe."))},
         user({"type": "image", "url": uri}, text("Describe."))),
        ({"id": "bad-image", "prompt": "x", "images": [str(d / "missing.png")]}, None),
        ({"id": "t2", "prompt": "A much longer question that goes on for a while, " * 3},
         user(text("A much longer question that goes on for a while, " * 3))),
        ({"id": "two", "prompt": "Compare.", "images": [tall, tall], "system": "Be brief."},
         [{"role": "system", "content": [text("Be brief.")]},
          *user({"type": "image", "url": tall}, {"type": "image", "url": tall}, text("Compare."))]),
        ({"id": "no-prompt", "images": [tall]}, None),
        ({"id": "v", "prompt": "What happens?", "video": clip},
         user({"type": "video", "url": clip}, text("What happens?"))),
        ({"id": "too-long", "prompt": "z" * MAX_POSITIONS}, None),
        ({"id": "t3", "prompt": "Short."}, user(text("Short."))),
        ({"id": "t4", "messages": [{"role": "user", "content": "Plain string content."}]},
         [{"role": "user", "content": "Plain string content."}]),
        ({"id": "tall", "prompt": "And this?", "images": [tall]},
         user({"type": "image", "url": tall}, text("And this?"))),
        ({"id": "t5", "prompt": "Count to three."}, user(text("Count to three."))),
        ({"id": "t6", "prompt": "Name a color."}, user(text("Name a color."))),
    ]
    path = d / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r, _ in records))
    return path, [(r["id"], m) for r, m in records]


def one_at_a_time(model, processor, messages):
    """The expected answer: this record alone through the processor and `generate`."""
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           **TEMPLATE)
    ids = inputs["input_ids"]
    out = model.generate(ids, inputs.get("pixel_values"), inputs["attention_mask"], max_new_tokens=NEW)
    new = [int(t) for t in out[0, ids.shape[1]:]]
    eos = set(model.generation_config.eos_token_id)
    end = next((i for i, t in enumerate(new) if t in eos), None)
    new = new if end is None else new[: end + 1]
    return new, processor.decode(new, skip_special_tokens=True), ids.shape[1]


@pytest.fixture(scope="module")
def reference(ckpt, prompts, tmp_path_factory):
    """An uninterrupted in-process run on the slot engine with 3 slots (fewer than the records, so slots are
    refilled): the output every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "results.jsonl"
    assert cli_main(["batch", "--model", str(ckpt), "--input", str(prompts[0]), "--output", str(out),
                     "--slots", "3", *OPTS]) == 0
    return out.read_bytes()


def test_static_batches_give_the_same_answers(ckpt, prompts, reference, tmp_path):
    """--slots 0: today's static batches (batch size 4, sorted in windows of 8) write the same file."""
    out = tmp_path / "static.jsonl"
    assert cli_main(["batch", "--model", str(ckpt), "--input", str(prompts[0]), "--output", str(out),
                     "--slots", "0", "--batch-size", "4", "--window", "8", *OPTS]) == 0

    def answers(data: bytes) -> list[dict]:  # the limit a too-long prompt breaks is worded per engine
        return [{**x, "error": x["error"] is not None} for x in map(json.loads, data.decode().splitlines())]

    assert answers(out.read_bytes()) == answers(reference)


def test_records_carry_their_own_generation_options(ckpt, model, tmp_path):
    """A record's max_new_tokens / sampling settings / seed override the command's; a bad one fails alone."""
    m, processor = model
    records = [{"id": "short", "prompt": "Say something.", "max_new_tokens": 3},
               {"id": "hot", "prompt": "Say something.", "temperature": "hot"},
               {"id": "drawn", "prompt": "Name a color.", "do_sample": True, "temperature": 0.7, "top_k": 20,
                "seed": 11},
               {"id": "cold", "prompt": "Name a color.", "do_sample": True, "temperature": 0.0},
               {"id": "plain", "prompt": "Name a color."}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    assert cli_main(["batch", "--model", str(ckpt), "--input", str(data), "--output", str(out), "--slots", "2",
                     *OPTS]) == 0
    lines = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert lines["short"]["new_tokens"] <= 3 and lines["plain"]["new_tokens"] > 3
    assert "field 'temperature' must be int or float, got 'hot'" in lines["hot"]["error"]
    assert "field 'temperature' must be > 0 when do_sample=True" in lines["cold"]["error"]
    user = [{"role": "user", "content": [{"type": "text", "text": "Name a color."}]}]
    inputs = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = inputs["input_ids"]
    drawn = m.generate(ids, None, inputs["attention_mask"], max_new_tokens=NEW, do_sample=True, temperature=0.7,
                       top_k=20, seed=11)[0, ids.shape[1]:]
    eos = set(m.generation_config.eos_token_id)
    end = next((i for i, t in enumerate(drawn) if int(t) in eos), len(drawn) - 1)
    assert lines["drawn"]["token_ids"] == [int(t) for t in drawn[: end + 1]]


def test_batch_equals_one_record_at_a_time(model, prompts, reference):
    m, processor = model
    lines = [json.loads(x) for x in reference.decode().splitlines()]
    assert [x["id"] for x in lines] == [i for i, _ in prompts[1]]  # input order, each id once
    assert [x["row"] for x in lines] == list(range(len(lines)))
    for line, (rid, messages) in zip(lines, prompts[1], strict=True):
        if messages is None:
            continue
        tokens, text, prompt_len = one_at_a_time(m, processor, messages)
        assert line["error"] is None, line
        assert (line["token_ids"], line["text"], line["prompt_tokens"]) == (tokens, text, prompt_len), rid
        assert line["new_tokens"] == len(tokens)
        assert line["finish_reason"] == ("eos" if tokens[-1] in m.generation_config.eos_token_id else "length")
    errors = {x["id"]: x["error"] for x in lines if x["error"]}
    assert set(errors) == {"bad-image", "no-prompt", "too-long"}
    assert "missing.png" in errors["bad-image"] and "record 'bad-image' (line 4)" in errors["bad-image"]
    assert "neither 'messages' nor 'prompt'" in errors["no-prompt"]
    assert "prompt too long" in errors["too-long"]
    assert all(x["text"] is None and x["new_tokens"] == 0 for x in lines if x["error"])
    # The prompts really differ in tiles and length (so the sort into batches had something to do).
    assert len({x["prompt_tokens"] for x in lines if not x["error"]}) >= 6


def test_batch_resume_after_completion_and_merge_only(ckpt, prompts, reference, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    finished_part(reference, out)
    # Everything is already done: no model is loaded, the final file is merged again, identical.
    assert cli_main(["batch", "--model", str(ckpt), "--input", str(prompts[0]), "--output", str(out), *OPTS]) == 0
    assert "0 to do" in capsys.readouterr().err and out.read_bytes() == reference
    # --dtype float32 given is the run made with the unset default on this CPU: the same run, not refused.
    assert cli_main(["batch", "--model", str(ckpt), "--input", str(prompts[0]), "--output", str(out), *OPTS,
                     "--dtype", "float32"]) == 0
    assert "0 to do" in capsys.readouterr().err
    # Other settings on the same output are refused instead of mixing two runs' answers.
    assert cli_main(["batch", "--model", str(ckpt), "--input", str(prompts[0]), "--output", str(out),
                     "--max-new-tokens", "5", "--max-patches", "2", "--num-frames", "4", "--save-token-ids"]) == 2
    assert "generation.max_new_tokens: was 12, now 5" in capsys.readouterr().err
    # --merge-only with a record missing says how many are missing.
    part = out.with_name(out.name + ".part0-of-1")
    part.write_bytes(b"".join(part.read_bytes().splitlines(keepends=True)[:-2]))
    out.unlink()
    assert cli_main(["batch", "--input", str(prompts[0]), "--output", str(out), "--merge-only"]) == 2
    assert "2 of 14 records are not done yet" in capsys.readouterr().err and not out.exists()


def finished_part(reference: bytes, out: Path) -> None:
    """A finished run's part file: the reference lines, in another order (as batches would write them)."""
    lines = reference.splitlines(keepends=True)
    out.with_name(out.name + ".part0-of-1").write_bytes(b"".join(reversed(lines)))



# ----- refusals before the model loads -----
@pytest.fixture
def no_model(monkeypatch):
    """These refusals must come before the model loads (not after a whole run): loading fails the test."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(InternVL, "from_pretrained", loaded)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory): to see that nothing was touched."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def refused(args: list[str], capsys, *needles: str) -> None:
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_batch_refuses_bad_output_paths_before_loading(ckpt, prompts, tmp_path, capsys, no_model):
    source = tmp_path / "prompts.jsonl"
    source.write_bytes(prompts[0].read_bytes())
    (tmp_path / "hard.jsonl").hardlink_to(source)
    (tmp_path / "link.jsonl").symlink_to(source)
    (tmp_path / "results").mkdir()
    (tmp_path / "notes.jsonl").write_text("mine, not a result file\n")
    (tmp_path / "file").write_text("a file, not a directory\n")
    cases = [
        (source, "is the input file (--input"),
        (f"{tmp_path}/../{tmp_path.name}/prompts.jsonl", "is the input file"),  # another spelling
        (tmp_path / "hard.jsonl", "is the input file"),  # the same inode under another name
        (tmp_path / "link.jsonl", "is the input file"),
        (tmp_path / "results", "is a directory"),
        (tmp_path / "notes.jsonl", "exists and is not the output of a run of this tool"),
        (tmp_path / "file" / "out.jsonl", f"{tmp_path / 'file'} is not a directory"),
    ]
    before = tree(tmp_path)
    for output, message in cases:
        refused(["batch", "--model", str(ckpt), "--input", str(source), "--output", str(output), *OPTS], capsys,
                f"--output {output}", message)
        assert tree(tmp_path) == before  # nothing written, nothing changed
    png = tmp_path / "photo.png"
    Image.fromarray(F.synthetic_rgb(20, 20, 0)).save(png)
    refused(["batch", "--model", str(ckpt), "--input", str(png), "--output", str(tmp_path / "out.jsonl"), *OPTS],
            capsys, f"{png} is not a UTF-8 text file")


def test_bad_run_sizes_are_refused_before_loading(ckpt, prompts, tmp_path, capsys, no_model):
    """--batch-size, --slots, --cache-len, --window out of range: one line naming the option, nothing loaded or
    written (one check, RunOptions', serves the command line and the Python API)."""
    from internvl_jax.runners.options import RunOptions

    out = tmp_path / "out.jsonl"
    for option, value in (("--batch-size", "0"), ("--slots", "-1"), ("--cache-len", "8"), ("--window", "-2")):
        refused(["batch", "--model", str(ckpt), "--input", str(prompts[0]), "--output", str(out), option, value,
                 *OPTS], capsys, f"({option}) must be", f"got {value}")
        assert not out.exists()
    with pytest.raises(ValueError, match=r"cache_len \(--cache-len\) must be at least 16, got 8"):
        RunOptions(cache_len=8)


def test_eval_refuses_bad_outputs_and_comma_separated_data_before_loading(ckpt, tmp_path, capsys, no_model):
    data = tmp_path / "bench.tsv"
    data.write_text("index\tquestion\tA\tB\tanswer\n1\tWhat?\tx\ty\tA\n")
    finished = tmp_path / "run1"  # an eval run's directory
    finished.mkdir()
    for name in ("run.json", "predictions.jsonl", "summary.json"):
        (finished / name).write_text("{}\n")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "summary.json").write_text("my own summary\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    comma = tmp_path / "comma.tsv"
    comma.write_text("index,question,A,B,answer\n1,What?,x,y,A\n")
    before = tree(tmp_path)
    cases = [
        (data, tmp_path / "notes.txt", "--output {} is an existing file; eval writes a directory"),
        (data, finished / "predictions.jsonl", f"is a file of the eval run in {finished}; --output names the run's "
                                               f"directory: give --output {finished}"),
        (data, foreign, f"{foreign / 'summary.json'} exists and is not the output of a run of this tool"),
        (comma, tmp_path / "new", f"{comma} does not look tab-separated"),
    ]
    for source, output, message in cases:
        refused(["eval", "--model", str(ckpt), "--data", str(source), "--output", str(output), *OPTS], capsys,
                message.format(output))
        assert tree(tmp_path) == before


def test_a_second_run_on_the_same_output_is_refused(ckpt, prompts, tmp_path, capsys, no_model):
    import fcntl

    out = tmp_path / "results.jsonl"
    with open(out.with_name(out.name + ".part0-of-1.lock"), "w") as lock:  # as a first run holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "08:00"}))
        lock.flush()
        refused(["batch", "--model", str(ckpt), "--input", str(prompts[0]), "--output", str(out), *OPTS], capsys,
                f"results.jsonl.part0-of-1 is being written by pid {os.getpid()} on host {socket.gethostname()}")


# ----- subprocess runs -----
@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache shared by the test's subprocesses: each would otherwise compile every program."""
    return tmp_path_factory.mktemp("xla_cache")


def cli_proc(cache: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen([sys.executable, "-m", "internvl_jax.cli", *args, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return err


def complete_lines(path: Path) -> list[bytes]:
    if not path.exists():
        return []
    return [x for x in path.read_bytes().splitlines(keepends=True) if x.endswith(b"\n")]


def kill_when(proc: subprocess.Popen, ready, part: Path, total: int) -> int:
    """SIGKILL `proc` as soon as `ready()` holds; returns how many complete lines its part file then held."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    held = len(complete_lines(part))
    assert held < total, "the run finished before it could be killed"
    return held


def started(proc: subprocess.Popen) -> bool:
    """The command is inside `main` (loading JAX): a signal now meets the CLI, not Python's own start-up."""
    try:
        return "jaxlib" in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


def signal_at_random(proc: subprocess.Popen, sig: signal.Signals, rng: random.Random, longest: float,
                     ready: Callable[[], bool] = lambda: True) -> int:
    """Send `sig` a random time (up to `longest` s) after `proc` has started and `ready()` holds; returns its
    exit status: 0 when it finished first, -9 for SIGKILL, 130 for SIGINT (then with one line on stderr and no
    traceback)."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and not (started(proc) and ready()):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(rng.uniform(0, longest))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == -signal.SIGINT:  # only when the signal came after `main` returned, as Python exited
        assert ": wrote " in err or ": scored " in err, err  # (the run's last message: it was over)
        return 0
    assert proc.returncode in ((0, -9) if sig == signal.SIGKILL else (0, 130)), err
    if proc.returncode == 130:
        assert "Traceback" not in err and err.count("interrupted") == 1, err
        assert err.splitlines()[-1].endswith("interrupted; the records finished so far are kept: run the same "
                                             "command again to resume"), err
    return proc.returncode


# Signals sent at random moments after the fixed kill points (a seeded sequence); the slow variant does more.
SIGNAL_ROUNDS = [pytest.param([signal.SIGINT, signal.SIGKILL], id="2-rounds"),
                 pytest.param([signal.SIGINT, signal.SIGKILL] * 4, id="8-rounds", marks=pytest.mark.slow)]


@pytest.mark.parametrize("rounds", SIGNAL_ROUNDS)
def test_sigkill_at_several_points_then_resume(ckpt, prompts, reference, tmp_path, compile_cache, rounds):
    out = tmp_path / "results.jsonl"
    part = out.with_name(out.name + ".part0-of-1")
    total = len(prompts[1])
    args = ["batch", "--model", str(ckpt), "--input", str(prompts[0]), "--output", str(out), "--batch-size", "1",
            "--window", "4", *OPTS]
    # 1. while starting (settings written, model loading, nothing generated yet)
    run_file = out.with_name(out.name + ".run.json")
    assert kill_when(cli_proc(compile_cache, *args), run_file.exists, part, total) == 0
    # 2. after the first result line
    first = kill_when(cli_proc(compile_cache, *args), lambda: len(complete_lines(part)) >= 1, part, total)
    # 3. a kill in the middle of a write leaves a torn line: the restart must cut it off, not keep or skip it
    with open(part, "ab") as f:
        f.write(b'{"id": "t5", "row": 12, "text": "half a li')
    # 4. a few records later
    second = kill_when(cli_proc(compile_cache, *args), lambda: len(complete_lines(part)) >= first + 4, part, total)
    assert first < second < total
    # 5. SIGINT (Ctrl-C) and SIGKILL at random moments
    rng, held = random.Random(19), second
    for k, sig in enumerate(rounds):
        # Every other round waits for a new result line first, so that some signals land during generation.
        ready = (lambda: True) if k % 2 == 0 else (lambda held=held: len(complete_lines(part)) > held)
        code = signal_at_random(cli_proc(compile_cache, *args), sig, rng, 2.0, ready)
        assert len(complete_lines(part)) >= held
        held = len(complete_lines(part))
        if code == 0:
            break
    err = finish(cli_proc(compile_cache, *args))
    assert f"{held} already done" in err
    assert out.read_bytes() == reference
    ids = [json.loads(x)["id"] for x in complete_lines(part)]
    assert sorted(map(str, ids)) == sorted(str(i) for i, _ in prompts[1])  # every record once in the part too
    # nothing temporary is left: no lock, no half-written file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, part.name, run_file.name])


def test_ctrl_c_in_generate_is_one_line(ckpt, compile_cache):
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(compile_cache))
    proc = subprocess.Popen([sys.executable, "-m", "internvl_jax.cli", "generate", "--model", str(ckpt),
                             "--max-new-tokens", "64", "Say something."], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not started(proc):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # while JAX and the model load
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and err == "internvl-jax generate: interrupted\n", err


def test_two_independent_shards_share_a_run(ckpt, prompts, reference, tmp_path, compile_cache):
    out = tmp_path / "results.jsonl"
    args = ["batch", "--model", str(ckpt), "--input", str(prompts[0]), "--output", str(out), "--batch-size", "2",
            *OPTS]
    procs = [cli_proc(compile_cache, *args, "--shard", f"{i}/2") for i in range(2)]
    errs = [finish(p) for p in procs]
    assert out.read_bytes() == reference
    assert sum("wrote 14 results (3 failed)" in e for e in errs) >= 1
    for i in range(2):
        rows = [json.loads(x)["row"] for x in complete_lines(out.with_name(f"{out.name}.part{i}-of-2"))]
        assert sorted(rows) == list(range(i, 14, 2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Slow: two more processes that start JAX and compile; tests/test_multihost.py joins two processes by
# jax.distributed in every default run (one sharded generate).
@pytest.mark.slow
def test_two_jax_distributed_processes(ckpt, prompts, reference, tmp_path, compile_cache):
    out = tmp_path / "results.jsonl"
    port = free_port()
    args = ["batch", "--model", str(ckpt), "--input", str(prompts[0]), "--output", str(out), "--batch-size", "4",
            *OPTS, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [cli_proc(compile_cache, *args, "--process-id", str(i)) for i in range(2)]
    errs = [finish(p) for p in procs]
    assert out.read_bytes() == reference
    assert "wrote 14 results" in errs[0] and "wrote" not in errs[1]  # merged once, by process 0
    for i in range(2):
        rows = [json.loads(x)["row"] for x in complete_lines(out.with_name(f"{out.name}.part{i}-of-2"))]
        assert sorted(rows) == list(range(i, 14, 2))


# ----- eval -----
INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN = "Answer the question using a single word or phrase."


def image_messages(image_b64: str | None, prompt: str) -> list[dict]:
    """What an eval profile sends: InternVL's system message, then the image and the prompt."""
    content = [] if image_b64 is None else [{"type": "image", "url": "data:image/jpeg;base64," + image_b64}]
    return [{"role": "system", "content": [{"type": "text", "text": INTERNVL_SYSTEM}]},
            {"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]


@pytest.fixture(scope="module")
def eval_processor(ckpt):
    """The processor as eval profiles set it up: PIL resizing, no EXIF rotation (VLMEvalKit's loading)."""
    return InternVLProcessor.from_pretrained(ckpt, image_backend="pil", exif_transpose=False)


def test_eval_tsv_with_base64_images(ckpt, model, eval_processor, tmp_path):
    m, processor = model[0], eval_processor
    jpg, png = b64_image(120, 100, 11), b64_image(100, 300, 12, "PNG")
    # (row, the prompt VLMEvalKit's InternVL wrapper sends for it -- written out by hand --, its image)
    rows = [
        ({"index": 10, "question": "What color?", "hint": "Look closely.", "A": "red", "B": "green", "C": "blue",
          "answer": "B", "category": "color", "image": jpg},
         f"Look closely.\nWhat color?\nA. red\nB. green\nC. blue\n{INSTRUCTION}", jpg),
        ({"index": 11, "question": "How many?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "C",
          "category": "count", "image": png},
         # Column D holds only this 4 and empty cells: pandas reads it as float, so VLMEvalKit shows "4.0".
         f"How many?\nA. 1\nB. 2\nC. 3\nD. 4.0\n{INSTRUCTION}", png),
        ({"index": 12, "question": "Same picture?", "A": "yes", "B": "no", "answer": "A", "category": "color",
          "image": "10"},  # VLMEvalKit's way of sharing row 10's image
         f"Same picture?\nA. yes\nB. no\n{INSTRUCTION}", jpg),
        ({"index": 13, "question": "这是什么？", "A": "猫", "B": "狗", "answer": "B", "category": "animal",
          "image": jpg},
         "这是什么？\nA. 猫\nB. 狗\n请直接回答选项字母。", jpg),
        ({"index": 14, "question": "Broken", "A": "x", "B": "y", "answer": "A", "category": "count",
          "image": "!not-base64!" * 8}, None, None),
        # A row without options in a multiple-choice file: build_multi_choice_prompt's direct-answer form.
        ({"index": 15, "question": "Title?", "answer": "nothing like it", "category": "ocr", "image": png},
         "Title?\nAnswer the question directly.", png),
    ]
    expected = {f["index"]: one_at_a_time(m, processor, image_messages(image, prompt))
                for f, prompt, image in rows if prompt is not None}
    texts = {i: e[1] for i, e in expected.items()}
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    data = tmp_path / "bench.tsv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        for fields, _, _ in rows:
            w.writerow(["" if fields.get(h) is None else fields[h] for h in header])
    out = tmp_path / "eval"
    assert cli_main(["eval", "--model", str(ckpt), "--data", str(data), "--output", str(out), "--batch-size", "3",
                     *OPTS, "--no-progress"]) == 0
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [p["index"] for p in preds] == [10, 11, 12, 13, 14, 15]
    assert [p["prediction"] for p in preds] == [texts.get(i) for i in range(10, 16)]
    # Same prompt (its length in tokens; the byte tokenizer has one per character) and same answer tokens.
    got = {p["index"]: (p["token_ids"], p["prediction"], p["prompt_tokens"]) for p in preds if not p["error"]}
    assert got == expected
    assert "record 14 (row 5)" in preds[4]["error"] and "base64" in preds[4]["error"]
    # The summary against a count made here from the generated texts and the answers (a failed row is wrong).
    hits = [f["index"] != 14 and extract_option(texts[f["index"]], {k: f[k] for k in "ABCD" if k in f}) == f["answer"]
            for f, _, _ in rows]
    mc = summary["multiple_choice"]
    assert (mc["total"], mc["correct"]) == (6, sum(hits))
    assert {k: v["total"] for k, v in mc["per_category"].items()} == {"color": 2, "count": 2, "animal": 1, "ocr": 1}
    assert (summary["failed"], summary["records"], summary["unscored"]) == (1, 6, 0)
    # The file's name is no VLMEvalKit dataset: multiple choice from its columns, recorded with every setting.
    assert summary["dataset"]["name"] == "bench" and summary["dataset"]["kind"] == "MCQ"
    assert summary["dataset"]["max_patches"] == 2 and summary["dataset"]["image_backend"] == "pil"
    # VLMEvalKit's result file: Overall, then each category (sorted), as report_acc writes it.
    cats = [f["category"] for f, _, _ in rows]
    acc = {c: sum(h for h, k in zip(hits, cats, strict=True) if k == c) / cats.count(c) for c in sorted(set(cats))}
    assert (out / "bench_acc.csv").read_text() == ('"split","Overall",' + ",".join(f'"{c}"' for c in acc) + "\n"
                                                   + f'"none","{sum(hits) / 6!r}",'
                                                   + ",".join(f'"{v!r}"' for v in acc.values()) + "\n")
    # Running again changes nothing (all done): the same predictions and summary.
    before = (out / "predictions.jsonl").read_bytes(), (out / "summary.json").read_bytes()
    assert cli_main(["eval", "--model", str(ckpt), "--data", str(data), "--output", str(out), *OPTS,
                     "--no-progress"]) == 0
    assert ((out / "predictions.jsonl").read_bytes(), (out / "summary.json").read_bytes()) == before


def test_eval_jsonl_open_questions(ckpt, model, eval_processor, tmp_path):
    m, processor = model[0], eval_processor
    jpg = b64_image(64, 64, 21)
    questions = ["What is it?", "Where?", "Why?"]
    expected = [one_at_a_time(m, processor, image_messages(jpg if i < 2 else None, f"{q}\n{OPEN}"))
                for i, q in enumerate(questions)]
    texts = [e[1] for e in expected]
    rows = [{"id": "q0", "question": questions[0], "answer": [texts[0], "other"], "image": jpg, "category": "a"},
            {"id": "q1", "question": questions[1], "answer": texts[1] + " not quite", "image": jpg, "category": "a"},
            {"id": "q2", "question": questions[2], "answer": texts[2], "category": "b"}]
    data = tmp_path / "open.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    assert cli_main(["eval", "--model", str(ckpt), "--data", str(data), "--output", str(out), *OPTS,
                     "--no-progress"]) == 0
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(p["token_ids"], p["prediction"], p["prompt_tokens"]) for p in preds] == expected
    assert [p["exact_match"] for p in preds] == [True, False, True]
    em = json.loads((out / "summary.json").read_text())["open"]["exact_match"]
    assert (em["correct"], em["total"], em["per_category"]["a"]["correct"]) == (2, 3, 1)


def test_eval_random_kills_and_interrupts_then_resume(ckpt, tmp_path, compile_cache):
    """(Answers equal an uninterrupted run's: the batch test above shows it; here, each record exactly once.)"""
    # (No image column: VLMEvalKit, and so eval, would leave out rows whose image cell is empty.)
    header = ["index", "question", "A", "B", "C", "answer", "category"]
    rows = [[i, f"Question {i}: " + "which one? " * (i % 4), "red", "green", "blue", "ABC"[i % 3], "c"]
            for i in range(8)]
    data = tmp_path / "bench.tsv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows([header, *rows])
    out = tmp_path / "run"
    part = out / "results.jsonl.part0-of-1"
    args = ["eval", "--model", str(ckpt), "--data", str(data), "--batch-size", "2", *OPTS, "--output", str(out)]
    rng = random.Random(7)
    # SIGINT while loading or compiling, then SIGKILL once some results are written
    for sig, longest, ready in ((signal.SIGINT, 3.0, lambda: True),
                                (signal.SIGKILL, 2.0, lambda: len(complete_lines(part)) > 0)):
        if signal_at_random(cli_proc(compile_cache, *args), sig, rng, longest, ready) == 0:
            break
    finish(cli_proc(compile_cache, *args))
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in preds] == list(range(8)) and not any(p["error"] for p in preds)
    assert json.loads((out / "summary.json").read_text())["multiple_choice"]["total"] == 8
    assert sorted(json.loads(x)["row"] for x in complete_lines(part)) == list(range(8))  # each record once
    assert sorted(p.name for p in out.iterdir()) == sorted(["predictions.jsonl", "summary.json", "run.json",
                                                           "bench_acc.csv", part.name])
