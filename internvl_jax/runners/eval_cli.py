"""The parts of `internvl-jax eval` that need no model: choosing the dataset profile, `--show-prompts N`
(the prompts as the model sees them) and `--score PREDICTIONS` (scoring answers made earlier, ours or
VLMEvalKit's)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from internvl_jax.runners import eval as ev
from internvl_jax.runners import profiles as pf
from internvl_jax.runners.profiles import Profile
from internvl_jax.runners.records import TableRow, id_key, iter_jsonl, read_table
from internvl_jax.runners.scoring import format_value

IMAGE_BACKENDS = ("pil", "torchvision")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_file", nargs="?", metavar="DATA", help="the benchmark file (same as --data)")
    p.add_argument("--dataset", help="VLMEvalKit dataset name whose profile to use (prompt, tiles, system "
                                     "message, metric); default: from the data file's name")
    p.add_argument("--cot", action="store_true", help="chain-of-thought prompts (VLMEvalKit's USE_COT=1)")
    p.add_argument("--image-backend", choices=IMAGE_BACKENDS, help="image resizing to reproduce (profile: pil)")
    p.add_argument("--show-prompts", type=int, metavar="N", help="print the first N prompts as the model sees "
                   "them (chat template applied; --model's tokenizer files, no weights) and exit")
    p.add_argument("--score", metavar="PREDICTIONS", help="score answers made earlier and exit: our "
                   "predictions.jsonl (with --data, or its run's data) or a VLMEvalKit .tsv/.xlsx with a "
                   "'prediction' column")


def choose_profile(args: argparse.Namespace, data: Path, rows: list[TableRow]) -> Profile:
    """The profile of `--dataset` or the data file's name, with the command-line overrides; a fallback is
    announced on stderr in one line."""
    profile, notice = pf.choose(args.dataset, data, [r.fields for r in rows])
    if notice:
        print(f"internvl-jax eval: note: {notice}", file=sys.stderr)
    return pf.override(profile, system=args.system, image_backend=args.image_backend, max_patches=args.max_patches,
                       cot=args.cot, max_new_tokens=args.max_new_tokens)


def load_items(args: argparse.Namespace, data: Path) -> tuple[Profile, list[ev.EvalItem], int]:
    """(profile, items, rows dropped for an empty image) of the benchmark file `data`."""
    rows, dropped = ev.without_empty_images(read_table(data))
    profile = choose_profile(args, data, rows)
    ev.check_columns(profile, rows, data)
    if dropped:
        print(f"internvl-jax eval: note: {dropped} rows of {data} have an empty 'image' cell and are left out, "
              "as VLMEvalKit leaves them out", file=sys.stderr)
    root = Path(args.image_root) if args.image_root else None
    return profile, ev.items_from_rows(rows, data, root, profile), dropped


def show_prompts(args: argparse.Namespace) -> int:
    """Print the first N records' prompts, chat template applied, without loading the model."""
    from internvl_jax.hub import resolve
    from internvl_jax.processing.processor import InternVLProcessor

    if args.show_prompts < 1:
        raise ValueError(f"--show-prompts must be at least 1, got {args.show_prompts}")
    data = Path(args.data)
    profile, items, _ = load_items(args, data)
    processor = InternVLProcessor.from_pretrained(resolve(args.model))  # tokenizer and template files only
    requests = ev.requests_for(items[: args.show_prompts], profile=profile)
    for item, request in zip(items, requests, strict=False):
        if request.error:
            print(f"### error: {request.error}")
            continue
        text = processor.apply_chat_template(request.conversation, add_generation_prompt=True, tokenize=False)
        print(f"### {item.label()}: {len(item.images)} image(s), at most {request.max_patches} tiles each "
              f"({processor.image_token} stands for {processor.image_seq_length} tokens a tile)")
        print(text)
    return 0


# ----- --score -----
def _predictions_of_run(path: Path) -> tuple[dict[str, dict], dict[str, Any]]:
    """Our predictions.jsonl by index (as JSON text), and its run's summary (which names the data file and
    the profile), when it is beside it."""
    out: dict[str, dict] = {}
    for number, obj, error in iter_jsonl(path):
        if error or not isinstance(obj, dict) or "index" not in obj:
            raise ValueError(f"{path}: line {number} is not a prediction record of `internvl-jax eval` "
                             f"({error or 'no index'})")
        out[id_key(obj["index"])] = obj
    summary = path.parent / "summary.json"
    return out, json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}


def _check_same(pred: dict[str, Any], item: ev.EvalItem, pred_file: Path, data: Path) -> None:
    for column, value in (("question", item.question), ("answer", item.answer)):
        if pred.get(column) is not None and value is not None and format_value(pred[column]) != format_value(value):
            raise ValueError(f"{pred_file}: record {item.id!r} has another {column} than in {data} "
                             f"({format_value(pred[column])[:40]!r} vs {format_value(value)[:40]!r}): a predictions "
                             "file of another dataset?")


def score_file(args: argparse.Namespace) -> int:
    """`--score PREDICTIONS`: the summary on stdout; VLMEvalKit's result file beside the predictions (or
    under --output)."""
    pred_file = Path(args.score)
    if not pred_file.is_file():
        raise FileNotFoundError(f"--score {pred_file} is not a file")
    suffix = pred_file.suffix.lower()
    if suffix == ".jsonl":
        by_index, run = _predictions_of_run(pred_file)
        data = Path(args.data) if args.data else Path(run["data"]) if run.get("data") else None
        if args.dataset is None and isinstance(run.get("dataset"), dict) and run["dataset"].get("known"):
            args.dataset = run["dataset"].get("name")  # the profile the run used
        if data is None or not data.is_file():
            raise ValueError(f"--score {pred_file}: give the benchmark file with --data (the rows' options and "
                             "answers are read from it)")
    else:
        rows = read_table(pred_file)
        if rows and rows[0].fields is not None and "prediction" not in rows[0].fields:
            raise ValueError(f"--score {pred_file} has no 'prediction' column")
        by_index = {id_key(r.fields.get("index")): r.fields for r in rows if r.fields is not None}
        data = Path(args.data) if args.data else pred_file
    profile, items, _ = load_items(args, data)
    known = {id_key(it.id) for it in items}
    stray = next((k for k in by_index if k not in known), None)
    if stray is not None:
        raise ValueError(f"--score {pred_file}: record {json.loads(stray)!r} is not in {data}: a predictions file "
                         "of another dataset?")
    chosen = [it for it in items if id_key(it.id) in by_index]
    results = []
    for it in chosen:
        pred = by_index[id_key(it.id)]
        if data != pred_file:
            _check_same(pred, it, pred_file, data)
        text = pred.get("prediction")
        results.append({"text": None if text is None else format_value(text), "error": pred.get("error")})
    predictions, summary = ev.score(chosen, results, profile)
    summary = {"data": str(data), "predictions": str(pred_file), "dataset": profile.as_dict(), **summary}
    where = Path(args.output) if args.output else pred_file.parent
    report = where / (pred_file.stem + profile.report_suffix)
    if report.exists() and not (where / "run.json").is_file():
        raise ValueError(f"{report} exists already; give --output DIR to write the result file elsewhere")
    where.mkdir(parents=True, exist_ok=True)
    written = ev.write_report(summary, report)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"internvl-jax eval: scored {len(chosen)} records of {pred_file}"
          f"{f'; wrote {written}' if written else ''}", file=sys.stderr)
    return 0
