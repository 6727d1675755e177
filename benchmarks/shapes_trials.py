"""Trials of the shapes recipe (docs/finetune.md, the table of runs): variants of `demo/shapes_model.py`, each a
`finetune` run from random weights, scored per question kind on held-out pictures.

    python benchmarks/shapes_trials.py WORK tiles --tile 112 --patch 14 --lr 3e-4 --steps 800 --pictures 6400
    python benchmarks/shapes_trials.py WORK curriculum --max-shapes 1 --steps 300 --then 500
    python benchmarks/shapes_trials.py WORK probe RUN/model   # does the colour answer move with the picture?
    python benchmarks/shapes_trials.py WORK shapes RUN/model  # its shape answers: confusion, by side and count
    python benchmarks/shapes_trials.py WORK edges RUN/model   # do the tokens over a shape's edge tell its kind?
    python benchmarks/shapes_trials.py WORK bind RUN/model    # does the answer follow the colour asked?
    python benchmarks/shapes_trials.py WORK colours RUN/model # do the image tokens still carry colour?
    python benchmarks/shapes_trials.py WORK tiles --tile 112 --patch 14 --lr 1e-3 --steps 300 --questions 1 \
        --batch 32 --max-shapes 1 --only colour [--layer-scale 1]   # one shape, colour questions only
    python benchmarks/shapes_trials.py WORK squares --side 0.25 --tile 112 --patch 14 --steps 200
    python benchmarks/shapes_trials.py WORK curriculum --tile 112 --patch 14 --questions 1 --batch 32 --lr 1e-3 \
        --layer-scale 1 --steps 300 --then 1200   # one-shape pictures (learnt at layer scale 1), then the task's
    python benchmarks/shapes_trials.py WORK tiles --lr 5e-4 --steps 2400 --questions 4 --batch 8 --layer-scale 1 \
        --init fan-in   # 448 px tiles, kernels of std 1/sqrt(fan in): the best so far (69%)
    python benchmarks/shapes_trials.py WORK tiles --lr 1e-3 --steps 600 --questions 1 --batch 16 --max-shapes 1 \
        --only shape --layer-scale 1 --init fan-in   # naming one shape at 448 px: 97%; then --start RUN/model

WORK keeps the pictures and runs (a trial started again resumes its run). The held-out pictures are the
recipe's (`HELDOUT`); training pictures use other seeds than the recipe's.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from internvl_jax.config import InternVLConfig
from internvl_jax.demo import shapes
from internvl_jax.demo import shapes_model as M


def answers(model_dir: Path, records: list[dict], root: Path) -> list[str]:
    """A model's greedy answers to the records' first questions (pictures relative to `root`)."""
    import internvl_jax

    model = internvl_jax.InternVL.from_pretrained(model_dir)
    processor = internvl_jax.InternVLProcessor.from_pretrained(model_dir)
    prompts = []
    for r in records:
        x = M.first_question(processor, r, root)
        prompts.append({"input_ids": x["input_ids"], "pixel_values": x["pixel_values"]})
    outs = model.generate_many(prompts, max_new_tokens=3)
    return [processor.decode(o[p["input_ids"].shape[1]:], skip_special_tokens=True)
            for o, p in zip(outs, prompts, strict=True)]


def accuracy(model_dir: Path, jsonl: Path, n: int = 300) -> tuple[float, dict[str, str]]:
    """Greedy answers to the first `n` records' first question: (share right, right/asked per question kind)."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines()][:n]
    asked, right = collections.Counter(), collections.Counter()
    for said, r in zip(answers(model_dir, records, jsonl.parent), records, strict=True):
        asked[r["kind"]] += 1
        right[r["kind"]] += said == r["answer"]
    return sum(right.values()) / len(records), {k: f"{right[k]}/{asked[k]}" for k in asked}


def heldout(work: Path) -> Path:
    return shapes.write(work / "heldout", M.HELDOUT["n"], M.HELDOUT["seed"], name="heldout")


def pictures(work: Path, n: int, seed: int, max_shapes: int = 4, questions: int = M.TRAIN["questions"]) -> Path:
    """`n` pictures of at most `max_shapes` shapes with up to `questions` questions each (made once in WORK)."""
    name = f"pictures-{n}-{seed}-{max_shapes}-{questions}"
    if (work / name / f"{name}.jsonl").is_file():
        return work / name / f"{name}.jsonl"
    return shapes.write(work / name, n, seed, name=name, questions=questions, max_shapes=max_shapes)


def only(jsonl: Path, kinds: str, question_first: bool = False) -> Path:
    """`jsonl` with only the questions (turns) of `kinds` ("shape", "shape+colour"; "all": every one), next to it:
    the picture goes with the first question kept, a record left without any is dropped. `question_first`: the
    picture after the first question's text instead of before it, so that its tokens can attend to the question."""
    if kinds == "all" and not question_first:
        return jsonl
    keep = kinds.split("+")
    lines = []
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        image = next(c for c in r["messages"][0]["content"] if c["type"] == "image")
        turns = [(u, a, k) for u, a, k in zip(r["messages"][::2], r["messages"][1::2], r["kinds"], strict=True)
                 if kinds == "all" or k in keep]
        if turns:
            turns = [({**u, "content": [c for c in u["content"] if c["type"] != "image"]}, a, k) for u, a, k in turns]
            turns[0][0]["content"].insert(len(turns[0][0]["content"]) if question_first else 0, image)
            lines.append(json.dumps({**r, "messages": [m for u, a, _ in turns for m in (u, a)], "kinds": [k for *_, k
                                     in turns], "answer": turns[0][1]["content"][0]["text"], "kind": turns[0][2]}))
    out = jsonl.with_name(f"{jsonl.stem}-only-{kinds}{'-qfirst' if question_first else ''}.jsonl")
    out.write_text("".join(ln + "\n" for ln in lines))
    return out


def at_least(jsonl: Path, n: int, seed: int, max_shapes: int, questions: int, least: int) -> Path:
    """The records of `jsonl` (written by `pictures(work, n, seed, max_shapes, questions)`, perhaps filtered by
    `only`) whose picture holds at least `least` shapes: the scenes are drawn again from the seed."""
    count = {i: len(q[0].scene.shapes) for i, q in enumerate(shapes.quizzes(n, seed, questions, max_shapes))}
    lines = [ln for ln in jsonl.read_text().splitlines() if count[json.loads(ln)["id"]] >= least]
    out = jsonl.with_name(f"{jsonl.stem}-{least}up.jsonl")
    out.write_text("".join(ln + "\n" for ln in lines))
    return out


def fresh_decoder(model_dir: Path, init: Path) -> Path:
    """The initial checkpoint `init` (its random decoder, perhaps of other heads or layers) with the tower and
    projector of the trained `model_dir`, next to `model_dir`: a trained tower under a decoder that has learnt
    nothing yet."""
    from internvl_jax.modeling import InternVL
    from internvl_jax.training.finetune import save

    out = model_dir.parent / f"fresh-decoder-{init.name}"
    if not (out / "config.json").is_file():
        model, trained = (InternVL.from_pretrained(d, dtype="float32") for d in (init, model_dir))
        model.params = {**trained.params, "text": model.params["text"]}
        save(model, init, out)
    return out


PICTURES = 6400  # training pictures of a `tiles` trial (runs with another number are named by it)
# InternViT's layer_scale_init_value in the recipe (transformers' default): the trials name other values.
RECIPE = M.config(0, 1)  # the recipe's widths: the trials' defaults
LAYER_SCALE = RECIPE.vision.layer_scale_init_value


def suffix(args: argparse.Namespace) -> str:
    """The part of a run's (and its initial checkpoint's) name that names the initial weights' variant."""
    v = RECIPE.vision
    return (("" if args.layer_scale == LAYER_SCALE else f"-ls{args.layer_scale:g}")
            + ("" if args.init == "normal" else f"-{args.init}")
            + ("" if (args.width, args.layers) == (v.hidden_size, v.num_layers) else f"-v{args.width}x{args.layers}")
            + ("" if args.text_width == RECIPE.text.hidden_size else f"-t{args.text_width}")
            + ("" if (args.text_heads, args.text_layers) == (0, RECIPE.text.num_layers) else
               f"-h{args.text_heads}x{args.text_layers}")
            + ("" if not args.recency else f"-r{args.recency:g}"))


def initial(work: Path, args: argparse.Namespace) -> Path:
    """The recipe's random initial checkpoint with tiles of `args.tile` px cut in `args.patch` px patches (one
    tile a picture when the tile is not the picture's 448), InternViT's layer scale starting at
    `args.layer_scale`, a tower `args.width` wide and `args.layers` deep, a decoder `args.text_width` wide, and
    `args.init` "fan-in" / "fan-in-pos" / "fan-in-grid": `shapes_model.fan_in_scaled` weights."""
    from internvl_jax.demo.random_model import write_checkpoint

    def config(image_token_id: int, vocab_size: int) -> InternVLConfig:
        base = M.config(image_token_id, vocab_size)
        heads = args.text_heads or args.text_width // base.text.head_dim
        text = dataclasses.replace(base.text, hidden_size=args.text_width, num_heads=heads,
                                   num_kv_heads=heads // 2, head_dim=args.text_width // heads,
                                   intermediate_size=3 * args.text_width, num_layers=args.text_layers)
        return dataclasses.replace(base, text=text, vision=dataclasses.replace(
            base.vision, image_size=args.tile, patch_size=args.patch, layer_scale_init_value=args.layer_scale,
            hidden_size=args.width, num_layers=args.layers, intermediate_size=4 * args.width,
            num_heads=args.width // 24))

    out = work / f"init-{args.tile}-{args.patch}{suffix(args)}"
    if not (out / "config.json").is_file():
        write_checkpoint(out, config, M.INIT_SEED, force=True, max_new_tokens=M.MAX_NEW_TOKENS, words=M.words(),
                         max_patches=1 if args.tile != shapes.SIZE else 12,
                         adjust=None if args.init == "normal" else functools.partial(
                             M.fan_in_scaled, tied_qk=args.init == "fan-in-qk", recency=args.recency,
                             positions={"fan-in": None, "fan-in-qk": None, "fan-in-pos": "random",
                                        "fan-in-grid": "grid"}[args.init]))
    return out


def run(init: Path, train: Path, out: Path, steps: int, lr: float, held: Path, batch: int = M.OPTIONS.batch_size,
        seed: int = M.OPTIONS.seed, freeze: tuple[str, ...] = ()) -> Path:
    from internvl_jax.training.finetune import finetune

    opts = dataclasses.replace(M.OPTIONS, steps=steps, learning_rate=lr, save_every=200, warmup=min(50, steps - 1),
                               batch_size=batch, seed=seed, freeze=freeze)
    return finetune(init, train, out, opts, heldout=held, progress=False)


def squares(work: Path, n: int, seed: int, side: float) -> Path:
    """`n` pictures of one square of a task colour, `side` x 448 px, at a random place on white, each asked
    "What colour is the square?": how large must a thing be for the recipe to find it?"""
    from PIL import Image

    out = work / f"squares-{side:g}-{n}-{seed}"
    jsonl = out / f"{out.name}.jsonl"
    if jsonl.is_file():
        return jsonl
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng, px, lines = np.random.default_rng(seed), round(side * shapes.SIZE), []
    for i in range(n):
        colour = list(shapes.COLOURS)[int(rng.integers(len(shapes.COLOURS)))]
        x, y = (int(v) for v in rng.integers(0, shapes.SIZE - px + 1, 2))
        picture = Image.new("RGB", (shapes.SIZE, shapes.SIZE), shapes.GROUNDS[0])
        picture.paste(shapes.COLOURS[colour], (x, y, x + px, y + px))
        picture.save(out / "images" / f"{i:05d}.png")
        user = [{"type": "image", "url": f"images/{i:05d}.png"}, {"type": "text", "text": "What colour is the square?"}]
        answer = [{"type": "text", "text": colour}]
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"id": i, "messages": turns, "answer": colour, "kind": "colour"}))
    jsonl.write_text("".join(ln + "\n" for ln in lines))
    return jsonl


def probe(model_dir: Path, work: Path) -> None:
    """The probabilities of the six colours answering one "What colour is the ...?" asked of six one-shape
    pictures: a model that reads the picture moves them with it."""
    import internvl_jax

    model = internvl_jax.InternVL.from_pretrained(model_dir)
    processor = internvl_jax.InternVLProcessor.from_pretrained(model_dir)
    jsonl = pictures(work, 300, 12, 1, questions=1)  # the curriculum's held-out pictures of one shape
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    records = [r for r in records if r["messages"][0]["content"][1]["text"].startswith("What colour")][:6]
    rows = []
    for r in records:
        rows.append(M.first_question(processor, r, jsonl.parent))
    ids = rows[0]["input_ids"]  # one question for every picture
    colours = list(shapes.COLOURS)
    tokens = [processor.tokenizer.encode_batch([c], False)[0][0] for c in colours]
    for r, x in zip(records, rows, strict=True):
        logits = np.asarray(model(ids, x["pixel_values"], np.ones_like(ids)))[0, -1]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        print(f"picture's colour {r['messages'][1]['content'][0]['text']:<7}",
              " ".join(f"{c} {p[t]:.3f}" for c, t in zip(colours, tokens, strict=True)))
    a, b = (np.asarray(model.get_image_features(x["pixel_values"])) for x in rows[:2])
    print(f"image features: std {a.std():.3f}, std of two pictures' difference {(a - b).std():.3f}")


def shape_answers(model_dir: Path, work: Path, n: int = 120) -> None:
    """What a model answers to the held-out set's first `n` "What shape is {colour}?" questions: the confusion of
    kinds, and the share right by the shape's side and by the number of shapes in the picture."""
    jsonl = heldout(work)
    records = [r for r in map(json.loads, jsonl.read_text().splitlines()) if r["kind"] == "shape"][:n]
    scenes = [q[0].scene for q in shapes.quizzes(M.HELDOUT["n"], M.HELDOUT["seed"], 1)]  # what `heldout` drew
    confusion, by_side, by_count = collections.Counter(), collections.defaultdict(list), collections.defaultdict(list)
    for said, r in zip(answers(model_dir, records, jsonl.parent), records, strict=True):
        colour = r["messages"][0]["content"][1]["text"].removeprefix("What shape is ").removesuffix("?")
        sc = scenes[r["id"]]
        confusion[r["answer"], said] += 1
        by_side[next(s.side for s in sc.shapes if s.colour == colour) // 20 * 20].append(said == r["answer"])
        by_count[len(sc.shapes)].append(said == r["answer"])
    print("asked -> answered:", ", ".join(f"{a} -> {b}: {c}" for (a, b), c in sorted(confusion.items())))
    for name, table in (("side from", by_side), ("shapes in the picture", by_count)):
        print(f"right by {name}:", ", ".join(f"{k}: {np.mean(v):.2f} of {len(v)}" for k, v in sorted(table.items())))


def tokens_over(model: Any, processor: Any, sc: shapes.Scene) -> tuple[np.ndarray, np.ndarray]:
    """The image tokens the decoder reads for the scene's picture [tokens, width], and the share of each token's
    cell that each shape covers [shapes, tokens] (each shape drawn alone)."""
    x = processor(text=processor.image_token, images=[shapes.draw(sc)])
    f = np.asarray(model.get_image_features(x["pixel_values"]))[0]
    side = math.isqrt(f.shape[0])
    cell = shapes.SIZE // side
    masks = [(np.asarray(shapes.draw(shapes.Scene(sc.ground, (s,)))) != np.array(sc.ground)).any(-1)
             for s in sc.shapes]
    return f, np.array([m.reshape(side, cell, side, cell).mean((1, 3)).reshape(-1) for m in masks])


def edges(model_dir: Path, n: int = 800, max_shapes: int = 1) -> None:
    """A linear probe of the image tokens the decoder reads: on `n` fresh pictures of 1 to `max_shapes` shapes, the
    tokens whose cell one shape covers in part (10-90%: its edges and corners) and no other touches, each labelled
    with that shape's kind; ridge regression fitted on the tokens of the first three quarters of the pictures,
    scored on the rest (per token, and per shape by the mean of its tokens' scores). Chance is a third: can a
    token tell what its edge belongs to? With several shapes a picture, only features of the token's own shape
    (not of the picture's shapes together) tell it."""
    import internvl_jax

    model = internvl_jax.InternVL.from_pretrained(model_dir)
    processor = internvl_jax.InternVLProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(5)
    feats, kinds, picture, shape_id = [], [], [], []
    for sc_i in range(n):
        sc = shapes.scene(rng, max_shapes)
        f, covers = tokens_over(model, processor, sc)
        for j, s in enumerate(sc.shapes):
            others = np.delete(covers, j, axis=0).sum(0)
            for t in np.nonzero((covers[j] > 0.1) & (covers[j] < 0.9) & (others == 0))[0]:
                feats.append(f[t]), kinds.append(shapes.KINDS.index(s.kind))
                picture.append(sc_i), shape_id.append(sc_i * len(shapes.COLOURS) + j)  # j < colours a picture
    x, y, picture, shape_id = np.array(feats), np.array(kinds), np.array(picture), np.array(shape_id)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    fit = picture < n * 3 // 4
    w = np.linalg.solve(x[fit].T @ x[fit] + 10.0 * np.eye(x.shape[1]), x[fit].T @ np.eye(3)[y[fit]])
    score = x @ w
    held = sorted(set(shape_id[~fit]))
    per_shape = np.mean([score[shape_id == i].mean(0).argmax() == y[shape_id == i][0] for i in held])
    right = score.argmax(1) == y
    print(f"edge tokens' kind, linear probe, pictures of 1-{max_shapes} shapes: fitted tokens {right[fit].mean():.2f}, "
          f"held-out tokens {right[~fit].mean():.2f}, held-out shapes {per_shape:.2f} ({fit.sum()} / {(~fit).sum()} "
          "tokens)")


def bind(model_dir: Path, pairs: int = 60) -> None:
    """Does the answer follow the colour asked? `pairs` fresh pictures of two shapes of different kinds, "What shape
    is {colour}?" asked of each colour: a model that finds the shape of the colour asked answers the two
    differently; one that names the picture's most salient shape answers them alike, right half the time."""
    import internvl_jax

    model = internvl_jax.InternVL.from_pretrained(model_dir)
    processor = internvl_jax.InternVLProcessor.from_pretrained(model_dir)
    rng, prompts, kinds = np.random.default_rng(7), [], []
    while len(kinds) < 2 * pairs:
        sc = shapes.scene(rng)
        if len(sc.shapes) != 2 or sc.shapes[0].kind == sc.shapes[1].kind:
            continue
        picture = shapes.draw(sc)
        for s in sc.shapes:
            user = [{"role": "user", "content": [{"type": "image", "image": picture},
                                                 {"type": "text", "text": f"What shape is {s.colour}?"}]}]
            x = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)
            prompts.append({"input_ids": x["input_ids"], "pixel_values": x["pixel_values"]})
            kinds.append(s.kind)
    outs = model.generate_many(prompts, max_new_tokens=3)
    said = [processor.decode(o[p["input_ids"].shape[1]:], skip_special_tokens=True)
            for o, p in zip(outs, prompts, strict=True)]
    right = [a == k for a, k in zip(said, kinds, strict=True)]
    print(f"two shapes of different kinds, each colour asked ({pairs} pictures): right {np.mean(right):.2f}, "
          f"the two answers differ {np.mean([said[i] != said[i + 1] for i in range(0, len(said), 2)]):.2f}, "
          f"both right {np.mean([right[i] and right[i + 1] for i in range(0, len(said), 2)]):.2f}")


def colours(model_dir: Path, n: int = 300) -> None:
    """Do the image tokens still carry their shape's colour? On `n` fresh pictures of 1-4 shapes, the tokens whose
    cell a shape covers at least half: the share of their variance that their shape's colour explains (and its
    kind, for scale), and a linear probe for the colour (ridge regression fitted on the first three quarters of the
    pictures' tokens, scored on the rest; chance is a sixth). A probe standardises every feature, so it finds a
    colour that is a sliver of the tokens' variance; attention, which looks a colour up by a dot product, is
    helped by the share."""
    import internvl_jax

    model = internvl_jax.InternVL.from_pretrained(model_dir)
    processor = internvl_jax.InternVLProcessor.from_pretrained(model_dir)
    rng, names = np.random.default_rng(5), list(shapes.COLOURS)
    feats, labels, kinds, picture = [], [], [], []
    for i in range(n):
        sc = shapes.scene(rng)
        f, covers = tokens_over(model, processor, sc)
        for s, cover in zip(sc.shapes, covers, strict=True):
            for t in np.nonzero(cover >= 0.5)[0]:
                feats.append(f[t]), labels.append(names.index(s.colour)), picture.append(i)
                kinds.append(shapes.KINDS.index(s.kind))
    x, y, kind, picture = np.array(feats), np.array(labels), np.array(kinds), np.array(picture)
    centred = x - x.mean(0)

    def share(label: np.ndarray) -> float:  # between-class variance / total variance
        return sum((label == c).sum() * np.sum(centred[label == c].mean(0) ** 2) for c in set(label)) / np.sum(
            centred**2)

    x = centred / (x.std(0) + 1e-6)
    fit = picture < n * 3 // 4
    w = np.linalg.solve(x[fit].T @ x[fit] + 10.0 * np.eye(x.shape[1]), x[fit].T @ np.eye(len(names))[y[fit]])
    print(f"image tokens over a shape ({len(y)}): variance from its colour {share(y):.2f}, from its kind "
          f"{share(kind):.2f}; colour probe, held-out tokens {np.mean((x[~fit] @ w).argmax(1) == y[~fit]):.2f}")


def model_options(parser: argparse.ArgumentParser, tile: int, patch: int) -> None:
    """The initial checkpoint's variant: tile and patch size, where InternViT's layer scale starts, the tower's and
    the decoder's widths, and the initial weights' scale."""
    parser.add_argument("--tile", type=int, default=tile)
    parser.add_argument("--patch", type=int, default=patch)
    parser.add_argument("--layer-scale", type=float, default=LAYER_SCALE, help="InternViT's layer_scale_init_value")
    parser.add_argument("--width", type=int, default=RECIPE.vision.hidden_size, help="the tower's width (heads of 24)")
    parser.add_argument("--layers", type=int, default=RECIPE.vision.num_layers, help="the tower's layers")
    parser.add_argument("--text-width", type=int, default=RECIPE.text.hidden_size,
                        help="the decoder's width (heads of 32, half as many key/value heads, MLP 3x)")
    parser.add_argument("--text-heads", type=int, default=0, help="the decoder's heads (default: width / 32)")
    parser.add_argument("--text-layers", type=int, default=RECIPE.text.num_layers, help="the decoder's layers")
    parser.add_argument("--recency", type=float, default=0.0, help="with a fan-in init: the decoder's first layer "
                        "attends to recent tokens at the start (shapes_model.fan_in_scaled)")
    parser.add_argument("--init", default="normal",
                        choices=["normal", "fan-in", "fan-in-qk", "fan-in-pos", "fan-in-grid"],
                        help="kernels of standard deviation 0.02 or 1/sqrt(fan in) (shapes_model.fan_in_scaled), "
                             "fan-in-pos: and the tower's position embedding's 1, "
                             "fan-in-grid: and a 2-D sine grid for it, "
                             "fan-in-qk: and the tower's key kernels equal to its query kernels")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    sub = p.add_subparsers(dest="trial", required=True)
    t = sub.add_parser("tiles", help="the recipe with another tile and patch size")
    model_options(t, shapes.SIZE, 28)
    t.add_argument("--lr", type=float, default=M.OPTIONS.learning_rate)
    t.add_argument("--steps", type=int, default=800)
    t.add_argument("--pictures", type=int, default=PICTURES)
    t.add_argument("--questions", type=int, default=M.TRAIN["questions"],
                   help="questions a training picture (turns of its conversation)")
    t.add_argument("--batch", type=int, default=M.OPTIONS.batch_size)
    t.add_argument("--max-shapes", type=int, default=4)
    t.add_argument("--only", default="all", help="train and score on the questions of these kinds only "
                   f"(+ between kinds: shape+colour; of {', '.join(shapes.QUESTION_KINDS)})")
    t.add_argument("--question-first", action="store_true", help="the picture after the first question, not "
                   "before it (training and held-out)")
    t.add_argument("--start", type=Path, help="train on from this model (another trial's RUN/model) instead of the "
                   "initial weights: a curriculum's second stage")
    t.add_argument("--seed", type=int, default=M.OPTIONS.seed, help="the data order: a stage that goes on from "
                   "another with the same seed sees the same pictures first again")
    t.add_argument("--min-shapes", type=int, default=1, help="train on the pictures of at least this many shapes")
    t.add_argument("--freeze", default="", help="parts left as they are (finetune's --freeze: vision,projector)")
    t.add_argument("--fresh-decoder", action="store_true", help="with --start: its decoder replaced by the initial "
                   "random one")
    q = sub.add_parser("squares", help="one square of one colour, larger or smaller: is it found?")
    q.add_argument("--side", type=float, default=0.25, help="the square's side, a fraction of the picture's")
    model_options(q, 112, 14)
    q.add_argument("--steps", type=int, default=200)
    q.add_argument("--lr", type=float, default=1e-3)
    c = sub.add_parser("curriculum", help="pictures of few shapes first, then the task's")
    c.add_argument("--max-shapes", type=int, default=1)
    c.add_argument("--steps", type=int, default=300)
    c.add_argument("--then", type=int, default=500, help="updates on the task's pictures after the first stage")
    c.add_argument("--lr", type=float, default=M.OPTIONS.learning_rate)
    model_options(c, shapes.SIZE, 28)
    c.add_argument("--questions", type=int, default=M.TRAIN["questions"], help="questions a training picture")
    c.add_argument("--batch", type=int, default=M.OPTIONS.batch_size)
    b = sub.add_parser("probe", help="do a model's colour answers move with the picture?")
    b.add_argument("model", type=Path)
    a = sub.add_parser("shapes", help="a model's answers to shape questions (confusion, by side and by count)")
    a.add_argument("model", type=Path)
    e = sub.add_parser("edges", help="linear probe: do the image tokens over a shape's edge tell its kind?")
    e.add_argument("model", type=Path)
    e.add_argument("--max-shapes", type=int, default=1, help="shapes a picture: 1 to this many")
    for name, what in (("bind", "does the answer follow the colour asked? (two shapes, each colour asked)"),
                       ("colours", "linear probe: do the image tokens still carry their shape's colour?")):
        sub.add_parser(name, help=what).add_argument("model", type=Path)
    args = p.parse_args()
    if args.trial == "tiles" and args.only != "all" and not set(args.only.split("+")) <= set(shapes.QUESTION_KINDS):
        p.error(f"--only {args.only}: kinds are {', '.join(shapes.QUESTION_KINDS)} (or all), joined by +")
    work = args.work
    if args.trial == "probe":
        return probe(args.model, work)
    if args.trial == "shapes":
        return shape_answers(args.model, work)
    if args.trial == "edges":
        return edges(args.model, max_shapes=args.max_shapes)
    if args.trial in ("bind", "colours"):
        return {"bind": bind, "colours": colours}[args.trial](args.model)
    if args.trial == "squares":
        train, held = squares(work, 3200, 1, args.side), squares(work, 200, 2, args.side)
        out = work / f"squares-{args.side:g}-{args.tile}-{args.patch}-{args.lr:g}-{args.steps}{suffix(args)}"
        init = initial(work, args)
        model = run(init, train, out, args.steps, args.lr, held, batch=32)
        print(args.steps, "updates:", *accuracy(model, held, n=200))
        return None
    held = heldout(work)
    if args.trial == "tiles":
        out = work / (f"tiles-{args.tile}-{args.patch}-{args.lr:g}-q{args.questions}-b{args.batch}"
                      + ("" if args.max_shapes == 4 and args.only == "all" else f"-s{args.max_shapes}-{args.only}")
                      + ("" if args.pictures == PICTURES else f"-p{args.pictures}") + suffix(args)
                      + ("-qfirst" if args.question_first else "")
                      + ("" if args.seed == M.OPTIONS.seed else f"-seed{args.seed}")
                      + ("" if args.min_shapes == 1 else f"-{args.min_shapes}up")
                      + ("" if not args.freeze else f"-frozen-{args.freeze.replace(',', '+')}")
                      + ("" if args.start is None else
                         f"-from-{'fresh-decoder-' if args.fresh_decoder else ''}{args.start.parent.name}"))
        train = only(pictures(work, args.pictures, 11, args.max_shapes, args.questions), args.only,
                     args.question_first)
        if args.min_shapes > 1:
            train = at_least(train, args.pictures, 11, args.max_shapes, args.questions, args.min_shapes)
        if args.max_shapes != 4 or args.only != "all" or args.question_first:  # held out: pictures of the same kind
            held = only(pictures(work, 300, 12, args.max_shapes, questions=1), args.only, args.question_first)
        init = initial(work, args) if args.start is None else args.start
        if args.fresh_decoder:
            if args.start is None:
                p.error("--fresh-decoder goes with --start")
            init = fresh_decoder(args.start, initial(work, args))
        model = run(init, train, out, args.steps, args.lr, held, args.batch, args.seed,
                    tuple(f for f in args.freeze.split(",") if f))
        print(args.steps, "updates:", *accuracy(model, held))
        return None
    small = pictures(work, 3000, 11, args.max_shapes, args.questions)
    few = pictures(work, 300, 12, args.max_shapes, questions=1)  # held out: other seed
    variant = (args.tile, args.patch, args.questions, args.batch, args.layer_scale, args.init)
    out = work / (f"curriculum-{args.max_shapes}-{args.lr:g}" + (
        "" if variant == (shapes.SIZE, 28, M.TRAIN["questions"], M.OPTIONS.batch_size, LAYER_SCALE, "normal") else
        f"-{args.tile}-{args.patch}-q{args.questions}-b{args.batch}-ls{args.layer_scale:g}"
        + ("" if args.init == "normal" else f"-{args.init}")))
    init = initial(work, args)
    first = run(init, small, out / "stage1", args.steps, args.lr, few, args.batch)
    print(f"stage 1, {args.steps} updates, pictures of <= {args.max_shapes} shapes:", *accuracy(first, few))
    print("stage 1 on the task's pictures:", *accuracy(first, held))
    if args.then:
        second = run(first, pictures(work, 6400, 13, questions=args.questions), out / "stage2", args.then, args.lr,
                     held, args.batch)
        print(f"stage 2, {args.then} updates:", *accuracy(second, held))
    return None


if __name__ == "__main__":
    main()
