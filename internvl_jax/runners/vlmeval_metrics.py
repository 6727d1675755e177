"""VLMEvalKit's answer reading and headline metrics, written from its rules (no pandas): yes/no extraction,
VQA score / ANLS / relaxed accuracy / accuracy per row, and the tables it writes (`*_acc.csv`, `*_score.csv`).

Sources, all in open-compass/VLMEvalKit: `vlmeval/dataset/utils/yorn.py` (YOrN_Extraction, MME / HallusionBench /
POPE / AMBER / default ratings), `vlmeval/dataset/utils/vqa_eval.py` (process_line, hit_calculate),
`vlmeval/smp/misc.py` (process_punctuation), `vlmeval/dataset/utils/multiple_choice.py` (report_acc, circular
evaluation), `vlmeval/dataset/image_vqa.py` (OCRBench), `vlmeval/dataset/utils/mathvista.py` (post_check).
Each function returns plain numbers; a rating that cannot be computed from the rows raises ValueError.
"""

from __future__ import annotations

import ast
import csv
import io
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from internvl_jax.runners.scoring import extract_option, format_value, relaxed_correctness

# ----- text normalisation of the VQA evaluation (GT-Vision-Lab's VQA eval, as VLMEvalKit carries it) -----
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
# `periodStrip.sub('', text, re.UNICODE)` passes re.UNICODE (32) as the *count*: at most 32 periods go.
_PERIOD_LIMIT = int(re.UNICODE)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
# The contracted forms the VQA eval restores; each is looked up by its spellings with one apostrophe missing
# (all of it when it has one). Words are lower-cased first, so the table's capitalised keys never apply.
_CONTRACTED = (
    "'ow's'at 'twas ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am might've mightn't mightn't've "
    "must've mustn't needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'd've y'all'll you'd "
    "you'd've you'll you're you've").split()


def _contractions() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        marks = [i for i, c in enumerate(word) if c == "'"]
        for i in marks if len(marks) > 1 else marks[:1]:
            table[word[:i] + word[i + 1:] if len(marks) > 1 else word.replace("'", "")] = word
    table["somebody'd"] = "somebodyd"  # the table's one entry that goes the other way
    return table


CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
    """`vlmeval.smp.process_punctuation`: a punctuation mark next to a space (or any text with a comma inside a
    number) is deleted, else replaced by a space; periods not between digits go (the first 32)."""
    out = text
    joined = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text) or joined else " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_answer(text: str) -> str:
    """`vqa_eval.process_answer`: whitespace, punctuation, number words, articles, contractions."""
    text = process_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


# ----- yes / no -----
def yes_no(prediction: Any) -> str:
    """`YOrN_Extraction`: 'Yes' / 'No' when exactly one of the words occurs, else 'Unknown'."""
    words = process_punctuation(format_value(prediction).lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


# ----- open questions: per-row matches and the per-row hit -----
def reference_answers(answer: Any) -> list[str]:
    """`process_line`: an answer cell that evaluates to a list is the list of references, else one reference.
    (literal_eval, where VLMEvalKit calls eval: the same for every list a benchmark file holds.)"""
    text = format_value(answer)
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        parsed = None
    return [format_value(a) for a in parsed] if isinstance(parsed, list) else [text]


def _levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, cb in enumerate(b):
        current = [j + 1]
        for i, ca in enumerate(a):
            current.append(previous[i] if ca == cb else 1 + min(previous[i], previous[i + 1], current[-1]))
        previous = current
    return previous[-1]


def anls_distance(reference: str, prediction: str) -> float:
    """`anls_compute`: normalised edit distance of the lower-cased, space-collapsed texts (the length is of
    the texts as given, upper-cased)."""
    dist = _levenshtein(" ".join(reference.strip().lower().split()), " ".join(prediction.strip().lower().split()))
    length = max(len(reference.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else dist / length


def _vqa_score_matches(prediction: str, answers: Sequence[str]) -> list[float]:
    refs = [process_answer(a) for a in answers]
    pred = process_answer(prediction)
    return [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]


MATCHERS: dict[str, Callable[[str, Sequence[str]], list[float]]] = {
    "vqa_score": _vqa_score_matches,
    "anls": lambda p, refs: [anls_distance(r, p) for r in refs],
    "relaxed_accuracy": lambda p, refs: [float(relaxed_correctness(r, p.strip())) for r in refs],
    "accuracy": lambda p, refs: [float(r.strip().lower() == p.strip().lower()) for r in refs],
}
ANLS_THRESHOLD = 0.5


def open_hit(metric: str, hit_rule: str, prediction: Any, answer: Any) -> float:
    """One row's score: `process_line(method=metric)` then `hit_calculate`'s rule for the dataset
    ('mean', 'max' or 'anls')."""
    matches = MATCHERS[metric](format_value(prediction), reference_answers(answer))
    if hit_rule == "anls":
        similarity = 1 - min(matches)
        return 0.0 if similarity < ANLS_THRESHOLD else similarity
    return max(matches) if hit_rule == "max" else sum(matches) / len(matches)


# ----- tables -----
Table = tuple[list[str], list[list[Any]]]  # header, rows
MMB_ABBREVIATIONS = {
    "coarse_perception": "CP", "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C", "logic_reasoning": "LR", "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}


def _mean(values: Sequence[float]) -> float:
    return sum(float(v) for v in values) / len(values) if values else float("nan")


def report_acc(rows: Sequence[Mapping[str, Any]]) -> Table:
    """`report_acc` of multiple choice: one line per split ('none' without a split column): Overall, then each
    l2-category and category (sorted; MMBench's abbreviations). `rows` carry 'hit' and the group columns."""
    splits = sorted({format_value(r["split"]) for r in rows}) if any("split" in r for r in rows) else ["none"]

    def in_split(sp: str) -> list[Mapping[str, Any]]:
        return [r for r in rows if format_value(r.get("split", "none")) == sp]

    columns: dict[str, Callable[[str], float]] = {"Overall": lambda sp: _mean([r["hit"] for r in in_split(sp)])}
    for group in ("l2-category", "category"):
        if not any(r.get(group) is not None for r in rows):
            continue
        for ability in sorted({format_value(r.get(group)) for r in rows}):
            columns[MMB_ABBREVIATIONS.get(ability, ability)] = (
                lambda sp, g=group, a=ability: _mean([r["hit"] for r in in_split(sp) if format_value(r.get(g)) == a]))
    return ["split", *columns], [[sp, *(f(sp) for f in columns.values())] for sp in splits]


def circular_hits(rows: Sequence[Mapping[str, Any]]) -> dict[int, bool]:
    """MMBench's circular evaluation (`mcq_circular_eval` with exact matching): the question with index i
    (i < 1e6) is right only if every row with index % 1e6 == i was read as its answer. `rows`: 'index' (int),
    'extracted', 'answer'."""
    groups: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[int(r["index"] % 1e6)].append(r)
    return {int(r["index"]): all(x["extracted"] is not None and x["extracted"] == format_value(x["answer"])
                                 for x in groups[int(r["index"])])
            for r in rows if int(r["index"] % 1e6) == r["index"]}


def _need(rows: Sequence[Mapping[str, Any]], *columns: str, why: str) -> None:
    for c in columns:
        if any(r.get(c) is None for r in rows):
            raise ValueError(f"{why} needs the column '{c}' in every row")


def mme_rating(rows: Sequence[Mapping[str, Any]]) -> Table:
    """`MME_rating`: per category, accuracy + accuracy+ (both questions of an image right), x100; perception
    and reasoning are the sums of their categories. `rows`: 'category', 'image_key', 'score'."""
    _need(rows, "category", why="the MME rating")
    per: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        per[format_value(r["category"])][r["image_key"]].append(bool(r["score"]))
    scores = {}
    for category, images in per.items():
        plain = _mean([s for v in images.values() for s in v]) * 100
        if any(len(v) < 2 for v in images.values()):
            raise ValueError(f"the MME rating needs two questions per image (category {category!r} has an image "
                             "with one)")
        scores[category] = plain + _mean([v[0] * v[1] for v in images.values()]) * 100
    supers = {"perception": ["OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position",
                             "posters", "scene"],
              "reasoning": ["code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"]}
    out = {}
    for name, members in supers.items():
        missing = [m for m in members if m not in scores]
        if missing:
            raise ValueError(f"the MME rating sums {name} over its categories; these have no rows: "
                             f"{', '.join(missing)}")
        out[name] = sum(scores[m] for m in members)
    out.update(scores)
    return list(out), [list(out.values())]


def hallusion_rating(rows: Sequence[Mapping[str, Any]]) -> Table:
    """`Hallusion_rating`: aAcc (questions), fAcc (figures: all of a figure's questions right), qAcc (questions
    asked of several figures), x100, overall then per category and l2-category. The set, figure and question
    ids are the 4th-6th '_' parts of the index."""
    _need(rows, "l2-category", why="the HallusionBench rating")
    ids = []
    for r in rows:
        parts = format_value(r["index"]).split("_")
        if len(parts) < 6:
            raise ValueError(f"the HallusionBench rating reads set/figure/question ids from the index "
                             f"(X_X_X_set_figure_question); index {r['index']!r} has {len(parts)} parts")
        ids.append((format_value(r["l2-category"]), parts[3], parts[4], parts[5]))

    def all_right(sub: list[int], key: Callable[[tuple], tuple]) -> float:
        groups: dict[tuple, list[bool]] = defaultdict(list)
        for i in sub:
            groups[key(ids[i])].append(bool(rows[i]["score"]))
        return _mean([all(v) for v in groups.values()]) * 100

    def line(name: str, sub: list[int]) -> list[Any]:
        return [name, _mean([rows[i]["score"] for i in sub]) * 100, all_right(sub, lambda t: (t[0], t[1], t[2])),
                all_right(sub, lambda t: (t[0], t[1], t[3]))]

    out = [line("Overall", list(range(len(rows))))]
    for group in ("category", "l2-category"):
        if any(r.get(group) is not None for r in rows):
            for value in sorted({format_value(r.get(group)) for r in rows}):
                out.append(line(value, [i for i, r in enumerate(rows) if format_value(r.get(group)) == value]))
    return ["split", "aAcc", "fAcc", "qAcc"], out


def _f1(pairs: Sequence[tuple[bool, bool]]) -> tuple[float, float, float]:
    tp = sum(t and p for t, p in pairs)
    fp = sum(p and not t for t, p in pairs)
    fn = sum(t and not p for t, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return (2 * precision * recall / (precision + recall) if precision + recall else 0.0), precision, recall


def pope_rating(rows: Sequence[Mapping[str, Any]]) -> Table:
    """`POPE_rating`: F1 ('Overall'), accuracy, precision, recall of 'Yes', x100. A row whose category lists
    several ('adversarial,popular') counts once for each, in the overall numbers too."""
    exploded = [(r, c) for r in rows for c in (format_value(r["category"]).split(",")
                                                if r.get("category") is not None else [None])]

    def line(name: str, sub: list[Mapping[str, Any]]) -> list[Any]:
        f1, precision, recall = _f1([(r["answer"] == "Yes", r["extracted"] == "Yes") for r in sub])
        return [name, f1 * 100, _mean([r["score"] for r in sub]) * 100, precision * 100, recall * 100]

    out = [line("Overall", [r for r, _ in exploded])]
    for c in sorted({c for _, c in exploded if c is not None}):
        out.append(line(c, [r for r, k in exploded if k == c]))
    return ["split", "Overall", "acc", "precision", "recall"], out


AMBER_CATEGORIES = {
    "discriminative-attribute-state": "Attribute", "discriminative-attribute-number": "Attribute",
    "discriminative-attribute-action": "Attribute", "discriminative-hallucination": "Existence",
    "discriminative-relation": "Relation", "relation": "Relation",
}


def amber_rating(rows: Sequence[Mapping[str, Any]]) -> Table:
    """`AMBER_rating`: accuracy x100 per (merged) category and their mean ('Avg ACC')."""
    _need(rows, "category", why="the AMBER rating")
    per: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        c = format_value(r["category"])
        per[AMBER_CATEGORIES.get(c, c)].append(bool(r["score"]))
    scores = {k: _mean(v) * 100 for k, v in per.items()}
    scores["Avg ACC"] = _mean(list(scores.values()))
    return list(scores), [list(scores.values())]


def grouped_rating(rows: Sequence[Mapping[str, Any]], value: str = "score", split_column: bool = False) -> Table:
    """Overall and per category (then l2-category), sorted, x100: `default_rating` of yes/no sets and
    `ImageVQADataset.evaluate_heuristic` (which, given a split column, reports per split instead)."""
    scores = {}
    if split_column and any(r.get("split") is not None for r in rows):
        for sp in sorted({format_value(r.get("split")) for r in rows}):
            scores[sp] = _mean([r[value] for r in rows if format_value(r.get("split")) == sp]) * 100
        scores["Overall"] = _mean([r[value] for r in rows]) * 100
        return list(scores), [list(scores.values())]
    scores["Overall"] = _mean([r[value] for r in rows]) * 100
    for group in ("category",) if split_column else ("category", "l2-category"):
        present = [r for r in rows if r.get(group) is not None]
        for c in sorted({format_value(r[group]) for r in present}):
            scores[c] = _mean([r[value] for r in present if format_value(r[group]) == c]) * 100
    return list(scores), [list(scores.values())]


OCRBENCH_TEXT = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                 "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
OCRBENCH_OTHER = ("Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
                  "Handwritten Mathematical Expression Recognition")
HME = "Handwritten Mathematical Expression Recognition"


def ocrbench_hit(category: Any, prediction: Any, answer: Any) -> bool:
    """OCRBench: a reference contained in the prediction (lower-cased; for handwritten formulas without any
    spaces, case kept)."""
    predict = format_value(prediction)
    formula = format_value(category) == HME
    def norm(text: str) -> str:
        return text.strip().replace("\n", " ").replace(" ", "") if formula else text.lower().strip().replace("\n", " ")

    for ref in reference_answers(answer):
        if norm(ref) in norm(predict):
            return True
    return False


def ocrbench_rating(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """OCRBench's score (`_score.json`): right answers per part, their sum and the sum / 10."""
    counts = dict.fromkeys(OCRBENCH_TEXT + OCRBENCH_OTHER, 0)
    for r in rows:
        c = format_value(r.get("category"))
        if c not in counts:
            raise ValueError(f"the OCRBench score has no part for category {c!r} (index {r['index']!r})")
        counts[c] += bool(r["score"])
    out: dict[str, Any] = {"Text Recognition": sum(counts[c] for c in OCRBENCH_TEXT)}
    out.update({c: counts[c] for c in OCRBENCH_OTHER})
    out["Final Score"] = sum(out.values())
    out["Final Score Norm"] = float(out["Final Score"]) / 10
    return out


def mathvista_prefetch(row: Mapping[str, Any], prediction: Any) -> tuple[Any, bool]:
    """MathVista's judge-free step (`post_check(prefetch=True)`, then the check of `MathVista_acc`): a multiple-
    choice answer read by `can_infer` from the choices list, an integer / float answer parsed whole:
    (what was read or None, right). VLMEvalKit sends every row this step does not read to a GPT judge; here
    such a row counts as wrong, so the accuracy is a lower bound of VLMEvalKit's."""
    text = format_value(prediction)
    try:
        if row.get("question_type") == "multi_choice":
            choices = {chr(65 + i): v for i, v in enumerate(ast.literal_eval(format_value(row["choices"])))}
            got = extract_option(text, choices)
            return got, got is not None and got == format_value(row.get("answer_option"))
        kind = row.get("answer_type")
        if kind in ("integer", "float"):
            # A number is prefetched only when it parses and equals the answer (and is not 0: post_check
            # returns the number itself, and 0 reads as "not prefetched"); the rest would go to the judge.
            cast = int if kind == "integer" else float
            got = cast(text)
            right = got == cast(format_value(row["answer"]))
            return (got if right and got else None), right and bool(got)
    except (ValueError, SyntaxError, TypeError, KeyError):
        pass
    return None, False


def mathvista_rating(rows: Sequence[Mapping[str, Any]]) -> Table:
    """`MathVista_acc` over the prefetched rows: per task and skill, total, prefetched, right, both rates."""
    tot: dict[str, int] = defaultdict(int)
    fetch: dict[str, int] = defaultdict(int)
    hit: dict[str, int] = defaultdict(int)
    for r in rows:
        skills = r.get("skills")
        try:
            skills = ast.literal_eval(format_value(skills))
        except (ValueError, SyntaxError):
            skills = [skills]
        keys = ["Overall", *(format_value(s) for s in skills), format_value(r.get("task"))]
        for k in dict.fromkeys(keys):
            tot[k] += keys.count(k)
            fetch[k] += keys.count(k) * (r["extracted"] is not None)
            hit[k] += keys.count(k) * bool(r["score"])
    return (["Task&Skill", "tot", "prefetch", "hit", "prefetch_rate", "acc"],
            [[k, tot[k], fetch[k], hit[k], fetch[k] / tot[k] * 100, hit[k] / tot[k] * 100] for k in tot])


def csv_text(table: Table) -> str:
    """A table as VLMEvalKit's `dump` writes a csv (`to_csv(index=False, quoting=QUOTE_ALL)`): every cell
    quoted, floats as Python's repr."""
    header, rows = table
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[repr(v) if isinstance(v, float) else v for v in row] for row in rows])
    return out.getvalue()
