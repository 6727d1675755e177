"""Runner logic without a model: prompt text, option extraction, scores, input parsing, part files, merge."""

from __future__ import annotations

import json

import pytest

from internvl_jax.runners import eval as ev
from internvl_jax.runners import scoring as sc
from internvl_jax.runners import shards
from internvl_jax.runners.records import TableRow, read_prompts, read_table
from internvl_jax.runners.shards import RunMismatch, Share

OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


# ----- prompts -----
def test_multiple_choice_prompt_text():
    # Written out by hand from VLMEvalKit's build_multi_choice_prompt (InternVL) for the same row.
    expected = ("Look at the left side.\nWhat color is the car?\nA. red\nB. green\nC. blue\nD. yellow\n"
                "Answer with the option's letter from the given choices directly.")
    assert sc.build_mcq_prompt("What color is the car?", OPTIONS, "Look at the left side.") == expected
    assert sc.build_mcq_prompt("Q?", {"A": "x", "B": "y"}) == (
        "Q?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.")
    # Any CJK character anywhere (here only in an option) switches the instruction to Chinese.
    assert sc.build_mcq_prompt("Which?", {"A": "猫", "B": "dog"}).endswith("\nB. dog\n请直接回答选项字母。")
    # No options (MMMU's open questions): build_multi_choice_prompt asks for a direct answer.
    assert sc.build_mcq_prompt("How many?", {}) == "How many?\nAnswer the question directly."
    assert sc.build_mcq_prompt("多少？", {}) == "多少？\n请直接回答问题。"
    # Numbers are shown as Python shows them (pandas gives float columns when a cell is empty).
    assert sc.build_mcq_prompt("n?", {"A": 3.0, "B": 4}).split("\n")[1:3] == ["A. 3.0", "B. 4"]


def test_eval_item_conversation_layout():
    one = ev.EvalItem(0, 1, "row 1", "Q?", None, {"A": "x", "B": "y"}, "A", images=("data:image/png;base64,AAA",))
    content = ev.conversation(one, system="Be brief.")[1]["content"]
    assert [b["type"] for b in content] == ["image", "text"] and content[1]["text"].startswith("Q?\nA. x")
    two = ev.EvalItem(0, 1, "row 1", "Q?", images=("p1", "p2"))
    content = ev.conversation(two)[0]["content"]
    assert [b.get("text", b["type"]) for b in content][:4] == ["Image-1: ", "image", "Image-2: ", "image"]


# ----- option extraction -----
@pytest.mark.parametrize("answer, expected", [
    ("B", "B"),
    ("B.", "B"),
    ("The answer is (C).", "C"),
    ("(D) yellow", "D"),
    ("Answer: A", "A"),
    ("blue", "C"),  # the option's text
    ("It is Green.", "B"),  # text match ignores case
    ("", None),
    ("I cannot tell.", None),
    ("A or B", None),  # two letters: ambiguous
    ("red or blue", None),  # two option texts: ambiguous
    ("Cannot determine the answer", "Z"),  # a refusal
])
def test_extract_option(answer, expected):
    assert sc.extract_option(answer, OPTIONS) == expected


def test_extract_option_only_among_the_given_letters():
    assert sc.extract_option("E", {"A": "x", "B": "y"}) is None
    assert sc.extract_option("(E)", {**OPTIONS, "E": "pink"}) == "E"


# ----- open-question scores -----
def test_exact_and_relaxed():
    assert sc.exact_hit("  Paris ", ["paris"]) and not sc.exact_hit("Paris, France", ["paris"])
    assert sc.exact_hit("b", ["a", "B"])  # any reference answer
    assert sc.relaxed_correctness("100", "104") and not sc.relaxed_correctness("100", "106")
    assert sc.relaxed_correctness("10%", "0.1")  # a percentage is a fraction
    assert sc.relaxed_correctness("Yes", "yes") and not sc.relaxed_correctness("yes", "no")
    assert not sc.relaxed_correctness("0", "0.0")  # a zero target compares as text (pix2struct's quirk)
    # The gold answer is the reference point (VLMEvalKit's process_line passes it as `target`): prediction 95.5
    # vs gold 100.3 is 4.79% of the gold answer (a hit) though 5.03% of the prediction; swapped, a miss.
    assert sc.relaxed_hit("95.5", ["100.3"]) and not sc.relaxed_hit("100.3", ["95.5"])
    assert sc.answer_list("['3', 'three']") == ["3", "three"] and sc.answer_list(7) == ["7"]


def test_summary_counts_match_a_count_by_hand():
    cats = ["color", "count", "color", "count", "color", "shape"]
    items = [ev.EvalItem(i, 100 + i, f"row {i}", f"q{i}", None, dict(OPTIONS), ans, {"category": c})
             for i, (ans, c) in enumerate(zip("ABCDAB", cats, strict=True))]
    items.append(ev.EvalItem(6, 106, "row 7", "How many?", None, {}, "['12', 'twelve']", {"category": "count"}))
    items.append(ev.EvalItem(7, 107, "row 8", "Width?", None, {}, "50", {"category": "count"}))
    items.append(ev.EvalItem(8, 108, "row 9", "No answer", None, dict(OPTIONS), None, {"category": "shape"}))
    texts = ["A", "The answer is (C).", "blue", None, "I don't know", "green", "Twelve", "51", "B"]
    results = [{"row": i, "text": t, "error": "record: broken image" if t is None else None,
                "prompt_tokens": 10, "new_tokens": 2} for i, t in enumerate(texts)]
    predictions, summary = ev.score(items, results)
    # By hand: row0 A==A hit, row1 C!=B miss, row2 blue->C hit, row3 failed (counts as wrong),
    # row4 nothing inferred miss, row5 green->B hit: 3 of 6; color 2/3, count 0/2, shape 1/1.
    mc = summary["multiple_choice"]
    assert (mc["correct"], mc["total"], mc["accuracy"]) == (3, 6, 0.5)
    assert {k: (v["correct"], v["total"]) for k, v in mc["per_category"].items()} == {
        "color": (2, 3), "count": (0, 2), "shape": (1, 1)}
    assert summary["open"]["exact_match"]["correct"] == 1  # "Twelve" == "twelve"; "51" != "50"
    assert summary["open"]["relaxed_accuracy"]["correct"] == 2  # 51 is within 5% of 50
    assert summary["failed"] == 1 and summary["unscored"] == 1 and summary["records"] == 9
    assert [p["index"] for p in predictions] == [100 + i for i in range(9)]
    assert [p.get("extracted") for p in predictions[:6]] == ["A", "C", "C", None, None, "B"]
    assert predictions[8]["hit"] is None and predictions[3]["error"] == "record: broken image"


# ----- inputs -----
def test_read_prompts_reports_bad_records(tmp_path):
    lines = [
        {"id": "ok", "prompt": "hi", "images": ["x.png"]},
        "{broken",
        {"prompt": "no id"},
        {"id": "ok", "prompt": "again"},
        {"id": 5, "text": "neither messages nor prompt"},
        {"id": 6, "prompt": ["not", "a", "string"]},
        {"id": 7, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
        [1, 2],
    ]
    (tmp_path / "x.png").write_bytes(b"")
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    reqs = read_prompts(src)
    assert [r.row for r in reqs] == list(range(8))
    errors = [r.error for r in reqs]
    assert errors[0] is None and errors[6] is None
    assert "line 2 is not valid JSON" in errors[1]
    assert "line 3: missing field 'id'" in errors[2]
    assert "record 'ok' (line 4): duplicate id (first on line 1)" in errors[3]
    assert "record 5 (line 5)" in errors[4] and "neither 'messages' nor 'prompt'" in errors[4]
    assert "field 'prompt' must be a string" in errors[5]
    assert "line 8: expected a JSON object" in errors[7]
    # A relative image path that only exists next to the input file is found there.
    assert reqs[0].conversation[0]["content"][0]["url"] == str(tmp_path / "x.png")


def test_read_tsv_like_pandas(tmp_path):
    f = tmp_path / "b.tsv"
    f.write_text("index\tquestion\tA\tB\tC\tanswer\n"
                 "1\tQ1\t3\tNone\t\tA\n"
                 "2\t\"Q2\twith tab\"\t4\tx\t5\tB\n\n", encoding="utf-8")
    rows = read_table(f)
    assert [r.fields["index"] for r in rows] == [1, 2]
    # "None" and "" are missing (pandas' NA strings); column C has a gap, so pandas makes it float.
    assert rows[0].fields["B"] is None and rows[0].fields["C"] is None and rows[1].fields["C"] == 5.0
    assert rows[0].fields["A"] == 3 and rows[1].fields["question"] == "Q2\twith tab"
    items = ev.items_from_rows(rows, f)
    assert items[0].options == {"A": 3} and items[1].options == {"A": 4, "B": "x", "C": 5.0}
    assert "C. 5.0" in items[1].prompt()


def test_items_from_rows_errors_and_shared_images(tmp_path):
    big = "iVBORw0KGgo" + "A" * 80
    rows = [TableRow("row 1", {"index": 1, "question": "q", "image": big}),
            TableRow("row 2", {"index": 2, "question": "q", "image": "1"}),  # shares row 1's image
            TableRow("row 3", {"index": 3, "image": big}),
            TableRow("row 4", {"index": 4, "question": "q", "image": "99"}),
            TableRow("row 5", {"index": 1, "question": "dup"}),
            TableRow("row 6", {"question": "no index"}),
            TableRow("row 7", {"index": 7, "question": "q", "image_path": "['a.jpg', '/abs/b.jpg']"}),
            TableRow("line 8", None, "line 8 is not valid JSON")]
    items = ev.items_from_rows(rows, tmp_path / "d.tsv")
    assert items[0].images == items[1].images == ("data:image/jpeg;base64," + big,)
    assert "missing field 'question'" in items[2].error
    assert "record 4 (row 4)" in items[3].error and "'99'" in items[3].error
    assert "duplicate index" in items[4].error and "missing field 'index'" in items[5].error
    assert items[6].images == (str(tmp_path / "a.jpg"), "/abs/b.jpg")
    assert items[7].error == "line 8 is not valid JSON"
    reqs = ev.requests_for(items)
    assert [r.error is None for r in reqs] == [True, True, False, False, False, False, True, False]


# ----- part files, resume, merge -----
def test_share_split_covers_every_row_once():
    n = 3
    owners = [[s for s in range(n) if Share(s, n).owns(r)] for r in range(10)]
    assert all(len(o) == 1 for o in owners)
    assert Share.parse("1/4") == Share(1, 4)
    for bad in ("4/4", "x", "-1/2"):
        with pytest.raises(ValueError):
            Share.parse(bad)


def _line(row, rid, text="t"):
    return shards.result_line({"id": rid, "row": row, "text": text, "error": None})


def test_torn_lines_resume_and_merge(tmp_path):
    base = tmp_path / "out.jsonl"
    ids = ["a", "b", "c", "d", "e"]

    def check(row, rid):
        return None if ids[row] == rid else f"id {rid!r} is not {ids[row]!r}"

    p0, p1 = shards.part_path(base, Share(0, 2)), shards.part_path(base, Share(1, 2))
    p0.write_bytes(_line(0, "a") + _line(4, "e") + _line(2, "c")[:9])  # torn: killed mid-write
    p1.write_bytes(_line(1, "b") + _line(3, "d")[:-1])  # torn just before its newline
    old = tmp_path / "out.jsonl.part0-of-1"  # a part from an earlier run with one process
    old.write_bytes(_line(2, "c", "first") + b'{"id": "x"')
    assert shards.find_parts(base) == [old, p0, p1]
    done = shards.load_done(shards.find_parts(base), check)
    assert sorted(done) == [0, 1, 2, 4]
    lines, missing = shards.merged_lines(shards.find_parts(base), 5, check)
    assert lines is None and missing == 1
    assert shards.repair_tail(p1) == len(_line(3, "d")) - 1 and p1.read_bytes() == _line(1, "b")
    with shards.PartWriter(p0) as w:  # opening cuts the torn line, then appends
        w.write([_line(2, "c", "second")])
    with shards.PartWriter(p1) as w:
        w.write([_line(3, "d")])
    lines, missing = shards.merged_lines(shards.find_parts(base), 5, check)
    assert missing == 0 and [json.loads(x)["id"] for x in lines] == ids
    assert json.loads(lines[2])["text"] == "first"  # a row done twice (re-sharded run) is written once
    p1.write_bytes(_line(3, "zzz"))
    with pytest.raises(RunMismatch, match="belongs to another input"):
        shards.load_done([p1], check)


def test_fingerprint_mismatch_is_refused(tmp_path):
    f = tmp_path / "run.json"
    shards.check_fingerprint(f, {"a": 1, "g": {"max_new_tokens": 8}})
    shards.check_fingerprint(f, {"a": 1, "g": {"max_new_tokens": 8}})
    with pytest.raises(RunMismatch, match="g.max_new_tokens: was 8, now 9"):
        shards.check_fingerprint(f, {"a": 1, "g": {"max_new_tokens": 9}})

    (tmp_path / "other.json").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(RunMismatch, match=r"other.json is not the settings file of a run"):
        shards.check_fingerprint(tmp_path / "other.json", {"a": 1})


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_part_lock_names_its_holder_and_is_taken_over_when_stale(tmp_path, monkeypatch):
    import errno
    import os

    part = tmp_path / "out.jsonl.part0-of-1"
    lock = part.with_name(part.name + ".lock")
    with shards.PartLock(part):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        # A second holder (another open file: flock conflicts within one process too) is refused, by name.
        with pytest.raises(shards.PartBusy, match=rf"{part} is being written by pid {os.getpid()} on host "
                                                  rf"{shards.HOST} .*lock {lock}"):
            shards.PartLock(part).__enter__()
    assert not lock.exists()  # released: nothing left behind
    # A lock file left by a killed process (its flock died with it) is simply taken.
    lock.write_text(json.dumps({"pid": dead_pid(), "host": shards.HOST}))
    with shards.PartLock(part):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # Without flock (some network filesystems) the file decides: a dead pid of this host is taken over; a live
    # one, or one of another host (which cannot be checked from here), is not.
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock.write_text(json.dumps({"pid": dead_pid(), "host": shards.HOST}))
    with shards.PartLock(part):
        pass
    for holder in ({"pid": os.getpid(), "host": shards.HOST}, {"pid": dead_pid(), "host": "elsewhere"}):
        lock.write_text(json.dumps(holder))
        with pytest.raises(shards.PartBusy, match=f"pid {holder['pid']} on host {holder['host']}"):
            shards.PartLock(part).__enter__()


def test_atomic_write_leaves_no_temporaries(tmp_path, monkeypatch):
    import os

    target = tmp_path / "results.jsonl"
    stale = tmp_path / f".results.jsonl.tmp-{shards.HOST}-{dead_pid()}"  # left by a SIGKILL
    live = tmp_path / f".results.jsonl.tmp-{shards.HOST}-{os.getppid()}"  # a live process writing now
    remote = tmp_path / ".results.jsonl.tmp-elsewhere-1"  # another host's: cannot tell, left alone
    for p in (stale, live, remote):
        p.write_bytes(b"half")
    shards.write_atomic(target, b"one\n")
    assert target.read_bytes() == b"one\n" and not stale.exists() and live.exists() and remote.exists()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shards.write_atomic(target, b"two\n")
    assert target.read_bytes() == b"one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (target, live, remote))


def test_input_files_that_are_not_text_or_not_tab_separated_are_named(tmp_path):
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ValueError, match=rf"{png} is not a UTF-8 text file .*expected JSONL"):
        read_prompts(png)
    tsv = tmp_path / "photo.tsv"
    tsv.write_bytes(png.read_bytes())
    with pytest.raises(ValueError, match=rf"{tsv} is not a UTF-8 text file .*tab-separated"):
        read_table(tsv)
    late = tmp_path / "late.jsonl"  # good lines, then bytes that are not text: the error says where
    late.write_bytes(b'{"id": 1, "prompt": "a"}\n' * 3000 + b"\xff\xfe\n")
    with pytest.raises(ValueError, match=r"late.jsonl is not a UTF-8 text file \(invalid start byte after line"):
        read_prompts(late)
    csv_file = tmp_path / "bench.tsv"
    csv_file.write_text("index,question,A,B,answer\n1,What?,x,y,A\n")
    with pytest.raises(ValueError, match=rf"{csv_file} does not look tab-separated: its header line "
                                         r"'index,question,A,B,answer' has no tab \(but commas"):
        read_table(csv_file)
    blank_first = tmp_path / "blank.tsv"  # pandas skips blank lines before the header too
    blank_first.write_text("\nindex\tquestion\n1\tWhat?\n")
    assert [r.fields for r in read_table(blank_first)] == [{"index": 1, "question": "What?"}]


def test_failing_batch_is_retried_row_by_row():
    import numpy as np

    from internvl_jax.runners.batch import Encoded, Generation, plan_batches
    from internvl_jax.runners.records import Request

    calls = []

    def generate(ids, pixels, mask):
        calls.append(ids.shape[0])
        if (ids == 66).any():
            raise RuntimeError("device fell over")
        # Echo each row's last prompt token, then EOS (9) for even ones, then pad (0).
        last = ids[:, -1:]
        new = np.concatenate([last, np.where(last % 2 == 0, 9, last), np.zeros_like(last)], axis=1)
        return np.concatenate([ids, new], axis=1)

    enc = [Encoded(Request(i, f"r{i}", f"line {i + 1}", []), np.array([1] * (i + 1) + [t]), None)
           for i, t in enumerate([4, 66, 5])]
    gen = Generation(generate, pad=0, eos=frozenset({9}), decode=lambda t: ",".join(map(str, t)),
                     save_token_ids=True)
    (batch,) = plan_batches(enc, 4)
    rows = {r["id"]: r for r in gen(batch)}
    assert calls == [3, 1, 1, 1]  # the batch fails, then each row alone
    assert rows["r1"]["error"] == "record 'r1' (line 2): RuntimeError: device fell over"
    assert (rows["r0"]["token_ids"], rows["r0"]["finish_reason"], rows["r0"]["new_tokens"]) == ([4, 9], "eos", 2)
    assert (rows["r2"]["token_ids"], rows["r2"]["finish_reason"]) == ([5, 5, 0], "length")
    assert rows["r0"]["text"] == "4,9" and rows["r0"]["prompt_tokens"] == 2
