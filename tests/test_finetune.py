"""Fine-tuning (internvl_jax/training/finetune.py) on the demo checkpoint and the shapes task: labels on the
assistant's tokens only, a run killed between checkpoints resumes onto the same loss curve, frozen parts stay
as they were, bad records are skipped with their line (or stop the run with --strict), and the result loads with
`from_pretrained` and exports to -hf."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from internvl_jax.cli import main as cli_main
from internvl_jax.demo import make_demo_checkpoint, shapes
from internvl_jax.modeling import InternVL
from internvl_jax.processing.processor import InternVLProcessor
from internvl_jax.runners.records import read_prompts
from internvl_jax.training import finetune as F
from internvl_jax.training.options import FinetuneOptions


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    ckpt = make_demo_checkpoint(root / "demo")
    train = shapes.write(root / "data", 12, seed=0, name="train")
    held = shapes.write(root / "data", 4, seed=1, name="heldout")
    return root, ckpt, train, held


def test_labels_are_the_assistant_turn(setup):
    _, ckpt, train, _ = setup
    processor = InternVLProcessor.from_pretrained(ckpt)
    record = json.loads(train.read_text().splitlines()[0])
    ex = F.encode(processor, read_prompts(train)[0].conversation, 4096)
    trained = ex.labels != F.IGNORE
    text = processor.decode(ex.ids[trained])
    assert text.startswith(record["answer"] + "<|im_end|>"), text
    # nothing before the assistant's turn is trained: the prompt, the image tokens, the generation prompt
    first = int(np.argmax(trained))
    assert not trained[:first].any() and processor.decode(ex.ids[:first]).endswith("<|im_start|>assistant\n")


def test_turn_boundaries_without_reprocessing_images(setup):
    """`encode` processes a conversation's images once and finds each assistant turn's tokens from the rendered
    prefixes and the tile counts: the same lengths as tokenizing every prefix with its images."""
    root, ckpt, train, _ = setup
    processor = InternVLProcessor.from_pretrained(ckpt)
    wide = root / "wide.png"
    shapes.draw(next(shapes.examples(1, 5)).scene).resize((900, 300)).save(wide)  # several tiles + a thumbnail
    image = read_prompts(train)[0].conversation[0]["content"][0]
    conversation = [
        {"role": "user", "content": [image, {"type": "text", "text": "How many shapes are there?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
        {"role": "user", "content": [{"type": "image", "url": str(wide)}, {"type": "text", "text": "And here?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
    ]
    full = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    tiles = [int(n) for n in full["num_patches"]]
    assert tiles[0] == 1 and tiles[1] > 2
    for k in range(1, 5):
        for gen in (False, True):
            prompt = processor.apply_chat_template(conversation[:k], add_generation_prompt=gen)
            want = processor.apply_chat_template(conversation[:k], add_generation_prompt=gen, tokenize=True).shape[1]
            assert processor.expanded_length(prompt, tiles) == want, (k, gen)
    ex = F.encode(processor, conversation, 4096)
    assert processor.decode(ex.ids[ex.labels != F.IGNORE]) == "3<|im_end|>\ntwo<|im_end|>\n"


def test_rows_pad_at_most_a_quarter_with_few_lengths():
    """A row of n tokens pads to at most max(16, 1.25 n) (a power of two padded 65 to 128), and a doubling of the
    length holds at most four row lengths (each a compiled step)."""
    lengths = [F.row_length(n) for n in range(1, 4097)]
    assert all(n <= t <= max(16, 1.25 * n) for n, t in enumerate(lengths, 1))
    assert F.row_length(85) == 96 and F.row_length(65) == 80
    for k in range(4, 12):
        assert len({t for t in lengths if 2**k < t <= 2 ** (k + 1)}) <= 4


def test_pixels_past_the_memory_budget_are_made_per_batch(setup, monkeypatch):
    _, ckpt, train, _ = setup
    processor = InternVLProcessor.from_pretrained(ckpt)
    kept, _ = F.load(processor, train, 4096, strict=False)
    monkeypatch.setattr(F, "PIXEL_MEMORY", kept[0].pixels.nbytes)  # the first record keeps its pixels
    lazy, _ = F.load(processor, train, 4096, strict=False)
    assert lazy[0].pixels is not None and all(e.pixels is None and e.conversation for e in lazy[1:])
    a, b = F.collate(kept[:5], 4096), F.collate(lazy[:5], 4096, processor)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="processor"):
        F.collate(lazy[:5], 4096)


def test_one_compilation_a_row_length(setup):
    """The step's first call and every later one run the same program: the optimizer state starts where the
    parameters are (optax's uncommitted step counts made the first call a program of its own)."""
    _, ckpt, train, _ = setup
    processor = InternVLProcessor.from_pretrained(ckpt)
    model = InternVL.from_pretrained(ckpt, dtype="float32")
    tx = F.optimizer(FinetuneOptions(steps=4, warmup=1), model.params)
    step = F.train_step(model, tx)
    params, state = model.params, F.init_state(tx, model.params)
    examples, _ = F.load(processor, train, 4096, strict=False)
    b = F.collate(examples[:2], 4096)
    for _ in range(3):
        params, state, loss = step(params, state, b["ids"], b["labels"], b["pixels"], b["mask"])
    assert np.isfinite(float(loss)) and step._cache_size() == 1


@pytest.mark.slow  # three short runs: about two minutes
def test_resume_after_a_kill_follows_the_same_curve_and_the_result_loads(setup, tmp_path, monkeypatch):
    _, ckpt, train, held = setup
    opts = FinetuneOptions(steps=4, batch_size=4, save_every=2, warmup=1, learning_rate=3e-3)
    whole = F.finetune(ckpt, train, tmp_path / "whole", opts, heldout=held, progress=False)
    curve = (tmp_path / "whole/loss.jsonl").read_text().splitlines()
    assert len(curve) == 4 and "heldout" in json.loads(curve[-1])

    # A run that dies after update 3 (its checkpoint is at 2): run again, it resumes at 2 and redoes 3 and 4.
    real, calls = F.train_step, []

    def dying(model, tx):
        step = real(model, tx)

        def run(*a):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return step(*a)
        return run

    monkeypatch.setattr(F, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        F.finetune(ckpt, train, tmp_path / "killed", opts, heldout=held, progress=False)
    assert len((tmp_path / "killed/loss.jsonl").read_text().splitlines()) == 3
    monkeypatch.setattr(F, "train_step", real)
    F.finetune(ckpt, train, tmp_path / "killed", opts, heldout=held, progress=False)
    again = (tmp_path / "killed/loss.jsonl").read_text().splitlines()
    for a, b in zip(curve, again, strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert json.loads(curve[0])["loss"] != json.loads(curve[-1])["loss"]  # it trained

    loaded, start = InternVL.from_pretrained(whole), InternVL.from_pretrained(ckpt)
    assert not np.array_equal(flat(loaded.params["text"]), flat(start.params["text"]))
    assert cli_main(["export", str(whole), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf/config.json").exists()


def test_frozen_parts_and_bad_records(setup, tmp_path, capsys):
    root, ckpt, train, _ = setup
    lines = train.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["messages"] = bad["messages"][:1]  # no assistant turn
    missing = json.loads(lines[2])
    missing["messages"][0]["content"][0]["url"] = "images/nowhere.png"
    data = root / "data" / "mixed.jsonl"
    data.write_text("\n".join([lines[0], "{not json", json.dumps(bad), json.dumps(missing), *lines[3:]]) + "\n")
    out = tmp_path / "frozen"
    assert cli_main(["finetune", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "1",
                     "--batch-size", "4", "--freeze", "vision,projector", "--no-progress"]) == 0
    skipped = [json.loads(ln) for ln in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["where"] for s in skipped] == ["line 2", "line 3", "line 4"], skipped
    assert "no assistant turn" in skipped[1]["reason"] and "nowhere.png" in skipped[2]["reason"]
    start, tuned = InternVL.from_pretrained(ckpt), InternVL.from_pretrained(out / "model")
    for part, same in (("vision", True), ("projector", True), ("text", False)):
        assert np.array_equal(flat(start.params[part]), flat(tuned.params[part])) == same, part
    capsys.readouterr()
    assert cli_main(["finetune", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "strict"),
                     "--strict", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2" in err and "--strict" in err, err
    assert cli_main(["finetune", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "x"),
                     "--freeze", "vision,eyes"]) == 2
    assert "--freeze eyes" in capsys.readouterr().err
    # a warm-up as long as the run left the cosine decay no update (optax raised from inside the schedule)
    assert cli_main(["finetune", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "y"),
                     "--steps", "2", "--warmup", "2"]) == 2
    assert "warmup (--warmup) must be at least 0 and less than steps (2), got 2" in capsys.readouterr().err


@pytest.mark.slow  # two runs in fresh processes: about two minutes
def test_a_mesh_of_virtual_devices_gives_the_same_curve(setup, tmp_path):
    """The same two updates on one device and on a (data=2, tensor=4) mesh of 8 CPU devices (weights split by the
    rules table, rows over data): the same losses."""
    import os
    import subprocess
    import sys

    _, ckpt, train, _ = setup
    curves = []
    for name, mesh, flags in (("one", [], ""), ("mesh", ["--mesh", "data=2,tensor=4"],
                                                 "--xla_force_host_platform_device_count=8")):
        env = {**os.environ, "XLA_FLAGS": flags}
        subprocess.run([sys.executable, "-m", "internvl_jax.cli", "finetune", "--model", str(ckpt), "--data",
                        str(train), "--out", str(tmp_path / name), "--steps", "2", "--batch-size", "4", *mesh,
                        "--no-progress"], check=True, env=env, capture_output=True)
        curves.append([json.loads(ln)["loss"] for ln in (tmp_path / name / "loss.jsonl").read_text().splitlines()])
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)
