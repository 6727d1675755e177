"""The shapes model's recipe (internvl_jax/demo/shapes_model.py): its tokenizer makes each word of the task one
token, its initial checkpoint (patches of 28 px, 64 tokens a tile) gives transformers' logits, `internvl-jax eval`
scores a Shapes TSV with the task's profile, and the recipe gives the same bits when run twice."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from internvl_jax.demo import shapes
from internvl_jax.demo import shapes_model as M
from internvl_jax.demo.random_model import write_checkpoint
from internvl_jax.processing.processor import InternVLProcessor


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """The recipe's random initial checkpoint."""
    return write_checkpoint(tmp_path_factory.mktemp("shapes") / "init", M.config, M.INIT_SEED, force=False,
                            max_new_tokens=M.MAX_NEW_TOKENS, words=M.words())


def test_every_task_word_is_one_token(init):
    processor = InternVLProcessor.from_pretrained(init)
    questions, answers = shapes.vocabulary()
    for q in questions:
        ids = processor.tokenizer.encode_batch([q], False)[0]
        assert processor.decode(ids) == q and len(ids) <= 6, (q, ids)
    for a in answers:
        assert len(processor.tokenizer.encode_batch([a], False)[0]) == 1, a
    # text outside the task still round-trips, byte by byte
    text = "Colours? Ünïcode, 12345 and\nnew lines"
    assert processor.decode(processor.tokenizer.encode_batch([text], False)[0]) == text


def test_initial_checkpoint_matches_transformers(init, tmp_path):
    """The recipe's shape (28 px patches, 64 image tokens a tile, the word tokenizer) loads in transformers and
    gives the same logits on a shapes question."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax

    import internvl_jax

    jsonl = shapes.write(tmp_path, 2, 7, name="q", questions=3)
    processor = InternVLProcessor.from_pretrained(init)
    conversation = [json.loads(line) for line in jsonl.read_text().splitlines()][0]["messages"]
    conversation[0]["content"][0]["url"] = str(tmp_path / conversation[0]["content"][0]["url"])
    x = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert (x["input_ids"] == processor.image_token_ids[0]).sum() == 64
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(internvl_jax.InternVL.from_pretrained(init)(x["input_ids"], x["pixel_values"],
                                                                     x["attention_mask"]))
    hf = transformers.InternVLForConditionalGeneration.from_pretrained(init, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(x["input_ids"]), pixel_values=torch.from_numpy(x["pixel_values"]),
                    attention_mask=torch.from_numpy(x["attention_mask"])).logits.numpy()
    np.testing.assert_allclose(ours[..., : theirs.shape[-1]], theirs, atol=2e-5, rtol=0)


def test_eval_scores_a_shapes_tsv_with_the_task_profile(init, tmp_path):
    """A file named Shapes*.tsv is asked as trained (the bare question, no system message) and scored by exact
    match; `heldout_accuracy` (the build's report) gives the same share on the same questions."""
    from internvl_jax.cli import main

    # The held-out set's first 12 pictures (the set is drawn picture by picture from its seed, as
    # heldout_accuracy(n=12) below draws it too).
    small = shapes.write(tmp_path, 12, M.HELDOUT["seed"], name="Shapes_small").with_suffix(".tsv")
    out = tmp_path / "eval"
    assert main(["eval", str(small), "--model", str(init), "--output", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["name"] == "Shapes" and summary["dataset"]["system"] is None
    assert summary["dataset"]["prompt"] == "bare" and summary["records"] == 12 and summary["failed"] == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and all(p["answer"] in shapes.vocabulary()[1] for p in preds)
    share = np.mean([p["exact_match"] for p in preds])
    assert summary["open"]["exact_match"]["accuracy"] == pytest.approx(share)
    assert M.heldout_accuracy(str(init), n=12) == pytest.approx(share)


@pytest.mark.slow  # two short fine-tuning runs and exports: about a minute and a half
def test_the_recipe_gives_the_same_bits_twice(tmp_path):
    """The build's pieces are deterministic: the initial checkpoint, the pictures and two updates of the
    fine-tuning run, made twice, are the same bytes (a whole rebuild: python -m internvl_jax.demo.shapes_model)."""
    from internvl_jax.training.finetune import finetune

    opts = dataclasses.replace(M.OPTIONS, steps=2, warmup=1, save_every=2)
    results = []
    for k in range(2):
        init = write_checkpoint(tmp_path / f"init{k}", M.config, M.INIT_SEED, force=False, max_new_tokens=8,
                                words=M.words())
        train = shapes.write(tmp_path / f"data{k}", 16, M.TRAIN["seed"], name="train", questions=M.TRAIN["questions"])
        results.append((init, train, finetune(init, train, tmp_path / f"run{k}", opts, progress=False)))
    (i0, t0, m0), (i1, t1, m1) = results
    assert M.digests(i0) == M.digests(i1)
    assert t0.read_bytes() == t1.read_bytes()
    assert (t0.parent / "images/train-00007.png").read_bytes() == (t1.parent / "images/train-00007.png").read_bytes()
    # what the build ships: the run's result exported to the -hf layout (the converted directory's own chunk
    # files are named at random by tensorstore)
    from internvl_jax.export import export_converted

    h0, h1 = export_converted(m0, tmp_path / "hf0"), export_converted(m1, tmp_path / "hf1")
    assert M.digests(h0) == M.digests(h1) and "model.safetensors" in M.digests(h0)
    import internvl_jax

    before = internvl_jax.InternVL.from_pretrained(i0).params["vision"]["embeddings"]["patch_kernel"]
    after = internvl_jax.InternVL.from_pretrained(m0).params["vision"]["embeddings"]["patch_kernel"]
    assert not np.array_equal(np.asarray(before), np.asarray(after))  # two updates did train


def test_a_smaller_tile_is_what_the_processor_cuts(tmp_path):
    """`write_checkpoint` writes the processor files for the tower's image_size (the trials' 112 px tiles):
    a 448 px picture becomes one 112 px tile of 16 image tokens (14 px patches, pixel shuffle 0.5)."""
    def small(image_token_id: int, vocab_size: int):
        base = M.config(image_token_id, vocab_size)
        return dataclasses.replace(base, vision=dataclasses.replace(base.vision, image_size=112, patch_size=14))

    init = write_checkpoint(tmp_path / "init", small, M.INIT_SEED, force=False, max_new_tokens=4, words=M.words(),
                            max_patches=1)
    jsonl = shapes.write(tmp_path, 1, 7, name="q")
    conversation = json.loads(jsonl.read_text())["messages"][:1]
    conversation[0]["content"][0]["url"] = str(tmp_path / conversation[0]["content"][0]["url"])
    x = InternVLProcessor.from_pretrained(init).apply_chat_template(conversation, add_generation_prompt=True,
                                                                     tokenize=True, return_dict=True)
    assert x["pixel_values"].shape == (1, 3, 112, 112)
    assert (x["input_ids"] == InternVLProcessor.from_pretrained(init).image_token_ids[0]).sum() == 16


def test_fan_in_scaled_gives_each_kernel_one_over_root_fan_in():
    """The trials' initial weights (`--init fan-in[-pos|-grid]`): q/k/v read the width, o reads heads x head_dim,
    the MLPs and the projector their first axis after the layer axis, the patch embedding 3 x 28 x 28 pixels."""
    from internvl_jax import weights as W
    from internvl_jax.model.params import random_params

    cfg = M.config(5, 300)
    before = W.flatten_paths(random_params(cfg))
    for positions in (None, "random", "grid"):
        after = W.flatten_paths(M.fan_in_scaled(random_params(cfg), positions=positions))
        t, v = cfg.text, cfg.vision
        want = {"text/layers/q/kernel": t.hidden_size, "text/layers/o/kernel": t.num_heads * t.head_dim,
                "text/layers/down/kernel": t.intermediate_size, "vision/layers/k/kernel": v.hidden_size,
                "vision/layers/fc2/kernel": v.intermediate_size, "projector/fc1/kernel": 4 * v.hidden_size,
                "vision/embeddings/patch_kernel": 3 * v.patch_size ** 2, "text/lm_head": t.hidden_size}
        for path, fan_in in want.items():
            assert np.std(after[path]) == pytest.approx(fan_in ** -0.5, rel=0.1), path
        assert np.std(after["text/embedding"]) == pytest.approx(1.0, rel=0.1)
        pos = after["vision/embeddings/position_embedding"]
        assert np.std(pos[1:]) == pytest.approx(1.0 if positions else 0.02, rel=0.1)
        if positions == "grid":  # neighbours alike, far patches not; the class token's row zero
            grid = v.image_size // v.patch_size
            near, far = (np.corrcoef(pos[1 + 5 * grid + 5], pos[1 + j])[0, 1] for j in (5 * grid + 6, 15 * grid))
            assert near > 0.3 > far, (near, far)
            np.testing.assert_array_equal(pos[0], 0)
        for path in ("text/layers/attn_norm/scale", "vision/layers/ls1", "vision/layers/q/bias"):
            np.testing.assert_array_equal(after[path], before[path])


def test_trials_keep_the_asked_kinds_and_can_put_the_question_first(init, tmp_path):
    """benchmarks/shapes_trials.py `only`: the turns of the given kinds, in order, the picture with the first one
    kept (before its text, or after it with `question_first`), the first kept turn's answer and kind on the record;
    a record left without a turn is dropped. And the held-out accuracy's prompt finds the picture either way."""
    from benchmarks.shapes_trials import only

    jsonl = shapes.write(tmp_path, 40, 3, name="p", questions=10)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for question_first in (False, True):
        kept = [json.loads(line) for line in only(jsonl, "shape+count", question_first).read_text().splitlines()]
        want = [r for r in records if {"shape", "count"} & set(r["kinds"])]
        assert [r["id"] for r in kept] == [r["id"] for r in want]
        for r, w in zip(kept, want, strict=True):
            turns = [(u, a) for u, a, k in zip(w["messages"][::2], w["messages"][1::2], w["kinds"], strict=True)
                     if k in ("shape", "count")]
            assert r["kinds"] == [k for k in w["kinds"] if k in ("shape", "count")]
            def texts(messages):
                return [c["text"] for m in messages for c in m["content"] if c["type"] == "text"]

            assert texts(r["messages"]) == texts(m for t in turns for m in t)
            assert r["answer"] == r["messages"][1]["content"][0]["text"] and r["kind"] == r["kinds"][0]
            first = [c["type"] for c in r["messages"][0]["content"]]
            assert first == (["text", "image"] if question_first else ["image", "text"])
            assert all(c["type"] == "text" for m in r["messages"][1:] for c in m["content"])
        processor = InternVLProcessor.from_pretrained(init)
        x = M.first_question(processor, kept[0], jsonl.parent)
        ids = list(x["input_ids"][0])
        before = processor.decode(ids[:ids.index(processor.start_image_token_id)])
        question = kept[0]["messages"][0]["content"][0 if question_first else 1]["text"]
        assert (question in before) == question_first, before
        assert x["pixel_values"].shape == (1, 3, shapes.SIZE, shapes.SIZE)
