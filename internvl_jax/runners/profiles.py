"""Dataset profiles: what VLMEvalKit does for InternVL3 on each benchmark, keyed by VLMEvalKit's dataset names.

A profile fixes the prompt (`InternVLChat.build_prompt`), the tile budget (`set_max_num`, the multi-image rule
and MMMU's 2x upscale of the first image, `generate_v2`), the system message (InternVL3's own, which the
original `model.chat` puts in every prompt), the image backend (PIL, as `load_image`), how answers are read
and scored (`vlmeval/dataset/image_mcq.py`, `image_yorn.py`, `image_vqa.py`) and max_new_tokens (VLMEvalKit's
InternVL default, greedy). VLMEvalKit decides most of these by substrings of the dataset name
(`listinstr`); the rules below do the same, so a name such as MMBench_TEST_CN_V11 gets its family's rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# InternVL3's conversation template ('internvl2_5') system message, sent by `model.chat` with every question.
INTERNVL_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
                   "联合开发的多模态大语言模型。")
# `InternVLChat.__init__`: dict(do_sample=False, max_new_tokens=4096); InternVL3's config entries add nothing.
MAX_NEW_TOKENS = 4096
# `set_max_num`: at most 64 tiles over all images of a question.
TOTAL_TILES = 64

MCQ, YES_NO, VQA = "MCQ", "Y/N", "VQA"
KNOWN: dict[str, str] = {
    **dict.fromkeys(["MMBench_DEV_EN", "MMBench_DEV_CN", "MMBench_TEST_EN", "MMBench_TEST_CN", "MMBench_DEV_EN_V11",
                     "MMBench_DEV_CN_V11", "MMBench_TEST_EN_V11", "MMBench_TEST_CN_V11", "CCBench", "MMStar",
                     "SEEDBench_IMG", "AI2D_TEST", "ScienceQA_VAL", "ScienceQA_TEST", "MMMU_DEV_VAL", "MMMU_TEST",
                     "RealWorldQA"], MCQ),
    **dict.fromkeys(["MME", "HallusionBench", "POPE", "AMBER"], YES_NO),
    **dict.fromkeys(["ChartQA_TEST", "DocVQA_VAL", "DocVQA_TEST", "InfoVQA_VAL", "InfoVQA_TEST", "TextVQA_VAL",
                     "OCRVQA_TEST", "OCRVQA_TESTCORE", "GQA_TestDev_Balanced", "OCRBench", "MathVista_MINI"], VQA),
}

SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_NO_SUFFIX = "Please answer yes or no. " + SHORT_ANSWER
# The chain-of-thought instructions of vlmeval/vlm/internvl/utils.py (cot_prompt_version 'v1'), used with
# USE_COT=1 (here: --cot).
MCQ_COT = ("Answer the preceding multiple choice question. The last line of your response should follow this "
           "format: 'Answer: \\boxed{$LETTER}' (without quotes), where LETTER is one of the options. If you are "
           "uncertain or the problem is too complex, make a reasoned guess based on the information provided. "
           "Avoid repeating steps indefinitely—provide your best guess even if unsure. Think step by step "
           "logically, considering all relevant information before answering.")
QA_COT = ("Answer the preceding question. The last line of your response should follow this format: "
          "'Answer: \\boxed{$FINAL_ANSWER}' (without quotes), where 'FINAL_ANSWER' is your conclusion based on "
          "the reasoning provided. If you are uncertain or the problem is too complex, make a reasoned guess "
          "based on the information provided. Avoid repeating steps indefinitely—provide your best guess even "
          "if unsure. Think step by step logically, considering all relevant information before answering.")
# VQA sets asked for a short answer, and those sent the bare question (which --cot extends).
_SHORT_VQA = ["OCRVQA", "TextVQA", "ChartQA", "DocVQA", "InfoVQA", "OCRBench", "DUDE", "SLIDEVQA", "GQA",
              "MMLongBench_DOC"]
_BARE_VQA = ["MathVista", "MathVision", "VCR", "MTVQA", "MMVet", "MMDU", "CRPE", "MIA-Bench", "MM-Math", "DynaMath",
             "QSpatial", "WeMath", "LogicVista", "MM-IFEval", "ChartMimic", "MMReason"]
_TILES = ((["ChartQA_TEST", "MMMU_DEV_VAL", "MMMU_TEST", "MME-RealWorld", "VCR_EN", "VCR_ZH", "OCRVQA", "BMMR"], 12),
          (["DocVQA_VAL", "DocVQA_TEST", "DUDE", "MMLongBench_DOC", "SLIDEVQA"], 18),
          (["InfoVQA_VAL", "InfoVQA_TEST", "OCRBench", "HRBench4K", "HRBench8K"], 24))


def _has(name: str, parts: Sequence[str]) -> bool:
    """VLMEvalKit's `listinstr`: one of `parts` occurs in `name`."""
    return any(p in name for p in parts)


@dataclass(frozen=True)
class Profile:
    """Every setting of one dataset's evaluation; `as_dict` is what a run records."""

    name: str
    kind: str  # MCQ | Y/N | VQA
    prompt: str  # the prompt rule: mcq | mme | yes_no | bare | short | detail
    metric: str  # mcq | circular | mme | hallusion | pope | amber | yes_no | vqa_score | anls | ... | ocrbench
    max_patches: int
    hit_rule: str = "mean"  # VQA: how a row's per-reference matches become its score (mean | max | anls)
    upscale_first: bool = False  # MMMU: the first image is resized 2x (bilinear) before tiling
    system: str | None = INTERNVL_SYSTEM
    image_backend: str = "pil"
    max_new_tokens: int = MAX_NEW_TOKENS
    cot: bool = False
    known: bool = True  # False: chosen from the file's columns

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def report_suffix(self) -> str:
        """The VLMEvalKit result file name's end: `_acc.csv` (MCQ, VQA), `_score.csv` (Y/N, MathVista),
        `_score.json` (OCRBench)."""
        if self.metric == "ocrbench":
            return "_score.json"
        return "_score.csv" if self.kind == YES_NO or self.metric == "mathvista" else "_acc.csv"

    def tiles_for(self, images: int) -> int:
        """`generate_v2`: max(1, min(max_num, 64 // images)) tiles per image."""
        return max(1, min(self.max_patches, TOTAL_TILES // images)) if images else self.max_patches


def _prompt_rule(name: str, kind: str) -> str:
    if kind == YES_NO:
        return "mme" if _has(name, ["MME"]) else "yes_no" if _has(name, ["HallusionBench", "AMBER"]) else "bare"
    if kind == MCQ:
        return "mcq"
    if _has(name, ["LLaVABench", "WildVision"]):
        return "detail"
    if _has(name, _SHORT_VQA):
        return "short"
    return "bare" if _has(name, _BARE_VQA) or _has(name, ["MathVerse"]) else "short"


# Open-answer datasets: (name parts, metric, how the scores of a question's reference answers combine); the
# first match wins, and any other dataset is scored as TextVQA is.
_VQA_METRICS = (
    (["TextVQA"], "vqa_score", "mean"),
    (["ChartQA"], "relaxed_accuracy", "max"),
    (["OCRVQA"], "accuracy", "max"),
    (["GQA"], "accuracy", "mean"),
    (["DocVQA", "InfoVQA"], "anls", "anls"),
)


def _metric(name: str, kind: str) -> tuple[str, str]:
    """(metric, hit rule) as `evaluate` / `hit_calculate` pick them."""
    if kind == MCQ:
        return ("circular" if _has(name.lower(), ["mmbench", "ccbench", "circular", "mmcr"]) else "mcq"), "mean"
    if kind == YES_NO:
        for part, metric in (("MME", "mme"), ("Hallusion", "hallusion"), ("POPE", "pope"), ("AMBER", "amber")):
            if part in name:
                return metric, "mean"
        return "yes_no", "mean"
    if _has(name, ["OCRBench"]):
        return "ocrbench", "mean"
    if _has(name, ["MathVista"]):
        return "mathvista", "mean"
    return next(((metric, rule) for names, metric, rule in _VQA_METRICS if _has(name, names)), ("vqa_score", "mean"))


def _max_patches(name: str) -> int:
    return next((n for names, n in _TILES if _has(name, names)), 6)


def build(name: str, kind: str, known: bool = True) -> Profile:
    metric, rule = _metric(name, kind)
    return Profile(name, kind, _prompt_rule(name, kind), metric, _max_patches(name), rule,
                   upscale_first=_has(name, ["MMMU"]), known=known)


# Datasets of this project, not VLMEvalKit's: the shapes task (`internvl_jax/demo/shapes.py`, a file named
# Shapes*.tsv or `--dataset Shapes`), asked as it was trained (the bare question, no system message) and scored by
# exact match of the one-word answer.
OWN: dict[str, Profile] = {
    "Shapes": Profile("Shapes", VQA, "bare", "accuracy", max_patches=6, hit_rule="max", system=None,
                      max_new_tokens=16),
}


def kind_from_columns(rows: Sequence[Mapping[str, Any]]) -> str:
    """An unknown dataset's type from its rows: option columns make it multiple choice, answers that are all
    Yes / No a yes/no set, anything else open questions."""
    fields = [r for r in rows if r is not None]
    if any(f.get("A") is not None and f.get("B") is not None for f in fields):
        return MCQ
    answers = [f.get("answer") for f in fields if f.get("answer") is not None]
    if answers and all(str(a) in ("Yes", "No") for a in answers):
        return YES_NO
    return VQA


def name_from_file(path: Path) -> str | None:
    """The VLMEvalKit dataset a file is of: its stem is the name (MMBench_DEV_EN.tsv) or ends with it
    (InternVL3-8B_MMBench_DEV_EN.xlsx, VLMEvalKit's predictions); the longest such name wins."""
    stem = path.stem
    if stem.lower().startswith("shapes"):
        return "Shapes"
    hits = [n for n in KNOWN if stem == n or stem.endswith("_" + n)]
    return max(hits, key=len) if hits else None


def choose(dataset: str | None, data_file: Path, rows: Sequence[Mapping[str, Any]]) -> tuple[Profile, str | None]:
    """(profile, a notice for stderr or None). `--dataset` wins over the file name; a name VLMEvalKit does not
    list here gets its type from the columns (and the name rules for that type)."""
    name = dataset or name_from_file(data_file)
    if name in OWN:
        return OWN[name], None
    if name in KNOWN:
        return build(name, KNOWN[name]), None
    kind = kind_from_columns(rows)
    name = name or data_file.stem
    reason = f"--dataset {dataset!r} is" if dataset else f"the file name {data_file.name!r} names"
    return build(name, kind, known=False), (
        f"{reason} no dataset profile ({', '.join(sorted([*KNOWN, *OWN]))}); evaluating as {kind} from the file's "
        "columns")


def override(profile: Profile, *, system: str | None = None, image_backend: str | None = None,
             max_patches: int | None = None, cot: bool = False, max_new_tokens: int | None = None) -> Profile:
    """The command-line overrides (`--system ''` removes the system message)."""
    changes: dict[str, Any] = {"cot": profile.cot or cot}
    if system is not None:
        changes["system"] = system or None
    if image_backend is not None:
        changes["image_backend"] = image_backend
    if max_patches is not None:
        changes["max_patches"] = max_patches
    if max_new_tokens is not None:
        changes["max_new_tokens"] = max_new_tokens
    return dataclasses.replace(profile, **changes)
