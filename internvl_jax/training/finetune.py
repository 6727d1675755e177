"""Fine-tuning with optax: conversations in `batch`'s JSONL form, the loss on the assistant's tokens only.

AdamW with a linear warm-up and a cosine decay, gradient clipping by global norm, gradient accumulation
(`optax.MultiSteps`), parts of the model frozen (`vision`, `projector`, `language`: InternVL's first stage trains
the projector alone). The step is one jitted program over the parameters as the model holds them: on a mesh
(`from_pretrained(..., mesh=)`) the weights stay split as the rules table says and the rows are split over `data`.

A run writes into `out`: `checkpoints/` (orbax: parameters, optimizer state and step, every `save_every` steps;
a run started again on the same `out` resumes from the last one and follows the same loss curve, because the
batch of each step depends only on the seed and the step), `loss.jsonl` (one line a step), `loss.png`,
`skipped.jsonl` (records left out, with their line and reason) and `model/`, a converted checkpoint that
`from_pretrained` loads and `internvl-jax export` turns into the -hf layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from internvl_jax.engine.generate import bucket
from internvl_jax.training.options import FREEZABLE, IGNORE, FinetuneOptions

PIXEL_MEMORY = 2 << 30  # bytes of pixel values kept in memory; past them a record's pixels are made per batch


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray  # [t] int32
    labels: np.ndarray  # [t] int32: the token to predict at each position's next step, IGNORE where not trained
    pixels: np.ndarray | None  # [tiles, 3, S, S]; None for a text-only record or one whose pixels are reloaded
    conversation: list[dict] | None = None  # kept when the pixels are made again for each batch (PIXEL_MEMORY)


# ----- data -----
def encode(processor: Any, conversation: list[dict], max_length: int) -> Example:
    """Token ids, labels on every assistant turn's tokens (its text and end-of-turn token) and pixel values.

    Each assistant turn's tokens are what the template adds to the conversation before it when that turn is
    appended, after the generation prompt: exactly what the model is asked to produce at inference. The images
    are processed once; the turns' boundaries come from the rendered prefixes and the tile counts."""
    turns = [i for i, m in enumerate(conversation) if m.get("role") == "assistant"]
    if not turns:
        raise ValueError("the conversation has no assistant turn to train on")
    full = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    ids = np.asarray(full["input_ids"][0], np.int32)
    if len(ids) > max_length:
        raise ValueError(f"{len(ids)} tokens exceed --max-length {max_length}")
    tiles = [int(n) for n in full.get("num_patches", [])]
    labels = np.full(ids.shape, IGNORE, np.int32)
    for turn in turns:
        start = processor.expanded_length(
            processor.apply_chat_template(conversation[:turn], add_generation_prompt=True), tiles)
        end = processor.expanded_length(processor.apply_chat_template(conversation[: turn + 1]), tiles)
        if not 0 < start < end <= len(ids):
            raise ValueError(f"the chat template does not render turn {turn} as an extension of the turns before it")
        labels[start:end] = ids[start:end]
    pixels = full.get("pixel_values")
    return Example(ids, labels, None if pixels is None else np.asarray(pixels, np.float32))


def load(processor: Any, path: str | Path, max_length: int, strict: bool) -> tuple[list[Example], list[dict]]:
    """Every trainable record of a JSONL file, and the skipped ones ({line, id, reason}). `strict`: the first bad
    record raises ValueError naming its line. Records are processed on all cores; the pixels of the first
    PIXEL_MEMORY bytes stay in memory, later records keep their conversation and are processed again per batch."""
    from internvl_jax.runners.records import read_prompts

    def one(req: Any) -> Example | str:
        if req.error is not None:
            return req.error
        try:
            return encode(processor, req.conversation, max_length)
        except (ValueError, OSError) as e:  # a bad turn, an image that does not load
            return f"{req.label()}: {e}"

    reqs = list(read_prompts(path))
    examples, skipped, kept = [], [], 0
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL and numpy let go of the GIL
        for req, ex in zip(reqs, pool.map(one, reqs), strict=True):
            if isinstance(ex, str):
                if strict:
                    raise ValueError(f"{path}: {ex} (--strict)")
                skipped.append({"where": req.where, "id": req.id, "reason": ex})
                continue
            if ex.pixels is not None:
                kept += ex.pixels.nbytes
                if kept > PIXEL_MEMORY:
                    ex = dataclasses.replace(ex, pixels=None, conversation=req.conversation)
            examples.append(ex)
    return examples, skipped


def batches(n: int, size: int, seed: int, step: int) -> np.ndarray:
    """Indices of forward pass `step`'s rows: epochs of seeded permutations, so any step's batch is known without
    the ones before it (what makes a resumed run follow the same curve)."""
    per_epoch = max(n // size, 1)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    rows = order[k * size: (k + 1) * size]
    return rows if len(rows) == size else np.resize(order, size)


def row_length(n: int) -> int:
    """The padded length of a row of `n` tokens: the next of 1, 1.25, 1.5 or 1.75 times a power of two (at least
    16). At most four compiled steps per doubling of the length, and at most a quarter of a row padding: a
    power of two padded the shapes task's 85-token rows to 128, a third of the step's decoder work wasted."""
    if n <= 16:
        return 16
    p = bucket(n) // 2
    return next((q for q in (p + p // 4, p + p // 2, p + 3 * p // 4) if q >= n), 2 * p)


def collate(examples: Sequence[Example], max_length: int, processor: Any = None) -> dict[str, np.ndarray | None]:
    """Right-padded rows to a `row_length` (few compiled programs), labels shifted to the loss's layout
    (`model.loss` predicts labels[:, 1:] from logits[:, :-1]). `processor` makes the pixels of records that did not
    keep theirs."""
    t = min(row_length(max(len(e.ids) for e in examples)), row_length(max_length))
    ids = np.zeros((len(examples), t), np.int32)
    labels = np.full((len(examples), t), IGNORE, np.int32)
    mask = np.zeros((len(examples), t), bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)], labels[i, : len(e.ids)], mask[i, : len(e.ids)] = e.ids, e.labels, True
    px = [e.pixels if e.conversation is None else pixels_of(processor, e.conversation) for e in examples]
    px = [p for p in px if p is not None]
    return {"ids": ids, "labels": labels, "mask": mask, "pixels": np.concatenate(px) if px else None}


def pixels_of(processor: Any, conversation: list[dict]) -> np.ndarray:
    if processor is None:
        raise ValueError("collate: records without their pixels need the processor to make them")
    return np.asarray(processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["pixel_values"],
                      np.float32)


# ----- the optimizer and the step -----
def optimizer(opts: FinetuneOptions, params: dict) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, opts.learning_rate, opts.warmup, opts.steps,
                                                  opts.end_learning_rate)
    tx = optax.chain(optax.clip_by_global_norm(opts.clip), optax.adamw(schedule, weight_decay=opts.weight_decay))
    if opts.freeze:
        frozen = {FREEZABLE[f] for f in opts.freeze}
        labels = {k: jax.tree.map(lambda _, k=k: "frozen" if k in frozen else "train", v) for k, v in params.items()}
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return optax.MultiSteps(tx, opts.accumulate) if opts.accumulate > 1 else tx


def init_state(tx: optax.GradientTransformation, params: dict) -> Any:
    """`tx.init(params)` placed where the parameters are. optax makes its step counts as uncommitted scalars; the
    first step's program then takes them from anywhere and every later one from the device it put them on, so each
    row length was compiled twice (about 10 s each at the shapes model's size)."""
    where = jax.tree.leaves(params)[0].sharding
    if isinstance(where, jax.sharding.NamedSharding):
        where = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: x if getattr(x, "committed", True) else jax.device_put(x, where), tx.init(params))


def train_step(model: Any, tx: optax.GradientTransformation):
    """`step(params, opt_state, ids, labels, pixels, mask) -> (params, opt_state, loss)`, jitted."""
    from internvl_jax.modeling import _loss_fn

    loss_fn = _loss_fn(model.module)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, ids, labels, pixels, mask):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, pixels, positions, mask, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def evaluate(model: Any, examples: Sequence[Example], batch_size: int, max_length: int,
             processor: Any = None) -> dict[str, float]:
    """Held-out loss and the fraction of assistant tokens predicted right (teacher forced: argmax of the logits)."""
    total, right, nll = 0, 0, 0.0
    for lo in range(0, len(examples), batch_size):
        b = collate(examples[lo: lo + batch_size], max_length, processor)
        logits = np.asarray(model(b["ids"], b["pixels"], b["mask"]))[..., : model.config.text.vocab_size]
        target, pred = b["labels"][:, 1:], logits[:, :-1]
        valid = target != IGNORE
        logp = pred - _logsumexp(pred)
        nll -= float(np.take_along_axis(logp, np.where(valid, target, 0)[..., None], -1)[..., 0][valid].sum())
        right += int((pred.argmax(-1) == target)[valid].sum())
        total += int(valid.sum())
    return {"loss": nll / max(total, 1), "token_accuracy": right / max(total, 1), "tokens": total}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


# ----- the run -----
def finetune(model_dir: str | Path, data: str | Path, out: str | Path, opts: FinetuneOptions | None = None,
             heldout: str | Path | None = None, mesh: Any = None, progress: bool = True) -> Path:
    """Fine-tune the checkpoint `model_dir` on the JSONL `data`; returns `out/model` (see the module docstring)."""
    opts = opts or FinetuneOptions()
    import orbax.checkpoint as ocp

    from internvl_jax.modeling import InternVL
    from internvl_jax.processing.processor import InternVLProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    processor = InternVLProcessor.from_pretrained(model_dir)
    train, skipped = load(processor, data, opts.max_length, opts.strict)
    held, held_skipped = load(processor, heldout, opts.max_length, opts.strict) if heldout else ([], [])
    _write_jsonl(out / "skipped.jsonl", [{"file": str(data), **s} for s in skipped] +
                 [{"file": str(heldout), **s} for s in held_skipped])
    if skipped or held_skipped:
        print(f"internvl-jax finetune: {len(skipped) + len(held_skipped)} record(s) skipped: {out / 'skipped.jsonl'}",
              file=sys.stderr)
    if not train:
        raise ValueError(f"{data}: no record to train on ({len(skipped)} skipped)")

    model = InternVL.from_pretrained(model_dir, dtype="float32", mesh=mesh)
    tx = optimizer(opts, model.params)
    params, opt_state, start = model.params, init_state(tx, model.params), 0
    manager = ocp.CheckpointManager((out / "checkpoints").absolute(),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    if manager.latest_step() is not None:
        start = manager.latest_step()
        restored = manager.restore(start, args=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}))
        params, opt_state = restored["params"], restored["opt_state"]
        print(f"internvl-jax finetune: resumed at update {start} from {out / 'checkpoints'}", file=sys.stderr)
    log = _loss_log(out / "loss.jsonl", start)
    step_fn = train_step(model, tx)
    from tqdm import tqdm

    bar = tqdm(total=opts.steps, initial=start, unit="step", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def batch(i: int) -> dict:  # forward pass i's rows
        return collate([train[r] for r in batches(len(train), opts.batch_size, opts.seed, i)], opts.max_length,
                       processor)

    with ThreadPoolExecutor(1) as ahead:  # the next batch is made while a step runs
        upcoming = ahead.submit(batch, start * opts.accumulate)
        for update in range(start, opts.steps):
            began, losses, tokens = time.perf_counter(), [], 0
            for micro in range(opts.accumulate):
                b = upcoming.result()
                upcoming = ahead.submit(batch, update * opts.accumulate + micro + 1)
                with _on(mesh):
                    params, opt_state, loss = step_fn(params, opt_state, *(_place(b[k], mesh) for k in
                                                                            ("ids", "labels", "pixels", "mask")))
                losses.append(float(loss))
                tokens += int(b["mask"].sum())
            seconds = time.perf_counter() - began
            line = {"step": update + 1, "loss": float(np.mean(losses)), "tokens_per_s": tokens / seconds}
            if not math.isfinite(line["loss"]):
                raise FloatingPointError(f"loss is {line['loss']} at update {update + 1}: lower --learning-rate")
            if held and ((update + 1) % opts.save_every == 0 or update + 1 == opts.steps):
                model.params = params
                line["heldout"] = evaluate(model, held, opts.batch_size, opts.max_length, processor)
            log.write(json.dumps(line) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
            bar.update(1)
            if (update + 1) % opts.save_every == 0 or update + 1 == opts.steps:
                manager.save(update + 1, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
                manager.wait_until_finished()
    bar.close()
    log.close()
    plot_loss(out / "loss.jsonl", out / "loss.png")
    model.params = params
    return save(model, Path(model_dir), out / "model")


def _place(x: np.ndarray | None, mesh: Any) -> Any:
    """Rows (and tiles) split over the mesh's data axis."""
    from internvl_jax.sharding import batch_sharding

    return x if mesh is None or x is None else jax.device_put(x, batch_sharding(mesh, x.shape))


def _on(mesh: Any) -> contextlib.AbstractContextManager:
    """Trace under the mesh, so that activations follow the rules table (`rules.constrain`)."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _loss_log(path: Path, start: int):
    """The loss log opened for appending, without the lines of updates after `start` (a run killed after its last
    checkpoint logged updates that it will do again)."""
    kept = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= start] if path.exists() else []
    path.write_text("".join(ln + "\n" for ln in kept))
    return path.open("a")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def plot_loss(log: Path, png: Path) -> None:
    from internvl_jax.plots import lines

    rows = [json.loads(ln) for ln in log.read_text().splitlines()]
    series = {"train loss": [(r["step"], r["loss"]) for r in rows]}
    held = [(r["step"], r["heldout"]["loss"]) for r in rows if "heldout" in r]
    if held:
        series["held-out loss"] = held
    lines(png, series, "loss vs update")


def save(model: Any, source: Path, dst: Path) -> Path:
    """The model's parameters as a converted checkpoint (what `python -m convert` writes), with the source
    checkpoint's tokenizer, chat template and processor files."""
    from internvl_jax import weights
    from internvl_jax.checkpoint import ParamWriter, atomic_directory, copy_sidecar_files, write_manifest

    flat = weights.flatten_paths(model.params)
    # force: a rerun replaces the model it wrote before, and only that (`checkpoint.check_destination`).
    with atomic_directory(dst, force=True) as tmp:
        writer = ParamWriter(tmp)
        for path, array in flat.items():
            writer.save(path, array)
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
        copied = copy_sidecar_files(source, tmp)
        abstract = {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in flat.items()}
        write_manifest(tmp, abstract, dtype=str(next(iter(abstract.values())).dtype),
                       source={"path": str(source.absolute()), "layout": "finetune", "files": copied})
    return dst
