"""Benchmark rows (VLMEvalKit TSV / JSONL) -> requests, and generated answers -> predictions and a summary.

A row has `index` (or `id`), `question`, optionally `hint`, option columns `A`, `B`, ... (a missing cell means
no such option), `answer` (an option letter, or for open questions the reference text / a list of them),
`category` / `l2-category`, and its image as `image` (base64; a short value names another row's `index`
whose image it shares, as VLMEvalKit stores repeated images) or `image_path` (relative to the data file or
`--image-root`). Several images may be given as a list literal (VLMEvalKit's `toliststr` convention).
"""

from __future__ import annotations

import ast
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl_jax.runners.records import Request, TableRow, id_key
from internvl_jax.runners.scoring import (
    Breakdown,
    answer_list,
    build_mcq_prompt,
    exact_hit,
    extract_option,
    format_value,
    relaxed_hit,
)

GROUP_COLUMNS = ("category", "l2-category")
# VLMEvalKit treats an `image` cell of at most 64 characters as the index of the row holding the image.
IMAGE_REFERENCE_MAX = 64


@dataclass(frozen=True)
class EvalItem:
    row: int
    id: Any
    where: str
    question: str = ""
    hint: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    answer: Any = None
    groups: dict[str, Any] = field(default_factory=dict)
    images: tuple[str, ...] = ()
    error: str | None = None

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)

    def label(self) -> str:
        return f"record {self.id!r} ({self.where})" if self.id is not None else f"record at {self.where}"

    def prompt(self) -> str:
        return build_mcq_prompt(format_value(self.question), self.options,
                                None if self.hint is None else format_value(self.hint))


def _list_cell(value: Any) -> list[str]:
    """A cell holding one value or a list literal ("['a', 'b']")."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value)
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)):
            return [str(v) for v in parsed]
    return [text]


def _images(fields: Mapping[str, Any], by_index: Mapping[str, Any], base: Path) -> tuple[str, ...]:
    image = fields.get("image")
    if image is not None:
        out = []
        for item in _list_cell(image):
            if len(item) <= IMAGE_REFERENCE_MAX:
                target = by_index.get(item)
                if target is None or len(str(target)) <= IMAGE_REFERENCE_MAX:
                    raise ValueError(f"field 'image' {item!r} is neither base64 data nor the index of a row "
                                     "holding an image")
                out.extend(_list_cell(target))
            else:
                out.append(item)
        return tuple(x if x.startswith("data:") else "data:image/jpeg;base64," + x for x in out)
    path = fields.get("image_path")
    if path is not None:
        return tuple(p if Path(p).is_absolute() or "://" in p else str(base / p) for p in _list_cell(path))
    return ()


def items_from_rows(rows: Sequence[TableRow], data_file: Path, image_root: Path | None = None) -> list[EvalItem]:
    base = image_root if image_root is not None else data_file.parent
    by_index = {format_value(r.fields.get("index")): r.fields.get("image") for r in rows
                if r.fields is not None and r.fields.get("index") is not None and r.fields.get("image") is not None}
    items: list[EvalItem] = []
    seen: dict[str, str] = {}
    for n, r in enumerate(rows):
        if r.fields is None:
            items.append(EvalItem(n, None, r.where, error=r.error))
            continue
        f = r.fields
        rid = f.get("index", f.get("id"))
        if rid is None:
            items.append(EvalItem(n, None, r.where, error=f"{r.where}: missing field 'index' (or 'id')"))
            continue
        stub = EvalItem(n, rid, r.where)
        if id_key(rid) in seen:
            items.append(EvalItem(n, rid, r.where, error=f"{stub.label()}: duplicate index (first at "
                                                          f"{seen[id_key(rid)]})"))
            continue
        seen[id_key(rid)] = r.where
        if f.get("question") is None:
            items.append(EvalItem(n, rid, r.where, error=f"{stub.label()}: missing field 'question'"))
            continue
        try:
            images = _images(f, by_index, base)
        except ValueError as e:
            items.append(EvalItem(n, rid, r.where, error=f"{stub.label()}: {e}"))
            continue
        options = {c: f[c] for c in string.ascii_uppercase if f.get(c) is not None}
        groups = {g: f.get(g) for g in GROUP_COLUMNS if f.get(g) is not None}
        items.append(EvalItem(n, rid, r.where, f["question"], f.get("hint"), options, f.get("answer"), groups,
                              images))
    return items


def conversation(item: EvalItem, system: str | None = None) -> list[dict]:
    """The user turn InternVL's VLMEvalKit wrapper builds: one image first (`<image>\\n` + prompt), or
    several as `Image-1: <image>\\nImage-2: <image>\\n` + prompt; the -hf chat template writes each image
    block as `<IMG_CONTEXT>\\n`, which gives the same text."""
    content: list[dict] = []
    if len(item.images) == 1:
        content.append({"type": "image", "url": item.images[0]})
    else:
        for i, image in enumerate(item.images, start=1):
            content += [{"type": "text", "text": f"Image-{i}: "}, {"type": "image", "url": image}]
    content.append({"type": "text", "text": item.prompt()})
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return messages


def requests_for(items: Sequence[EvalItem], system: str | None = None) -> list[Request]:
    return [Request(it.row, it.id, it.where, error=it.error) if it.error else
            Request(it.row, it.id, it.where, conversation(it, system)) for it in items]


# ----- scoring -----
def score(items: Sequence[EvalItem], results: Sequence[Mapping[str, Any]]) -> tuple[list[dict], dict[str, Any]]:
    """Per-record predictions (input order) and the summary. A failed record counts as answered wrongly,
    as VLMEvalKit scores a failed inference; a record without `answer` is left unscored."""
    mcq, exact, relaxed = Breakdown(), Breakdown(), Breakdown()
    failed = unscored = 0
    predictions = []
    for item, res in zip(items, results, strict=True):
        error = res.get("error")
        failed += error is not None
        text = res.get("text") or ""
        out: dict[str, Any] = {"index": item.id, "row": item.row, "prediction": res.get("text"),
                               "answer": item.answer, **item.groups}
        if item.error is None and item.multiple_choice:
            chosen = None if error else extract_option(text, item.options)
            out.update(type="multiple_choice", extracted=chosen)
            if item.answer is None:
                out["hit"] = None
                unscored += 1
            else:
                out["hit"] = chosen is not None and chosen == format_value(item.answer).strip()
                mcq.add(out["hit"], item.groups)
        elif item.error is None:
            out["type"] = "open"
            if item.answer is None:
                out.update(exact_match=None, relaxed_hit=None)
                unscored += 1
            else:
                answers = answer_list(item.answer)
                out.update(exact_match=not error and exact_hit(text, answers),
                           relaxed_hit=not error and relaxed_hit(text, answers))
                exact.add(out["exact_match"], item.groups)
                relaxed.add(out["relaxed_hit"], item.groups)
        else:
            out["type"] = None  # the row itself is unusable: there is nothing to score it against
            unscored += 1
        out.update(error=error, prompt_tokens=res.get("prompt_tokens"), new_tokens=res.get("new_tokens"))
        if "token_ids" in res:
            out["token_ids"] = res["token_ids"]
        predictions.append(out)
    summary: dict[str, Any] = {"records": len(items), "failed": failed, "unscored": unscored}
    if mcq.overall.total:
        summary["multiple_choice"] = mcq.as_dict()
    if exact.overall.total:
        summary["open"] = {"exact_match": exact.as_dict(), "relaxed_accuracy": relaxed.as_dict()}
    return predictions, summary
