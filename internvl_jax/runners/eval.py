"""Benchmark rows (VLMEvalKit TSV / JSONL) -> requests, and generated answers -> predictions and a summary.

A row has `index` (or `id`), `question`, optionally `hint`, option columns `A`, `B`, ... (a missing cell means
no such option), `answer` (an option letter, or for open questions the reference text / a list of them),
`category` / `l2-category`, and its image as `image` (base64; a short value names another row's `index`
whose image it shares, as VLMEvalKit stores repeated images) or `image_path` (relative to the data file or
`--image-root`). Several images may be given as a list literal (VLMEvalKit's `toliststr` convention).
"""

from __future__ import annotations

import ast
import json
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl_jax.runners import profiles as pf
from internvl_jax.runners import vlmeval_metrics as vm
from internvl_jax.runners.profiles import Profile
from internvl_jax.runners.records import Request, TableRow, id_key
from internvl_jax.runners.scoring import (
    MCQ_INSTRUCTION_EN,
    Breakdown,
    answer_list,
    build_mcq_prompt,
    exact_hit,
    extract_option,
    format_value,
    relaxed_hit,
)
from internvl_jax.runners.shards import write_atomic

GROUP_COLUMNS = ("category", "l2-category")
# Other columns some metrics read: splits, MME's image pairs, MathVista's answer types and skills.
EXTRA_COLUMNS = ("split", "image_path", "question_type", "answer_type", "choices", "answer_option", "task", "skills")
# Columns a metric cannot do without (beyond index / question): checked before anything runs.
NEEDED_COLUMNS = {"mme": ("category",), "hallusion": ("l2-category",), "amber": ("category",),
                  "ocrbench": ("category",), "mathvista": ("question_type", "answer_type", "task", "skills")}
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
    extra: dict[str, Any] = field(default_factory=dict)  # EXTRA_COLUMNS present in the row
    image_key: str | None = None  # which picture the row asks about (its image_path, else its image data)

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)

    def label(self) -> str:
        return f"record {self.id!r} ({self.where})" if self.id is not None else f"record at {self.where}"

    def prompt(self, profile: Profile | None = None) -> str:
        """The text `InternVLChat.build_prompt` sends for this row under `profile` (None: multiple choice
        when the row has options, else a short-answer question)."""
        question = format_value(self.question)
        rule = profile.prompt if profile is not None else "mcq" if self.options else "short"
        cot = profile is not None and profile.cot
        if rule == "mcq":
            prompt = build_mcq_prompt(question, self.options, None if self.hint is None else format_value(self.hint))
            # build_mcq_cot_prompt: the English letter instruction gives way to the reasoning one.
            return prompt.replace(MCQ_INSTRUCTION_EN, "").strip() + "\n" + pf.MCQ_COT if cot else prompt
        if rule == "mme":
            return f"{question} {pf.SHORT_ANSWER}"
        if rule == "yes_no":
            return f"{question} {pf.YES_NO_SUFFIX}"
        if rule == "detail":
            return question + "\nAnswer this question in detail."
        if rule == "short":
            return f"{question}\n{pf.SHORT_ANSWER}"
        # 'bare': the question alone, or with the reasoning instruction (Y/N sets get none in VLMEvalKit).
        return question + "\n" + pf.QA_COT if cot and (profile is None or profile.kind == pf.VQA) else question


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


def without_empty_images(rows: Sequence[TableRow]) -> tuple[list[TableRow], int]:
    """VLMEvalKit drops the rows whose `image` cell is empty before anything else (`skip_noimg`), so they are
    neither asked nor counted: (the other rows, how many were dropped)."""
    kept = [r for r in rows if r.fields is None or "image" not in r.fields or r.fields["image"] is not None]
    return kept, len(rows) - len(kept)


def check_columns(profile: Profile, rows: Sequence[TableRow], data_file: Path) -> None:
    """A file without a column its profile's metric needs is refused before anything runs."""
    fields = [r.fields for r in rows if r.fields is not None]
    for column in NEEDED_COLUMNS.get(profile.metric, ()):
        if fields and not any(column in f for f in fields):
            raise ValueError(f"{data_file}: the {profile.name} profile ({profile.metric} metric) needs a "
                             f"'{column}' column, which the file does not have (a file of another dataset? "
                             "choose the profile with --dataset)")


def items_from_rows(rows: Sequence[TableRow], data_file: Path, image_root: Path | None = None,
                    profile: Profile | None = None) -> list[EvalItem]:
    circular = profile is not None and profile.metric == "circular"
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
        if circular and (not isinstance(rid, int) or isinstance(rid, bool)):
            # Rotated copies are found by index % 1e6, so every index must be a whole number.
            items.append(EvalItem(n, rid, r.where, error=f"{stub.label()}: circular evaluation "
                                                          f"({profile.name}) needs an integer index"))
            continue
        options = {c: f[c] for c in string.ascii_uppercase if f.get(c) is not None}
        groups = {g: f.get(g) for g in GROUP_COLUMNS if f.get(g) is not None}
        extra = {c: f[c] for c in EXTRA_COLUMNS if f.get(c) is not None}
        key = format_value(f["image_path"]) if f.get("image_path") is not None else "|".join(images) or None
        items.append(EvalItem(n, rid, r.where, f["question"], f.get("hint"), options, f.get("answer"), groups,
                              images, extra=extra, image_key=key))
    return items


def _image_block(item: EvalItem, i: int, profile: Profile | None) -> dict[str, Any]:
    """Image i of the row, with what VLMEvalKit does to it first: a base64 image is saved under the row's
    `image_path` name (else `INDEX.png`, lossless), so a .jpg name means one JPEG re-encoding; MMMU upscales
    the first image 2x."""
    block: dict[str, Any] = {"type": "image", "url": item.images[i]}
    if profile is None:
        return block
    if i == 0 and profile.upscale_first:
        block["upscale"] = 2
    names = _list_cell(item.extra["image_path"]) if "image_path" in item.extra else []
    if item.images[i].startswith("data:") and len(names) == len(item.images) and \
            names[i].lower().endswith((".jpg", ".jpeg")):
        block["save_as"] = "jpeg"
    return block


def conversation(item: EvalItem, system: str | None = None, profile: Profile | None = None) -> list[dict]:
    """The user turn InternVL's VLMEvalKit wrapper builds: one image first (`<image>\\n` + prompt), or
    several as `Image-1: <image>\\nImage-2: <image>\\n` + prompt; the -hf chat template writes each image
    block as `<IMG_CONTEXT>\\n`, which gives the same text."""
    content: list[dict] = []
    if len(item.images) == 1:
        content.append(_image_block(item, 0, profile))
    else:
        for i in range(len(item.images)):
            content += [{"type": "text", "text": f"Image-{i + 1}: "}, _image_block(item, i, profile)]
    content.append({"type": "text", "text": item.prompt(profile)})
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return messages


def requests_for(items: Sequence[EvalItem], system: str | None = None, profile: Profile | None = None
                 ) -> list[Request]:
    """One request per item; under a profile each carries the profile's system message, max_new_tokens and
    its own tile budget (which depends on its image count)."""
    if profile is None:
        return [Request(it.row, it.id, it.where, error=it.error) if it.error else
                Request(it.row, it.id, it.where, conversation(it, system)) for it in items]
    return [Request(it.row, it.id, it.where, error=it.error) if it.error else
            Request(it.row, it.id, it.where, conversation(it, profile.system, profile),
                    generation={"max_new_tokens": profile.max_new_tokens},
                    max_patches=profile.tiles_for(len(it.images)))
            for it in items]


# ----- scoring -----
def _choices(item: EvalItem, profile: Profile | None) -> tuple[dict[str, Any], Any]:
    """(options the answer is read against, the right letter). MMMU's open questions become a two-option
    question (`MMMU_preproc`): A is the reference answer, B 'Other Answers', and A is right."""
    if profile is not None and "MMMU" in profile.name and "A" not in item.options:
        answer = format_value(item.answer)
        return ({"A": item.answer, "B": "Other Answers"}, answer if answer in string.ascii_uppercase else "A")
    return item.options, None if item.answer is None else format_value(item.answer).strip()


def _read(item: EvalItem, text: str, failed: bool, profile: Profile | None) -> dict[str, Any]:
    """One answered row: what was read from the answer and its score (VLMEvalKit scores a failed answer as
    its text, here empty: never right)."""
    kind = profile.kind if profile is not None else pf.MCQ if item.multiple_choice else pf.VQA
    if kind == pf.MCQ:
        options, right = _choices(item, profile)
        chosen = None if failed else extract_option(text, options)
        return {"type": "multiple_choice", "extracted": chosen,
                "hit": None if right is None else chosen is not None and chosen == right}
    if kind == pf.YES_NO:
        said = vm.yes_no("" if failed else text)
        if item.answer is None:
            return {"type": "yes_no", "extracted": said, "hit": None}
        answer = format_value(item.answer)
        lowered = profile is not None and profile.metric == "amber"
        return {"type": "yes_no", "extracted": said,
                "hit": answer.lower() == said.lower() if lowered else answer == said}
    out: dict[str, Any] = {"type": "open"}
    if item.answer is None:
        return {**out, "exact_match": None, "relaxed_hit": None, **({"score": None} if profile else {})}
    answers = answer_list(item.answer)
    out.update(exact_match=not failed and exact_hit(text, answers),
               relaxed_hit=not failed and relaxed_hit(text, answers))
    if profile is None:
        return out
    if profile.metric == "ocrbench":
        out["score"] = float(not failed and vm.ocrbench_hit(item.groups.get("category"), text, item.answer))
    elif profile.metric == "mathvista":
        got, right = vm.mathvista_prefetch({**item.extra, "answer": item.answer}, "" if failed else text)
        out.update(extracted=got, score=float(right))
    else:
        out["score"] = vm.open_hit(profile.metric, profile.hit_rule, "" if failed else text, item.answer)
    return out


def score(items: Sequence[EvalItem], results: Sequence[Mapping[str, Any]], profile: Profile | None = None
          ) -> tuple[list[dict], dict[str, Any]]:
    """Per-record predictions (input order) and the summary. A failed record counts as answered wrongly,
    as VLMEvalKit scores a failed inference; a record without `answer` is left unscored. Under a profile the
    summary also holds VLMEvalKit's table for the dataset (`vlmevalkit`)."""
    tallies: dict[str, Breakdown] = defaultdict(Breakdown)
    failed = unscored = 0
    predictions, scored = [], []
    for item, res in zip(items, results, strict=True):
        error = res.get("error")
        failed += error is not None
        text = res.get("text") or ""
        out: dict[str, Any] = {"index": item.id, "row": item.row, "prediction": res.get("text"),
                               "answer": item.answer, **item.groups}
        if item.error is None:
            out.update(_read(item, text, error is not None, profile))
            value = out.get("score", out.get("hit", out.get("exact_match")))
            if value is None:
                unscored += 1
            else:
                scored.append((item, out))
                if out["type"] == "open":
                    tallies["exact_match"].add(out["exact_match"], item.groups)
                    tallies["relaxed_accuracy"].add(out["relaxed_hit"], item.groups)
                    if "score" in out:
                        tallies[profile.metric].add(out["score"], item.groups)
                else:
                    tallies[out["type"]].add(out["hit"], item.groups)
        else:
            out["type"] = None  # the row itself is unusable: there is nothing to score it against
            unscored += 1
        out.update(error=error, prompt_tokens=res.get("prompt_tokens"), new_tokens=res.get("new_tokens"))
        if "token_ids" in res:
            out["token_ids"] = res["token_ids"]
        predictions.append(out)
    summary: dict[str, Any] = {"records": len(items), "failed": failed, "unscored": unscored}
    for name in ("multiple_choice", "yes_no"):
        if tallies[name].overall.total:
            summary[name] = tallies[name].as_dict()
    if tallies["exact_match"].overall.total:
        summary["open"] = {k: tallies[k].as_dict() for k in tallies
                           if k not in ("multiple_choice", "yes_no") and tallies[k].overall.total}
    if profile is not None and scored:
        summary.update(_vlmevalkit(profile, scored))
    return predictions, summary


def _metric_rows(scored: Sequence[tuple[EvalItem, dict]]) -> list[dict[str, Any]]:
    return [{"index": it.id, "answer": it.answer, "image_key": it.image_key, **it.groups, **it.extra, **out,
             "score": out.get("score", out.get("hit"))} for it, out in scored]


def _vlmevalkit(profile: Profile, scored: Sequence[tuple[EvalItem, dict]]) -> dict[str, Any]:
    """The dataset's headline numbers as VLMEvalKit's evaluate() reports them, or why they cannot be made."""
    rows = _metric_rows(scored)
    out: dict[str, Any] = {}
    try:
        if profile.metric == "circular":
            hits = vm.circular_hits(rows)
            main = [{**r, "hit": hits[r["index"]]} for r in rows if r["index"] in hits]
            tally = Breakdown()
            for r in main:
                tally.add(r["hit"], {g: r.get(g) for g in GROUP_COLUMNS})
            out["circular"] = tally.as_dict()
            table: Any = vm.report_acc(main)
        elif profile.kind == pf.MCQ:
            table = vm.report_acc(rows)
        elif profile.metric == "ocrbench":
            table = vm.ocrbench_rating(rows)
        else:
            table = {"mme": vm.mme_rating, "hallusion": vm.hallusion_rating, "pope": vm.pope_rating,
                     "amber": vm.amber_rating, "yes_no": vm.grouped_rating, "mathvista": vm.mathvista_rating,
                     }.get(profile.metric, lambda r: vm.grouped_rating(r, split_column=True))(rows)
    except ValueError as e:
        return {**out, "vlmevalkit": {"file": profile.name + profile.report_suffix, "error": str(e)}}
    if isinstance(table, dict):
        return {**out, "vlmevalkit": {"file": profile.name + profile.report_suffix, "scores": table}}
    header, lines = table
    return {**out, "vlmevalkit": {"file": profile.name + profile.report_suffix, "header": header, "rows": lines}}


def write_report(summary: Mapping[str, Any], path: Path) -> Path | None:
    """VLMEvalKit's result file (`*_acc.csv`, `*_score.csv`, OCRBench's `*_score.json`) from a summary;
    None when the summary has no table."""
    report = summary.get("vlmevalkit")
    if not report or "error" in report:
        return None
    text = (json.dumps(report["scores"], indent=4, ensure_ascii=False) + "\n" if "scores" in report
            else vm.csv_text((report["header"], report["rows"])))
    write_atomic(path, text.encode("utf-8"))
    return path
