"""The shapes task: seeded pictures of coloured circles, squares and triangles, with one-word questions about them.

A task small enough for a tiny InternVL to learn on a CPU, that still goes through everything a real one uses
(the processor's tiling, the vision tower, pixel shuffle, projector, decoder and the chat template), so a
trained model shows end to end that an answer is right. A picture: 448 x 448, a white or light grey ground,
1 to 4 shapes that do not overlap, 60-140 px each, of distinct colours. A question and its answer (lower case, one
word or digit):
- "What colour is the {shape}?" -> "{colour}" (asked only when exactly one shape is of that kind);
- "How many shapes are there?" -> "{n}";
- "What shape is {colour}?" -> "{shape}";
- "Is there a {colour} {shape}?" -> "yes" / "no" (each about half the time).

`write(out, n, seed)` writes `n` pictures (one question each) as PNG files and a JSONL file that `internvl-jax
batch` reads and fine-tuning trains on (the assistant turn holds the answer), plus a VQA TSV for `eval`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 448  # pixels a side: one tile, so a question costs one pass of the vision tower
SIDES = (60, 140)  # a shape's bounding square, in pixels (inclusive)
GAP = 4  # pixels kept free between two shapes' squares
KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 80, 220), "yellow": (240, 200, 20),
           "purple": (140, 50, 180), "orange": (245, 130, 20)}
GROUNDS = ((255, 255, 255), (235, 235, 235))  # white, light grey
QUESTION_KINDS = ("colour", "count", "shape", "exists")


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: int  # left edge of its bounding square
    y: int  # top edge
    side: int

    def overlaps(self, other: Shape) -> bool:
        return not (self.x + self.side + GAP <= other.x or other.x + other.side + GAP <= self.x
                    or self.y + self.side + GAP <= other.y or other.y + other.side + GAP <= self.y)

    def centre(self) -> tuple[int, int]:
        """A pixel inside the shape (a triangle's centroid, below its box centre)."""
        return self.x + self.side // 2, self.y + (2 * self.side) // 3 if self.kind == "triangle" else \
            self.y + self.side // 2


@dataclasses.dataclass(frozen=True)
class Scene:
    ground: tuple[int, int, int]
    shapes: tuple[Shape, ...]


@dataclasses.dataclass(frozen=True)
class Example:
    scene: Scene
    question: str
    answer: str
    kind: str  # one of QUESTION_KINDS


def scene(rng: np.random.Generator, max_shapes: int = 4) -> Scene:
    """1-4 shapes (1 to `max_shapes`: fewer make a curriculum's first stage) placed at random, none overlapping
    (a placement that fails 200 times starts the scene again)."""
    while True:
        n = int(rng.integers(1, max_shapes + 1))
        colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), n, replace=False)]
        shapes: list[Shape] = []
        for colour in colours:
            for _ in range(200):
                side = int(rng.integers(SIDES[0], SIDES[1] + 1))
                x, y = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
                cand = Shape(KINDS[int(rng.integers(len(KINDS)))], colour, x, y, side)
                if not any(cand.overlaps(s) for s in shapes):
                    shapes.append(cand)
                    break
        if len(shapes) == n:
            return Scene(GROUNDS[int(rng.integers(len(GROUNDS)))], tuple(shapes))


def draw(sc: Scene) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), sc.ground)
    pen = ImageDraw.Draw(img)
    for s in sc.shapes:
        box = (s.x, s.y, s.x + s.side - 1, s.y + s.side - 1)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif s.kind == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(s.x + s.side / 2, s.y), (s.x, s.y + s.side - 1), (s.x + s.side - 1, s.y + s.side - 1)],
                        fill=fill)
    return img


def ask(sc: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, question kind) about the scene, the kind drawn among those it allows."""
    kinds = [s.kind for s in sc.shapes]
    single = [k for k in KINDS if kinds.count(k) == 1]
    allowed = [q for q in QUESTION_KINDS if q != "colour" or single]
    q = allowed[int(rng.integers(len(allowed)))]
    if q == "colour":
        kind = single[int(rng.integers(len(single)))]
        return f"What colour is the {kind}?", next(s.colour for s in sc.shapes if s.kind == kind), q
    if q == "count":
        return "How many shapes are there?", str(len(sc.shapes)), q
    if q == "shape":
        s = sc.shapes[int(rng.integers(len(sc.shapes)))]
        return f"What shape is {s.colour}?", s.kind, q
    present = {(s.colour, s.kind) for s in sc.shapes}
    if rng.random() < 0.5:
        colour, kind = sorted(present)[int(rng.integers(len(present)))]
    else:
        absent = sorted((c, k) for c in COLOURS for k in KINDS if (c, k) not in present)
        colour, kind = absent[int(rng.integers(len(absent)))]
    return f"Is there a {colour} {kind}?", "yes" if (colour, kind) in present else "no", q


def vocabulary() -> tuple[list[str], list[str]]:
    """Every question and every answer the task can ask and give."""
    questions = [f"What colour is the {k}?" for k in KINDS] + ["How many shapes are there?"]
    questions += [f"What shape is {c}?" for c in COLOURS] + [f"Is there a {c} {k}?" for c in COLOURS for k in KINDS]
    answers = [*COLOURS, *KINDS, "1", "2", "3", "4", "yes", "no"]
    return questions, answers


def examples(n: int, seed: int) -> Iterator[Example]:
    """`n` examples, the same ones for the same seed."""
    for picture in quizzes(n, seed, 1):
        yield picture[0]


def quizzes(n: int, seed: int, questions: int, max_shapes: int = 4) -> Iterator[list[Example]]:
    """`n` pictures with up to `questions` different questions each (fewer when a picture allows fewer), the same
    for the same seed; one question a picture draws what `examples` draws."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        sc = scene(rng, max_shapes)
        asked: list[Example] = []
        for _ in range(4 * questions):  # a repeated question is drawn again, a few times at most
            question, answer, kind = ask(sc, rng)
            if all(question != e.question for e in asked):
                asked.append(Example(sc, question, answer, kind))
            if len(asked) == questions:
                break
        yield asked


def write(out: str | Path, n: int, seed: int, name: str = "shapes", questions: int = 1, max_shapes: int = 4
          ) -> Path:
    """`out/images/{name}-{i}.png`, `out/{name}.jsonl` (records with the answers as the assistant turns; `batch`
    reads them and answers the first question) and `out/{name}.tsv` (index, image_path, question, answer: a VQA file
    for `eval`, a row per question). `questions` > 1: each picture's conversation asks several questions, one turn
    each (more answers to learn from per pass of the vision tower). Returns the JSONL path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jsonl, tsv = out / f"{name}.jsonl", out / f"{name}.tsv"
    with jsonl.open("w") as fj, tsv.open("w", newline="") as ft:
        table = csv.writer(ft, delimiter="\t", lineterminator="\n")
        table.writerow(["index", "image_path", "question", "answer"])
        row = 0
        for i, asked in enumerate(quizzes(n, seed, questions, max_shapes)):
            image = f"images/{name}-{i:05d}.png"
            draw(asked[0].scene).save(out / image, optimize=False)
            messages = []
            for j, ex in enumerate(asked):
                picture = [{"type": "image", "url": image}] if j == 0 else []
                messages += [{"role": "user", "content": [*picture, {"type": "text", "text": ex.question}]},
                             {"role": "assistant", "content": [{"type": "text", "text": ex.answer}]}]
                table.writerow([row, image, ex.question, ex.answer])
                row += 1
            record = {"id": i, "messages": messages, "answer": asked[0].answer, "kind": asked[0].kind,
                      "kinds": [ex.kind for ex in asked]}  # each turn's
            fj.write(json.dumps(record) + "\n")
    return jsonl


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m internvl_jax.demo.shapes", description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory to write into")
    p.add_argument("--n", type=int, default=500, help="pictures (one question each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="shapes", help="file name stem (train, heldout, ...)")
    p.add_argument("--questions", type=int, default=1, help="questions a picture (turns of its conversation)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    if args.questions < 1:
        p.error(f"--questions must be at least 1, got {args.questions}")
    print(write(args.out, args.n, args.seed, args.name, args.questions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
