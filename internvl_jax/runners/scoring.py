"""Prompt building, answer extraction and scores, written to give the numbers the benchmarks' own tools give.

Sources (see docs/runners.md for the exact files):
- the multiple-choice prompt is VLMEvalKit's `build_multi_choice_prompt` for InternVL
  (`vlmeval/vlm/internvl/utils.py`), which InternVL's own `eval/mmbench/evaluate_mmbench.py` also builds:
  hint, question, one `A. text` line per option, then the instruction (Chinese when the prompt has CJK text);
- option extraction is VLMEvalKit's exact-matching `can_infer` (`vlmeval/utils/matching_util.py`, its current
  form: a lone letter only among the last words, "the answer is X", long answers not text-matched);
- open questions: exact match (strip + lower-case, any reference answer) and relaxed accuracy (pix2struct's
  `relaxed_correctness`: 5% tolerance for numbers, relative to the reference answer, as VLMEvalKit's
  `process_line` calls it). The per-dataset metrics are in `vlmeval_metrics.py`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MCQ_INSTRUCTION_EN = "Answer with the option's letter from the given choices directly."
MCQ_INSTRUCTION_CN = "请直接回答选项字母。"
# A multiple-choice row without options (MMMU's open questions).
DIRECT_INSTRUCTION_EN = "Answer the question directly."
DIRECT_INSTRUCTION_CN = "请直接回答问题。"
# VLMEvalKit's InternVL prompt for short-answer VQA sets (ChartQA, DocVQA, TextVQA, ... and its default).
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
# Extraction result for an answer that refuses (VLMEvalKit's 'Z'); it never equals a real option.
REFUSED = "Z"
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
# VLMEvalKit's mark of a failed API call (`INFER_FAIL_MSG`): such an answer chooses nothing.
API_FAILURE = "Failed to obtain answer via API"
# "The correct answer is **B**": a verbose answer whose letter is not among its last words.
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_CJK = re.compile("[\u4e00-\u9fff]")
_PUNCT = ".()[],:;!*#{}"


def cn_string(text: str) -> bool:
    """VLMEvalKit's `cn_string`: the text holds a CJK unified ideograph."""
    return _CJK.search(text) is not None


def format_value(value: Any) -> str:
    """A cell as Python's f-string shows it (VLMEvalKit formats pandas values with f'{item}')."""
    return f"{value}"


def build_mcq_prompt(question: str, options: Mapping[str, Any], hint: str | None = None) -> str:
    """hint + question + `A. text` lines + the instruction (`build_multi_choice_prompt`); a row without
    options is asked to be answered directly."""
    prompt = question if hint is None else f"{hint}\n{question}"
    for letter, text in options.items():
        prompt += f"\n{letter}. {format_value(text)}"
    chinese = cn_string(prompt)
    if options:
        return prompt + "\n" + (MCQ_INSTRUCTION_CN if chinese else MCQ_INSTRUCTION_EN)
    return prompt + "\n" + (DIRECT_INSTRUCTION_CN if chinese else DIRECT_INSTRUCTION_EN)


def _letters_in(words: Sequence[str], letters: Iterable[str]) -> list[str]:
    return [c for c in letters if c in words]


def infer_option_letter(answer: str, options: Mapping[str, Any]) -> str | None:
    """VLMEvalKit's `can_infer_option` (vlmeval/utils/matching_util.py): after turning `.()[],:;!*#{}` into
    spaces, exactly one option letter standing alone as a word, and among the last four words ("B", "(C)",
    "I think it is C"); no letter but a lone 'Z', or a refusal phrase, gives 'Z'; otherwise "(the) (correct)
    answer is X" (X one of A-D, any case, among the options) anywhere. An API-failure text is no answer."""
    if API_FAILURE in answer:
        return None
    for refusal in _REFUSALS:
        if refusal in answer:
            return REFUSED
    text = answer
    for c in _PUNCT:
        text = text.replace(c, " ")
    words = [w.strip() for w in text.split()]
    found = _letters_in(words, options)
    if len(found) == 1 and words.index(found[0]) > len(words) - 5:
        return found[0]
    if not found and REFUSED in words:
        return REFUSED
    match = _ANSWER_IS.search(answer)
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    return None


def infer_option_text(answer: str, options: Mapping[str, Any]) -> str | None:
    """VLMEvalKit's `can_infer_text`: exactly one option's text occurs in the answer (case-insensitive); an
    answer more than twice as long as all option texts together is not matched at all."""
    lowered = answer.lower()
    if len(lowered) > 2 * sum(len(format_value(v)) for v in options.values()):
        return None
    hits = [k for k, v in options.items() if format_value(v).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def extract_option(answer: Any, options: Mapping[str, Any]) -> str | None:
    """VLMEvalKit's `can_infer`: the chosen option letter, 'Z' for a refusal, None when nothing can be
    inferred (scored as wrong, as its `exact_matching` judge does)."""
    text = "" if answer is None else str(answer)
    return infer_option_letter(text, options) or infer_option_text(text, options)


def answer_list(answer: Any) -> list[str]:
    """Reference answers: a list, a string holding a Python/JSON list (VLMEvalKit's convention), or one value."""
    if isinstance(answer, (list, tuple)):
        return [format_value(a) for a in answer]
    text = format_value(answer)
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, list):
            return [format_value(a) for a in parsed]
    return [text]


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """pix2struct's relaxed correctness: numbers within 5% of `target`, anything else exact (case-insensitive).
    A zero target falls through to the string comparison, as in the original."""
    prediction_float, target_float = _to_float(prediction), _to_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_hit(prediction: str, answers: Sequence[str]) -> bool:
    # VLMEvalKit (`vqa_eval.process_line`, method 'relaxed_accuracy') passes each reference answer as
    # `target`: the 5% is relative to the reference.
    return any(relaxed_correctness(a, prediction.strip()) for a in answers)


def exact_hit(prediction: str, answers: Sequence[str]) -> bool:
    return any(prediction.strip().lower() == a.strip().lower() for a in answers)


# ----- summary -----
@dataclass
class Tally:
    total: int = 0
    correct: float = 0.0

    def add(self, hit: bool | float) -> None:
        self.total += 1
        self.correct += float(hit)

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "correct": _num(self.correct),
                "accuracy": round(self.correct / self.total, 6) if self.total else None}


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


@dataclass
class Breakdown:
    """Overall and per-group tallies of one metric."""

    overall: Tally = field(default_factory=Tally)
    groups: dict[str, dict[str, Tally]] = field(default_factory=dict)

    def add(self, hit: bool | float, groups: Mapping[str, Any]) -> None:
        self.overall.add(hit)
        for name, value in groups.items():
            if value is not None:
                self.groups.setdefault(name, {}).setdefault(format_value(value), Tally()).add(hit)

    def as_dict(self) -> dict[str, Any]:
        out = self.overall.as_dict()
        for name, tallies in self.groups.items():
            out[f"per_{name}"] = {k: tallies[k].as_dict() for k in sorted(tallies)}
        return out
