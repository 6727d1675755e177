"""`internvl-jax parity`: does a checkpoint give torch's numbers, and if not, where does it go wrong?

transformers' `InternVLForConditionalGeneration` (torch, float32) runs from `--model`, ours from `--ours` (a
converted, exported or sharded copy) or the same directory. Both see the same inputs (built by our processor;
compared with transformers' processor when that one loads). Then, stage by stage, in data-path order: vision
embeddings, every vision layer, the projector, the decoder's input, every decoder layer, the final norm and
the logits (max absolute and relative error, cosine similarity; for the logits also KL(torch || ours) and
top-1 / top-5 agreement), then greedy generation in both. The first stage whose error is above tolerance and
more than 10x the stage before it is named: that is where the numbers go wrong.

A stage passes when max |ours - torch| <= atol + rtol * max |torch|. Exit status: 0 within tolerance, 1 beyond
it, 2 for bad input. torch and transformers are needed here only (the `test` extra); nothing else imports them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Default tolerances by our dtype. float32 is what the tests hold us to; bfloat16 weights and activations
# against torch float32 differ by about a percent per stage.
TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 5e-2)}
JUMP = 10.0  # a stage "diverges" when its error is this many times the previous stage's (and above tolerance)


@dataclass(frozen=True, kw_only=True)
class StageError:
    stage: str
    max_abs: float
    max_rel: float  # max |ours - torch| / max |torch|
    cosine: float
    passed: bool


@dataclass(kw_only=True)
class Report:
    prompt: str
    inputs: dict[str, Any]
    stages: list[StageError]
    logits: dict[str, float]
    generation: dict[str, Any]
    first_divergent: str | None
    passed: bool = field(default=False)


# ----- comparing -----
def _row_chunks(a: np.ndarray, b: np.ndarray, rows: int = 64):
    """Both arrays as [n, last dim], a few rows at a time in float64: logits of a 12-tile prompt are
    [3342, 151674], 4 GB in float64, so nothing here holds more than a chunk in float64."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    for i in range(0, a2.shape[0], rows):
        yield a2[i:i + rows].astype(np.float64), b2[i:i + rows].astype(np.float64)


def stage_error(stage: str, ours: np.ndarray, theirs: np.ndarray, atol: float, rtol: float) -> StageError:
    a, b = np.asarray(ours), np.asarray(theirs)
    if a.shape != b.shape:
        raise ValueError(f"stage {stage}: ours has shape {a.shape}, torch {b.shape}")
    diff = scale = dot = na = nb = 0.0
    for x, y in _row_chunks(a, b):
        diff, scale = max(diff, float(np.abs(x - y).max())), max(scale, float(np.abs(y).max()))
        dot, na, nb = dot + float(np.sum(x * y)), na + float(np.sum(x * x)), nb + float(np.sum(y * y))
    cosine = dot / max(math.sqrt(na * nb), 1e-300)
    return StageError(stage=stage, max_abs=diff, max_rel=diff / max(scale, 1e-30), cosine=cosine,
                      passed=diff <= atol + rtol * scale)


def first_divergent(stages: Sequence[StageError]) -> str | None:
    """The first stage above tolerance whose relative error is more than JUMP x the stage before it."""
    previous = 0.0
    for s in stages:
        if not s.passed and s.max_rel > JUMP * previous:
            return s.stage
        previous = s.max_rel
    return None


def logit_stats(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """KL(torch || ours) and top-1 / top-5 agreement over the real (unpadded) positions."""
    keep = mask.astype(bool)
    kl, top1, top5 = [], [], []
    for a, b in _row_chunks(np.asarray(ours)[keep], np.asarray(theirs)[keep]):
        logp_a, logp_b = a - _logsumexp(a), b - _logsumexp(b)
        kl.append(np.sum(np.exp(logp_b) * (logp_b - logp_a), axis=-1))
        best_a, best_b = _top5(a), _top5(b)
        top1.append(best_a[:, 0] == best_b[:, 0])
        top5 += [len(set(x) & set(y)) / 5 for x, y in zip(best_a, best_b, strict=True)]
    kls = np.concatenate(kl)
    return {"kl_mean": float(kls.mean()), "kl_max": float(kls.max()),
            "top1_agreement": float(np.concatenate(top1).mean()), "top5_agreement": float(np.mean(top5))}


def _top5(x: np.ndarray) -> np.ndarray:
    """The 5 best ids of each row, best first."""
    part = np.argpartition(-x, 5, axis=-1)[:, :5]
    return np.take_along_axis(part, np.argsort(-np.take_along_axis(x, part, axis=-1), axis=-1), axis=-1)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


# ----- torch's stages -----
def torch_stages(ref: Any, ids: np.ndarray, pixels: np.ndarray | None, mask: np.ndarray
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """transformers' logits and the output of each stage that ours names, captured with forward hooks."""
    import torch

    model = ref.model
    seen: dict[str, np.ndarray] = {}
    hooks = []

    def keep(name: str):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
            seen[name] = out.detach().float().numpy()
        return hook

    def keep_input(_module, _args, kwargs):
        seen["text.embeddings"] = kwargs["inputs_embeds"].detach().float().numpy()

    if pixels is not None:
        hooks.append(model.vision_tower.embeddings.register_forward_hook(keep("vision.embeddings")))
        for i, layer in enumerate(model.vision_tower.encoder.layer):
            hooks.append(layer.register_forward_hook(keep(f"vision.layers.{i}")))
        hooks.append(model.multi_modal_projector.register_forward_hook(keep("projector")))
    text = model.language_model
    hooks.append(text.register_forward_pre_hook(keep_input, with_kwargs=True))
    for i, layer in enumerate(text.layers):
        hooks.append(layer.register_forward_hook(keep(f"text.layers.{i}")))
    hooks.append(text.norm.register_forward_hook(keep("text.final_norm")))
    kwargs: dict[str, Any] = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if pixels is not None:
        kwargs["pixel_values"] = torch.tensor(pixels, dtype=torch.float32)
    try:
        with torch.no_grad():
            logits = ref(**kwargs).logits.float().numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


def generation_diff(ours: Any, ref: Any, ids: np.ndarray, pixels: np.ndarray | None, mask: np.ndarray,
                    new_tokens: int) -> dict[str, Any]:
    """Greedy tokens of both; the first position where they differ and torch's top-2 margin there."""
    import torch

    kwargs: dict[str, Any] = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if pixels is not None:
        kwargs["pixel_values"] = torch.tensor(pixels, dtype=torch.float32)
    with torch.no_grad():
        out = ref.generate(**kwargs, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
    theirs = out.sequences[0, ids.shape[1]:].tolist()
    mine = [int(t) for t in ours.generate(ids, pixels, mask, max_new_tokens=new_tokens, do_sample=False)[0,
                                                                                                      ids.shape[1]:]]
    n = min(len(theirs), len(mine))
    at = next((i for i in range(n) if theirs[i] != mine[i]), None)
    result: dict[str, Any] = {"torch": theirs, "ours": mine, "first_difference": at, "margin": None,
                              "near_tie": None}
    if at is None and len(theirs) != len(mine):
        result["first_difference"] = n
    elif at is not None:
        top2 = np.sort(out.scores[at][0].float().numpy())[-2:]
        margin = float(top2[1] - top2[0])
        result |= {"margin": margin, "near_tie": margin < 1e-4 * max(1.0, abs(float(top2[1])))}
    return result


# ----- one comparison -----
def compare(ours: Any, ref: Any, inputs: dict[str, np.ndarray], new_tokens: int, atol: float, rtol: float,
            prompt: str = "", input_check: dict[str, Any] | None = None) -> Report:
    ids, mask = np.asarray(inputs["input_ids"]), np.asarray(inputs["attention_mask"])
    pixels = inputs.get("pixel_values")
    logits, states = ours(ids, pixels, mask, return_hidden_states=True)
    logits = np.asarray(logits)[..., : ours.config.text.vocab_size]  # a mesh may keep the padded vocabulary
    ref_logits, ref_states = torch_stages(ref, ids, pixels, mask)
    cfg = ours.config
    run = cfg.vision_feature_layer % (cfg.vision.num_layers + 1)  # vision layers past the feature layer don't run
    skipped = {f"vision.layers.{i}" for i in range(run, cfg.vision.num_layers)}
    stages = [stage_error(name, np.asarray(value), ref_states[name], atol, rtol)
              for name, value in states.items() if name in ref_states and name not in skipped]
    stages.append(stage_error("logits", np.asarray(logits), ref_logits, atol, rtol))
    gen = generation_diff(ours, ref, ids, pixels, mask, new_tokens) if new_tokens else {}
    tokens_ok = not gen or gen["first_difference"] is None or bool(gen.get("near_tie"))
    report = Report(prompt=prompt, inputs=input_check or {}, stages=stages,
                    logits=logit_stats(np.asarray(logits), ref_logits, mask), generation=gen,
                    first_divergent=first_divergent(stages))
    report.passed = all(s.passed for s in stages) and tokens_ok and report.inputs.get("ids_equal", True)
    return report


# ----- inputs -----
def build_inputs(model_dir: Path, messages: list[dict]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Our processor's inputs, and how they compare with transformers' processor's (when that one loads)."""
    from internvl_jax.processing.processor import InternVLProcessor

    ours = InternVLProcessor.from_pretrained(model_dir).apply_chat_template(
        [messages], add_generation_prompt=True, tokenize=True, return_dict=True, padding=True, return_tensors="np")
    check: dict[str, Any] = {}
    try:
        from transformers import AutoProcessor

        theirs = AutoProcessor.from_pretrained(model_dir).apply_chat_template(
            [messages], add_generation_prompt=True, tokenize=True, return_dict=True, padding=True,
            return_tensors="pt")
    except Exception as e:  # transformers' processor needs torchvision, which may be missing or broken
        reason = (str(e).splitlines() or ["(no message)"])[0][:160]
        check["transformers_processor"] = f"not compared: it did not load here ({type(e).__name__}: {reason})"
        return dict(ours), check
    check["ids_equal"] = bool(np.array_equal(ours["input_ids"], theirs["input_ids"].numpy()))
    if "pixel_values" in theirs and ours.get("pixel_values") is not None:
        px = theirs["pixel_values"].float().numpy()
        same = px.shape == ours["pixel_values"].shape
        check["pixels_max_abs"] = float(np.abs(px - ours["pixel_values"]).max()) if same else None
    return dict(ours), check


def messages_for(prompt: str, images: Sequence[str], video: str | None) -> list[dict]:
    content: list[dict] = [{"type": "image", "url": i} for i in images]
    if video:
        content.append({"type": "video", "url": video})
    return [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]


# ----- output -----
def table(report: Report) -> str:
    lines = [f"prompt: {report.prompt!r}"]
    lines += [f"inputs: {k} = {v}" for k, v in report.inputs.items()]
    lines.append(f"{'stage':<22}{'max abs':>12}{'max rel':>12}{'cosine':>14}  ok")
    for s in report.stages:
        mark = "" if s.passed else "  <-- first divergent" if s.stage == report.first_divergent else ""
        lines.append(f"{s.stage:<22}{s.max_abs:12.3e}{s.max_rel:12.3e}{s.cosine:14.10f}  "
                     f"{'yes' if s.passed else 'NO'}{mark}")
    lg = report.logits
    lines.append(f"logits: KL(torch||ours) mean {lg['kl_mean']:.3e} max {lg['kl_max']:.3e}; top-1 agreement "
                 f"{lg['top1_agreement']:.3f}, top-5 {lg['top5_agreement']:.3f}")
    g = report.generation
    if g:
        if g["first_difference"] is None:
            lines.append(f"greedy: {len(g['ours'])} tokens identical")
        else:
            tie = f", torch's top-2 margin {g['margin']:.2e}{' (near tie)' if g['near_tie'] else ''}" \
                if g["margin"] is not None else ""
            lines.append(f"greedy: first difference at new token {g['first_difference']}{tie}")
    if report.first_divergent:
        worst = next(s for s in report.stages if s.stage == report.first_divergent)
        lines.append(f"first divergent stage: {worst.stage}: max rel {worst.max_rel:.1e}")
    lines.append("PASS" if report.passed else "FAIL")
    return "\n".join(lines)


def plot(path: Path, reports: Sequence[Report]) -> None:
    """log10 of each stage's max relative error (Pillow only), one line per prompt."""
    from PIL import Image, ImageDraw

    stages = [s.stage for s in reports[0].stages]
    w, h, m = max(720, 14 * len(stages) + 120), 440, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    lo, hi = -9.0, 1.0
    x = lambda i: m + (w - 2 * m) * i / max(1, len(stages) - 1)  # noqa: E731
    y = lambda v: h - m - (h - 2 * m) * (min(max(v, lo), hi) - lo) / (hi - lo)  # noqa: E731
    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    for k in range(int(lo), int(hi) + 1, 2):
        d.text((8, y(k) - 6), f"1e{k}", fill="black")
    for n, r in enumerate(reports):
        pts = [(x(i), y(math.log10(max(s.max_rel, 1e-30)))) for i, s in enumerate(r.stages)]
        d.line(pts, fill=[(30, 90, 200), (220, 80, 30), (40, 160, 60)][n % 3], width=2)
        if r.first_divergent:
            i = stages.index(r.first_divergent)
            d.ellipse([x(i) - 4, pts[i][1] - 4, x(i) + 4, pts[i][1] + 4], outline="red", width=2)
            d.text((x(i) + 6, pts[i][1] - 14), r.first_divergent, fill="red")
    d.text((m, 16), "max relative error per stage, ours vs torch (log scale); the data path left to right",
           fill="black")
    d.text((m, h - m + 10), stages[0], fill="black")
    d.text((w - m - 80, h - m + 10), stages[-1], fill="black")
    img.save(path)


# ----- command -----
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="-hf checkpoint directory transformers loads (the reference)")
    p.add_argument("--ours", help="our copy to check (converted, exported, sharded; default: --model itself)")
    p.add_argument("--dtype", default="float32", choices=tuple(TOLERANCES), help="our parameter dtype")
    p.add_argument("--mesh", help="load ours on a device mesh such as data=2,tensor=4")
    p.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    p.add_argument("--video", help="video path")
    p.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    p.add_argument("--prompts", help="a text file of user messages, one per line")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to compare (0: none)")
    p.add_argument("--json", help="write the full report to this JSON file")
    p.add_argument("--plot", help="write a PNG of the error per stage")
    p.add_argument("--atol", type=float, help="absolute tolerance (default by dtype: 1e-4 float32, 5e-2 bfloat16)")
    p.add_argument("--rtol", type=float, help="tolerance relative to max |torch| of the stage (same defaults)")


def prompts_of(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        file = Path(args.prompts)
        try:
            prompts += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompts {file}: cannot read it ({e})") from e
    if not prompts:
        raise ValueError("give a --prompt or a --prompts file")
    return prompts


def check_same_model(ours: Any, reference_dir: Path, ours_dir: Path) -> None:
    from internvl_jax.config import InternVLConfig

    ref = InternVLConfig.from_pretrained(reference_dir)
    if ours.config.replace(tie_word_embeddings=ref.tie_word_embeddings) != ref:
        differ = [f for f in ("vision", "text", "image_token_id", "downsample_ratio", "vision_feature_layer")
                  if getattr(ours.config, f) != getattr(ref, f)]
        raise ValueError(f"--ours {ours_dir} is another model than --model {reference_dir}: its config differs in "
                         f"{', '.join(differ) or 'its top-level fields'}")


def run(args: argparse.Namespace) -> int:
    import jax

    from internvl_jax.modeling import InternVL
    from internvl_jax.sharding import make_mesh

    model_dir = Path(args.model)
    ours_dir = Path(args.ours) if args.ours else model_dir
    for flag, d in (("--model", model_dir), ("--ours", ours_dir)):
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {d}: no config.json there (a checkpoint directory is needed)")
    if args.new_tokens < 0:
        raise ValueError(f"--new-tokens must be >= 0, got {args.new_tokens}")
    prompts = prompts_of(args)
    atol, rtol = TOLERANCES[args.dtype]
    atol, rtol = args.atol if args.atol is not None else atol, args.rtol if args.rtol is not None else rtol
    mesh = make_mesh(args.mesh) if args.mesh else None
    ours = InternVL.from_pretrained(ours_dir, dtype=args.dtype, mesh=mesh)
    check_same_model(ours, model_dir, ours_dir)

    from transformers import InternVLForConditionalGeneration

    ref = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype="float32").eval()
    reports = []
    with jax.default_matmul_precision("highest"):
        for prompt in prompts:
            inputs, check = build_inputs(model_dir, messages_for(prompt, args.image, args.video))
            reports.append(compare(ours, ref, inputs, args.new_tokens, atol, rtol, prompt, check))
    for r in reports:
        print(table(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model_dir), "ours": str(ours_dir), "dtype": args.dtype,
                                               "atol": atol, "rtol": rtol,
                                               "reports": [asdict(r) for r in reports]}, indent=1) + "\n")
    if args.plot:
        plot(Path(args.plot), reports)
    return 0 if all(r.passed for r in reports) else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="internvl-jax parity", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"internvl-jax parity: error: {e}", file=sys.stderr)
        return 2
