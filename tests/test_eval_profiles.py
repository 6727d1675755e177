"""Dataset profiles of `internvl-jax eval` against VLMEvalKit: prompts, tiles, answer reading and the headline
metrics, with no model. Every expected value is written out by hand from VLMEvalKit's code for InternVL
(`vlmeval/vlm/internvl/internvl_chat.py` + `utils.py`, `vlmeval/dataset/image_mcq.py`, `image_yorn.py`,
`image_vqa.py`, `utils/multiple_choice.py`, `utils/yorn.py`, `utils/vqa_eval.py`, `utils/matching_util.py`)
applied to the same rows, as the comments show."""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from internvl_jax.cli import main as cli_main
from internvl_jax.processing.loading import InputError, Reworked, load_rgb, open_image
from internvl_jax.runners import eval as ev
from internvl_jax.runners import profiles as pf
from internvl_jax.runners import vlmeval_metrics as vm
from internvl_jax.runners.records import TableRow, read_table
from internvl_jax.runners.scoring import extract_option
from tests import fixtures as F

SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def png_b64(h: int = 20, w: int = 30, seed: int = 0, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(F.synthetic_rgb(h, w, seed)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


IMG = png_b64() * 2  # longer than 64 characters: data, not a reference to another row


def items(name: str, *rows: dict, **overrides) -> tuple[pf.Profile, list[ev.EvalItem]]:
    profile = pf.override(pf.build(name, pf.KNOWN.get(name, pf.VQA)), **overrides)
    table = [TableRow(f"row {k + 1}", {"index": k + 1, **r}) for k, r in enumerate(rows)]
    return profile, ev.items_from_rows(table, Path(f"{name}.tsv"), profile=profile)


def prompt(name: str, row: dict, **overrides) -> str:
    profile, (item,) = items(name, row, **overrides)
    return item.prompt(profile)


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows([header, *rows])
    return path


# ----- choosing a profile -----
def test_profiles_by_name_and_fallback_by_columns():
    # VLMEvalKit's names, also as the end of a predictions file's name (MODEL_DATASET.xlsx).
    assert pf.name_from_file(Path("MMBench_DEV_EN.tsv")) == "MMBench_DEV_EN"
    assert pf.name_from_file(Path("out/InternVL3-8B_MMBench_DEV_CN_V11.xlsx")) == "MMBench_DEV_CN_V11"
    assert pf.name_from_file(Path("mybench.tsv")) is None
    profile, notice = pf.choose(None, Path("mybench.tsv"), [{"A": "x", "B": "y", "answer": "A"}])
    assert (profile.kind, profile.known) == ("MCQ", False) and "evaluating as MCQ" in notice
    assert pf.choose(None, Path("x.tsv"), [{"answer": "Yes"}, {"answer": "No"}])[0].kind == "Y/N"
    assert pf.choose(None, Path("x.tsv"), [{"answer": "Yes"}, {"answer": "3"}])[0].kind == "VQA"
    # --dataset wins over the file name; known names need no notice.
    profile, notice = pf.choose("POPE", Path("MME.tsv"), [])
    assert (profile.name, profile.metric, notice) == ("POPE", "pope", None)
    # Every setting is recorded; the command-line overrides replace the profile's.
    p = pf.override(pf.build("MME", "Y/N"), system="", image_backend="torchvision", max_patches=2, cot=True,
                    max_new_tokens=9)
    assert p.as_dict() == {"name": "MME", "kind": "Y/N", "prompt": "mme", "metric": "mme", "max_patches": 2,
                           "hit_rule": "mean", "upscale_first": False, "system": None,
                           "image_backend": "torchvision", "max_new_tokens": 9, "cot": True, "known": True}
    # The defaults: InternVL3's own system message, PIL resizing, VLMEvalKit's 4096 new tokens.
    d = pf.build("AI2D_TEST", "MCQ")
    assert (d.system, d.image_backend, d.max_new_tokens) == (SYSTEM, "pil", 4096)


# ----- prompts (InternVLChat.build_prompt) -----
def test_prompts_per_dataset_family():
    mcq = {"question": "What is shown?", "hint": "A photo.", "A": "cat", "B": "dog", "answer": "A", "image": IMG}
    assert prompt("MMBench_DEV_EN", mcq) == f"A photo.\nWhat is shown?\nA. cat\nB. dog\n{LETTER}"
    cn = {**mcq, "question": "这是什么？", "hint": None}
    assert prompt("CCBench", cn) == "这是什么？\nA. cat\nB. dog\n请直接回答选项字母。"
    # MMMU's open questions (no options): build_multi_choice_prompt's direct-answer instruction.
    assert prompt("MMMU_DEV_VAL", {"question": "What is <image 1>?", "answer": "x", "image": IMG}) == (
        "What is <image 1>?\nAnswer the question directly.")
    # USE_COT=1: build_mcq_cot_prompt drops the letter instruction and appends the reasoning one.
    cot = prompt("MMStar", mcq, cot=True)
    assert cot.startswith("A photo.\nWhat is shown?\nA. cat\nB. dog\nAnswer the preceding multiple choice question. "
                          "The last line of your response should follow this format: 'Answer: \\boxed{$LETTER}'")
    assert cot.endswith("Think step by step logically, considering all relevant information before answering.")
    yn = {"question": "Is there a dog in this image?", "answer": "Yes", "image": IMG}
    assert prompt("MME", yn) == f"Is there a dog in this image? {SHORT}"  # joined with a space
    assert prompt("HallusionBench", yn) == f"Is there a dog in this image? Please answer yes or no. {SHORT}"
    assert prompt("AMBER", yn) == f"Is there a dog in this image? Please answer yes or no. {SHORT}"
    assert prompt("POPE", yn) == "Is there a dog in this image?"  # the bare question
    assert prompt("POPE", yn, cot=True) == "Is there a dog in this image?"  # no CoT for yes/no sets
    vqa = {"question": "What is the max?", "answer": "3", "image": IMG, "hint": "ignored"}
    for name in ("ChartQA_TEST", "DocVQA_VAL", "InfoVQA_VAL", "TextVQA_VAL", "OCRVQA_TEST", "GQA_TestDev_Balanced",
                 "OCRBench", "unknown_vqa"):
        assert prompt(name, vqa) == f"What is the max?\n{SHORT}", name
    assert prompt("ChartQA_TEST", vqa, cot=True) == f"What is the max?\n{SHORT}"  # short-answer sets: no CoT
    assert prompt("MathVista_MINI", vqa) == "What is the max?"
    assert prompt("MathVista_MINI", vqa, cot=True) == "What is the max?\n" + pf.QA_COT
    assert pf.QA_COT.startswith("Answer the preceding question. The last line of your response should follow this "
                                "format: 'Answer: \\boxed{$FINAL_ANSWER}' (without quotes)")


def test_conversation_system_message_and_show_prompts(tmp_path, capsys):
    model = tmp_path / "model"
    F.write_processor_files(model)  # the InternVL3-1B-hf tokenizer and chat template; no weights
    data = write_tsv(tmp_path / "MME.tsv", ["index", "category", "image", "question", "answer", "image_path"], [
        [1, "color", IMG, "Is it red?", "Yes", "color/1.jpg"],
        [2, "color", "1", "Is it blue?", "No", "color/1.jpg"],
        [3, "color", "", "no image: dropped", "No", "color/2.jpg"]])
    assert cli_main(["eval", "--model", str(model), "--show-prompts", "5", str(data)]) == 0
    out, err = capsys.readouterr()
    # The original chat code's layout: system turn, then "<image>\n" + prompt (the -hf template's image block
    # is "<IMG_CONTEXT>\n", expanded to <img>...</img> when tokenized).
    assert out == (
        "### record 1 (row 1): 1 image(s), at most 6 tiles each (<IMG_CONTEXT> stands for 256 tokens a tile)\n"
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nIs it red? {SHORT}<|im_end|>\n"
        "<|im_start|>assistant\n\n"
        "### record 2 (row 2): 1 image(s), at most 6 tiles each (<IMG_CONTEXT> stands for 256 tokens a tile)\n"
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nIs it blue? {SHORT}<|im_end|>\n"
        "<|im_start|>assistant\n\n")
    assert "1 rows of" in err and "empty 'image' cell" in err  # row 3: left out, as VLMEvalKit leaves it out
    # --system '' removes the system message.
    assert cli_main(["eval", "--model", str(model), "--show-prompts", "1", "--system", "", str(data)]) == 0
    assert "<|im_start|>system" not in capsys.readouterr().out


def test_tile_budget_upscale_and_reencoding():
    one = {"question": "q", "A": "x", "B": "y", "answer": "A", "image": IMG}
    for name, tiles in (("MMBench_DEV_EN", 6), ("ChartQA_TEST", 12), ("OCRVQA_TEST", 12), ("DocVQA_VAL", 18),
                        ("InfoVQA_VAL", 24), ("OCRBench", 24), ("MMMU_DEV_VAL", 12), ("POPE", 6)):
        profile, its = items(name, one)
        assert ev.requests_for(its, profile=profile)[0].max_patches == tiles, name
    # Several images: max(1, min(max_num, 64 // images)) each.
    many = {**one, "image": str([IMG] * 12)}
    profile, its = items("MMBench_DEV_EN", many)
    assert ev.requests_for(its, profile=profile)[0].max_patches == 5
    profile, its = items("MMBench_DEV_EN", {**one, "image": str([IMG] * 100)})
    assert ev.requests_for(its, profile=profile)[0].max_patches == 1
    profile, its = items("MMBench_DEV_EN", one, max_patches=2)  # --max-patches overrides
    assert ev.requests_for(its, profile=profile)[0].max_patches == 2
    # MMMU: the first image is upscaled 2x; the others are not.
    profile, its = items("MMMU_DEV_VAL", {**one, "image": str([IMG, IMG])})
    request = ev.requests_for(its, profile=profile)[0]
    blocks = [b for b in request.conversation[1]["content"] if b["type"] == "image"]
    assert [b.get("upscale") for b in blocks] == [2, None]
    assert request.conversation[0]["content"][0]["text"] == SYSTEM and request.generation["max_new_tokens"] == 4096
    # A base64 image stored under a .jpg image_path is saved as JPEG by VLMEvalKit first (dump_image).
    mme, its = items("MME", {"question": "q", "answer": "Yes", "category": "color", "image": IMG,
                             "image_path": "color/1.jpg"}, {"question": "q", "answer": "No", "image": IMG})
    assert [ev.conversation(i, None, mme)[0]["content"][0].get("save_as") for i in its] == ["jpeg", None]


def test_reworked_images_and_no_exif_rotation(tmp_path):
    rgb = F.synthetic_rgb(30, 40, 3)
    uri = "data:image/png;base64," + png_b64(30, 40, 3)
    # Upscaled as VLMEvalKit's load_image(upscale=True): PIL bilinear to twice the size.
    expected = Image.fromarray(rgb).resize((80, 60), Image.BILINEAR)
    assert (load_rgb(Reworked(uri, upscale=2), "pil", "img") == np.asarray(expected)).all()
    # Saved as .jpg (Pillow's default quality) and read back.
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    assert (load_rgb(Reworked(uri, save_as="jpeg"), "pil", "img") == np.asarray(Image.open(buf))).all()
    with pytest.raises(InputError, match="invalid base64"):
        load_rgb(Reworked("data:image/png;base64,!!!!", save_as="jpeg"), "pil", "row 3 image")
    # An EXIF orientation (6: rotate 90 degrees) is applied by default and ignored for evaluation.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, exif=exif.tobytes())
    assert open_image(str(path), "x").size == (30, 40)
    assert open_image(str(path), "x", exif_transpose=False).size == (40, 30)


# ----- reading answers -----
OPTS = {"A": "cat", "B": "dog"}


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"),
    ("I think it is (A).", "A"),
    # A lone letter counts only among the last four words; then "(the) (correct) answer is X" is looked for.
    ("B is what some would say, but look again at the picture", None),
    ("Looking at the whole picture carefully, the answer is B.", "B"),
    ("The correct answer is **B**, not A.", "B"),  # two letters, but "answer is B"
    ("Failed to obtain answer via API. B", None),  # an API failure chooses nothing
    ("a dog", "B"),  # the option's text
    ("there is a small grey cat sitting on the mat", None),  # text matching gives up: > 2 x the options' length
    ("Cannot determine the answer", "Z"),
])
def test_newer_can_infer(answer, expected):
    assert extract_option(answer, OPTS) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes", "Yes"), ("No.", "No"), ("Yes, there is.", "Yes"), ("no, it isn't", "No"), ("yes and no", "Unknown"),
    ("There is a dog", "Unknown"), ("Nope", "Unknown"), ("YES!", "Yes"),
])
def test_yes_no_extraction(text, expected):
    assert vm.yes_no(text) == expected


# ----- metrics -----
def run(name: str, rows: list[dict], predictions: list[str | None]) -> tuple[list[dict], dict]:
    profile, its = items(name, *rows)
    results = [{"text": p, "error": None if p is not None else "record: broken image"} for p in predictions]
    return ev.score(its, results, profile)


def test_mmbench_circular_evaluation(tmp_path):
    # Four questions, each with two rotated copies (index + 1e6, + 2e6) whose right letter moves.
    rows, preds = [], []
    plan = {1: ["A", "B", "C"], 2: ["A", "B", "A"], 3: ["B", "B", "C"], 4: ["A", "hmm", "C"]}
    for q, said in plan.items():
        for r, answer in enumerate("ABC"):
            rows.append({"index": q + r * 1_000_000, "question": f"q{q}", "A": "x", "B": "y", "C": "z",
                         "answer": answer, "image": IMG,
                         "category": "coarse_perception" if q < 3 else "logic_reasoning",
                         "l2-category": "Perception" if q < 3 else "Reasoning"})
            preds.append(said[r])
    profile = pf.build("MMBench_DEV_EN", "MCQ")
    table = [TableRow(f"row {k + 1}", r) for k, r in enumerate(rows)]
    its = ev.items_from_rows(table, Path("MMBench_DEV_EN.tsv"), profile=profile)
    _, summary = ev.score(its, [{"text": p} for p in preds], profile)
    # Row by row 9 of 12 are right (q2's last copy, q3's first and q4's unreadable middle one are not)...
    assert (summary["multiple_choice"]["correct"], summary["multiple_choice"]["total"]) == (9, 12)
    # ...but only q1 has every copy right: VLMEvalKit's number is 1/4.
    assert summary["circular"]["accuracy"] == 0.25 and summary["circular"]["total"] == 4
    # report_acc over the original rows: Overall, l2-categories, categories (MMBench's abbreviations).
    path = ev.write_report(summary, tmp_path / "MMBench_DEV_EN_acc.csv")
    assert path.read_text() == ('"split","Overall","Perception","Reasoning","CP","LR"\n'
                                '"none","0.25","0.5","0.0","0.5","0.0"\n')
    # An index that is not an integer cannot be grouped: that row fails, by name.
    bad = ev.items_from_rows([TableRow("row 1", {**rows[0], "index": "q1"})], Path("m.tsv"), profile=profile)
    assert "circular evaluation (MMBench_DEV_EN) needs an integer index" in bad[0].error


def test_mmmu_open_questions_become_two_options():
    rows = [{"question": "Value?", "answer": "42", "image": IMG}, {"question": "Value?", "answer": "7", "image": IMG},
            {"question": "Pick", "A": "x", "B": "y", "answer": "B", "image": IMG}]
    preds, summary = run("MMMU_DEV_VAL", rows, ["It is 42", "Other Answers", "B"])
    # MMMU_preproc: A = the answer, B = 'Other Answers', right letter A.
    assert [p["extracted"] for p in preds] == ["A", "B", "B"] and [p["hit"] for p in preds] == [True, False, True]


def test_mme_rating(tmp_path):
    cats = ["OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters", "scene",
            "code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"]
    rows, preds = [], []
    for c in cats:
        for image in (1, 2):
            for q, answer in enumerate(("Yes", "No")):
                rows.append({"question": "q?", "answer": answer, "category": c, "image": IMG,
                             "image_path": f"{c}/{image}.jpg"})
                wrong = (c == "OCR" and image == 2 and q == 1) or (c == "code_reasoning" and image == 1)
                preds.append({"Yes": "No, there is not.", "No": "Yes, it is."}[answer] if wrong else
                             {"Yes": "Yes, there is.", "No": "No."}[answer])
    _, summary = run("MME", rows, preds)
    assert (summary["yes_no"]["correct"], summary["yes_no"]["total"]) == (53, 56)
    report = summary["vlmevalkit"]
    scores = dict(zip(report["header"], report["rows"][0], strict=True))
    # OCR: accuracy 3/4 + accuracy+ 1/2 (one image with both right) = 75 + 50; code_reasoning: 50 + 50.
    assert scores["OCR"] == 125.0 and scores["code_reasoning"] == 100.0 and scores["color"] == 200.0
    assert scores["perception"] == 125.0 + 9 * 200 and scores["reasoning"] == 100.0 + 3 * 200
    assert report["header"][:3] == ["perception", "reasoning", "OCR"] and report["file"] == "MME_score.csv"
    # A subset without some categories cannot be summed: the reason, not a wrong number.
    _, partial = run("MME", rows[:8], preds[:8])
    assert "these have no rows: celebrity" in partial["vlmevalkit"]["error"]


def test_hallusion_pope_amber_ratings():
    # HallusionBench: set / figure / question ids are the index's 4th-6th '_' parts.
    rows = [{"index": f"VS_chart_0_0_{fig}_{q}", "question": "q", "answer": "Yes", "category": "chart",
             "l2-category": "VS", "image": IMG} for fig in (0, 1) for q in (0, 1)]
    table = [TableRow(f"row {k + 1}", r) for k, r in enumerate(rows)]
    profile = pf.build("HallusionBench", "Y/N")
    its = ev.items_from_rows(table, Path("HallusionBench.tsv"), profile=profile)
    _, summary = ev.score(its, [{"text": t} for t in ("Yes", "Yes.", "yes", "No")], profile)
    # aAcc 3/4; fAcc: figure 0 all right, figure 1 not -> 1/2; qAcc: question 0 right on both figures -> 1/2.
    assert summary["vlmevalkit"]["rows"] == [["Overall", 75.0, 50.0, 50.0], ["chart", 75.0, 50.0, 50.0],
                                             ["VS", 75.0, 50.0, 50.0]]
    # POPE: a row listing two categories counts in each, and twice overall.
    rows = [{"question": "q", "answer": a, "category": c, "image": IMG} for a, c in (
        ("Yes", "adversarial"), ("No", "adversarial"), ("Yes", "popular"), ("No", "popular"),
        ("Yes", "adversarial,popular"))]
    _, summary = run("POPE", rows, ["Yes", "Yes", "No", "No", "yes"])
    # Overall over 6 rows: tp 3, fp 1, fn 1 -> precision = recall = F1 = 0.75; accuracy 4/6.
    # adversarial: tp 2, fp 1 -> precision 2/3, recall 1, F1 0.8; popular: tp 1, fn 1 -> precision 1, recall 1/2.
    got = {r[0]: r[1:] for r in summary["vlmevalkit"]["rows"]}
    assert got["Overall"] == pytest.approx([75.0, 400 / 6, 75.0, 75.0])
    assert got["adversarial"] == pytest.approx([80.0, 200 / 3, 200 / 3, 100.0])
    assert got["popular"] == pytest.approx([200 / 3, 200 / 3, 100.0, 50.0])
    assert summary["vlmevalkit"]["header"] == ["split", "Overall", "acc", "precision", "recall"]
    # AMBER: the answer is compared case-insensitively; categories merged, then averaged.
    rows = [{"question": "q", "answer": a, "category": c, "image": IMG} for a, c in (
        ("yes", "discriminative-attribute-state"), ("no", "discriminative-attribute-number"),
        ("yes", "discriminative-hallucination"), ("no", "relation"))]
    _, summary = run("AMBER", rows, ["Yes", "Yes", "Yes", "No"])
    assert summary["vlmevalkit"]["header"] == ["Attribute", "Existence", "Relation", "Avg ACC"]
    assert summary["vlmevalkit"]["rows"] == [[50.0, 100.0, 100.0, 250 / 3]]


def test_vqa_metrics_against_the_reference():
    # ChartQA: relaxed accuracy, 5% of the *reference*; any reference.
    rows = [{"question": "q", "answer": a, "image": IMG} for a in ("100.3", "95.5", "Yes")]
    preds, summary = run("ChartQA_TEST", rows, ["95.5", "100.3", "yes"])
    assert [p["score"] for p in preds] == [1.0, 0.0, 1.0]
    assert summary["vlmevalkit"]["header"] == ["Overall"]
    assert summary["vlmevalkit"]["rows"] == [[pytest.approx(200 / 3)]]
    # DocVQA: ANLS -- 1 - edit distance / length, 0 below 0.5; the best reference counts.
    rows = [{"question": "q", "answer": "['hello world', 'hi there']", "image": IMG},
            {"question": "q", "answer": "abc", "image": IMG}]
    preds, _ = run("DocVQA_VAL", rows, ["Helo world", "xyz"])
    assert preds[0]["score"] == pytest.approx(1 - 1 / 11) and preds[1]["score"] == 0.0
    # TextVQA: VQA score -- per reference, min(1, other references equal to the answer / 3), averaged, after
    # normalising ("Cat." -> "cat"). References 3 x cat, 7 x dog, answer cat: each 'cat' reference sees 2 other
    # 'cat's (2/3), each 'dog' one sees 3 (1): (3 x 2/3 + 7 x 1) / 10 = 0.9.
    rows = [{"question": "q", "answer": str(["cat"] * 3 + ["dog"] * 7), "image": IMG, "category": "c1"}]
    preds, summary = run("TextVQA_VAL", rows, ["Cat."])
    assert preds[0]["score"] == pytest.approx(0.9) and summary["open"]["vqa_score"]["correct"] == pytest.approx(0.9)
    assert summary["vlmevalkit"]["header"] == ["Overall", "c1"]
    # OCRVQA: exact (stripped, case-insensitive) against any reference.
    preds, _ = run("OCRVQA_TEST", [{"question": "q", "answer": "['Dune', 'dune (novel)']", "image": IMG}], [" dune "])
    assert preds[0]["score"] == 1.0


def test_ocrbench_and_mathvista():
    rows = [{"question": "q", "answer": "['Hello']", "category": "Regular Text Recognition", "image": IMG},
            {"question": "q", "answer": "['x^{2} + 1']", "category": "Handwritten Mathematical Expression Recognition",
             "image": IMG},
            {"question": "q", "answer": "['42']", "category": "Doc-oriented VQA", "image": IMG}]
    _, summary = run("OCRBench", rows, ["it says HELLO there", "x^{2}+1", "41"])
    assert summary["vlmevalkit"]["scores"] == {
        "Text Recognition": 1, "Scene Text-centric VQA": 0, "Doc-oriented VQA": 0, "Key Information Extraction": 0,
        "Handwritten Mathematical Expression Recognition": 1, "Final Score": 2, "Final Score Norm": 0.2}
    assert summary["vlmevalkit"]["file"] == "OCRBench_score.json"
    base = {"question": "q", "image": IMG, "task": "figure question answering", "skills": "['arithmetic reasoning']"}
    rows = [{**base, "question_type": "multi_choice", "answer_type": "text", "choices": "['3/11', '8/11']",
             "answer_option": "B", "answer": "8/11"},
            {**base, "question_type": "free_form", "answer_type": "integer", "answer": "14"},
            {**base, "question_type": "free_form", "answer_type": "float", "answer": "0.6"}]
    preds, summary = run("MathVista_MINI", rows, ["The correct answer is (B) 8/11.", "14", "The answer is 0.6"])
    # Prefetched: the letter, the whole integer; "The answer is 0.6" would go to the GPT judge: wrong here.
    assert [p["score"] for p in preds] == [1.0, 1.0, 0.0]
    assert summary["vlmevalkit"]["rows"][0] == ["Overall", 3, 2, 2, pytest.approx(200 / 3), pytest.approx(200 / 3)]


# ----- inputs -----
def test_bom_and_empty_image_rows(tmp_path):
    data = tmp_path / "MMStar.tsv"
    data.write_bytes(f"\ufeffindex\tquestion\tA\tB\tanswer\timage\n1\tq\tx\ty\tA\t{IMG}\n2\tq\tx\ty\tB\t\n"
                     .encode())
    rows = read_table(data)
    assert rows[0].fields["index"] == 1  # not '\ufeffindex'
    kept, dropped = ev.without_empty_images(rows)
    assert dropped == 1 and [r.fields["index"] for r in kept] == [1]
    assert ev.items_from_rows(kept, data)[0].error is None


def test_score_vlmevalkit_predictions_and_bad_files(tmp_path, capsys):
    header = ["index", "question", "A", "B", "answer", "category", "l2-category", "prediction"]
    rows = [[1, "q1", "x", "y", "A", "coarse_perception", "Perception", "A"],
            [1_000_001, "q1", "y", "x", "B", "coarse_perception", "Perception", "B"],
            [2, "q2", "x", "y", "B", "logic_reasoning", "Reasoning", "A"],
            [1_000_002, "q2", "y", "x", "A", "logic_reasoning", "Reasoning", "A"]]
    pred = write_tsv(tmp_path / "InternVL3-1B_MMBench_DEV_EN.tsv", header, rows)
    assert cli_main(["eval", "--score", str(pred)]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["dataset"]["name"] == "MMBench_DEV_EN" and summary["circular"]["accuracy"] == 0.5
    assert (tmp_path / "InternVL3-1B_MMBench_DEV_EN_acc.csv").read_text() == (
        '"split","Overall","Perception","Reasoning","CP","LR"\n"none","0.5","1.0","0.0","1.0","0.0"\n')
    # Nothing of the user's is replaced: a second scoring of the same file refuses, naming the file.
    assert cli_main(["eval", "--score", str(pred)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "InternVL3-1B_MMBench_DEV_EN_acc.csv exists already" in err
    # A predictions file for another dataset: its questions are not the data file's.
    other = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", header[:-1], [[r[0], "other " + r[1], *r[2:-1]] for r in rows])
    assert cli_main(["eval", "--score", str(pred), "--data", str(other), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "record 1 has another question than in" in err and "another dataset" in err
    # A profile's metric needs columns the file lacks (MME without 'category').
    mme = write_tsv(tmp_path / "MME.tsv", ["index", "question", "answer", "prediction"], [[1, "q", "Yes", "Yes"]])
    assert cli_main(["eval", "--score", str(mme)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a 'category' column" in err
    # No prediction column / xlsx without openpyxl: one line each.
    assert cli_main(["eval", "--score", str(other)]) == 2
    assert "has no 'prediction' column" in capsys.readouterr().err
    xlsx = tmp_path / "x_MME.xlsx"
    xlsx.write_bytes(b"PK")
    saved = sys.modules.get("openpyxl")
    sys.modules["openpyxl"] = None  # as if not installed
    try:
        assert cli_main(["eval", "--score", str(xlsx)]) == 2
    finally:
        if saved is None:
            del sys.modules["openpyxl"]
        else:
            sys.modules["openpyxl"] = saved
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'internvl-jax[xlsx]'" in err


def test_score_vlmevalkit_xlsx(tmp_path, capsys):
    openpyxl = pytest.importorskip("openpyxl")  # the test extra has it; the runtime package does not need it
    book = openpyxl.Workbook()
    sheet = book.active
    for row in (["index", "question", "answer", "category", "image_path", "prediction"],
                [1, "Is it red?", "Yes", "color", "color/1.jpg", "Yes."],
                [2, "Is it blue?", "No", "color", "color/1.jpg", "Yes"],
                [3, "Is it round?", "Yes", "count", "count/1.jpg", "No"], [4, "q", "No", "count", "count/1.jpg", None]):
        sheet.append(row)
    xlsx = tmp_path / "InternVL3-1B_HallusionBench.xlsx"
    book.save(xlsx)
    # HallusionBench needs its l2-category column: this file has none (it is MME-like), so it is refused...
    assert cli_main(["eval", "--score", str(xlsx)]) == 2
    assert "the HallusionBench profile (hallusion metric) needs a 'l2-category' column" in capsys.readouterr().err
    # ...and scored with the profile that fits. A missing prediction ('None' in the sheet) is no answer.
    assert cli_main(["eval", "--score", str(xlsx), "--dataset", "AMBER"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["yes_no"]["correct"] == 1 and summary["vlmevalkit"]["rows"] == [[50.0, 0.0, 25.0]]
    assert (tmp_path / "InternVL3-1B_HallusionBench_score.csv").is_file()


def test_score_our_predictions_for_another_dataset(tmp_path, capsys):
    data = write_tsv(tmp_path / "POPE.tsv", ["index", "question", "answer", "category", "image"],
                     [[1, "q", "Yes", "popular", IMG], [2, "q", "No", "popular", IMG]])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    preds = run_dir / "predictions.jsonl"
    preds.write_text("".join(json.dumps({"index": i, "prediction": p, "answer": a}) + "\n"
                             for i, p, a in ((1, "Yes.", "Yes"), (2, "Yes", "No"))))
    assert cli_main(["eval", "--score", str(preds), "--data", str(data)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vlmevalkit"]["rows"][0][:3] == ["Overall", pytest.approx(200 / 3), 50.0]
    assert (run_dir / "predictions_score.csv").is_file()
    preds.write_text(json.dumps({"index": 7, "prediction": "Yes"}) + "\n")
    assert cli_main(["eval", "--score", str(preds), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "record 7 is not in" in err and "another dataset" in err
