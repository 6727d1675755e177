"""The generation loop of a run: encode, sort into static batches, generate, write, repeat.

Records are encoded a window at a time (chat template, image tiling, tokens) on a background thread, so the
next window's images are decoded while the device runs the current one. Inside a window they are sorted by
prompt-length bucket and tile count before being cut into batches: rows of one batch then need the same
compiled program and little padding. Greedy answers do not depend on the batch a row lands in (the engine
keeps rows independent), which is what makes a resumed run -- whose batches differ -- give the same output.

A record that fails (unreadable image, bad message, prompt too long, an error inside its batch) becomes a
result line with `error` set; a failing batch is retried one row at a time so one bad row costs only itself.
"""

from __future__ import annotations

import collections
import itertools
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from internvl_jax.engine.generate import max_length, prompt_bucket
from internvl_jax.runners.options import RunOptions
from internvl_jax.runners.records import Request
from internvl_jax.runners.shards import PartWriter, result_line

GenerateFn = Callable[[np.ndarray, np.ndarray | None, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Encoded:
    request: Request
    ids: np.ndarray  # [length] prompt token ids
    pixels: np.ndarray | None  # [tiles, 3, S, S]

    @property
    def tiles(self) -> int:
        return 0 if self.pixels is None else int(self.pixels.shape[0])

    def sort_key(self) -> tuple[int, int, int, int]:
        return prompt_bucket(len(self.ids)), self.tiles, len(self.ids), self.request.row


@dataclass
class Stats:
    records: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        return (f"{self.records} records ({self.failed} failed) in {self.seconds:.1f} s: "
                f"{self.records / s:.2f} records/s, {self.new_tokens / s:.1f} new tokens/s")


def result(request: Request, *, text: str | None = None, prompt_tokens: int | None = None, new_tokens: int = 0,
           finish_reason: str | None = None, error: str | None = None, token_ids: list[int] | None = None
           ) -> dict[str, Any]:
    out = {"id": request.id, "row": request.row, "text": text, "prompt_tokens": prompt_tokens,
           "new_tokens": new_tokens, "finish_reason": finish_reason, "error": error}
    if token_ids is not None:
        out["token_ids"] = token_ids
    return out


def encode(processor: Any, request: Request, template: Mapping[str, Any], room: int,
           limit: str = "leave no room for max_new_tokens within the model's maximum length") -> Encoded | dict:
    """One record -> token ids and pixels, or its failed result line. `room`: the longest prompt allowed, and
    `limit` what sets it (for the message)."""
    if request.error is not None:
        return result(request, error=request.error)
    if request.max_patches is not None:  # the record's own tile budget (eval profiles) wins over the run's
        template = {**template, "max_patches": request.max_patches}
    try:
        inputs = processor.apply_chat_template(request.conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, **template)
    except Exception as e:  # noqa: BLE001 (InputError names the item; anything else: say what it was)
        detail = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        return result(request, error=f"{request.label()}: {detail}")
    ids = np.asarray(inputs["input_ids"])[0]
    if len(ids) > room:
        return result(request, prompt_tokens=int(len(ids)),
                      error=f"{request.label()}: prompt too long: {len(ids)} tokens {limit} (at most {room} "
                            "prompt tokens)")
    pixels = inputs.get("pixel_values")
    return Encoded(request, ids, None if pixels is None else np.asarray(pixels))


def plan_batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[Encoded]]:
    """Sorted by (length bucket, tiles, length) and cut into batches of `batch_size`."""
    ordered = sorted(encoded, key=Encoded.sort_key)
    return [ordered[i: i + batch_size] for i in range(0, len(ordered), batch_size)]


def left_pad(rows: Sequence[np.ndarray], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def run_batch(generate: GenerateFn, batch: Sequence[Encoded], pad: int) -> np.ndarray:
    """New tokens [rows, n] (pad after a row's end)."""
    ids, mask = left_pad([e.ids for e in batch], pad)
    pixels = [e.pixels for e in batch if e.pixels is not None]
    out = np.asarray(generate(ids, np.concatenate(pixels) if pixels else None, mask))
    return out[:, ids.shape[1]:]


def finish_rows(batch: Sequence[Encoded], new: np.ndarray, eos: frozenset[int], decode: Callable[[list[int]], str],
                save_token_ids: bool) -> list[dict[str, Any]]:
    out = []
    for enc, tokens in zip(batch, new, strict=True):
        tokens = [int(t) for t in tokens]
        end = next((i for i, t in enumerate(tokens) if t in eos), None)
        kept = tokens if end is None else tokens[: end + 1]
        out.append(result(enc.request, text=decode(kept), prompt_tokens=int(len(enc.ids)), new_tokens=len(kept),
                          finish_reason="length" if end is None else "eos",
                          token_ids=kept if save_token_ids else None))
    return out


class Generation:
    """Runs batches, falling back to one row at a time when a batch fails."""

    def __init__(self, generate: GenerateFn, pad: int, eos: frozenset[int], decode: Callable[[list[int]], str],
                 save_token_ids: bool):
        self.generate, self.pad, self.eos, self.decode = generate, pad, eos, decode
        self.save_token_ids = save_token_ids
        self._traced = False

    def __call__(self, batch: Sequence[Encoded]) -> list[dict[str, Any]]:
        try:
            return finish_rows(batch, run_batch(self.generate, batch, self.pad), self.eos, self.decode,
                               self.save_token_ids)
        except Exception as e:  # noqa: BLE001 (a record's failure must not end the run)
            if len(batch) > 1:
                return [row for enc in batch for row in self([enc])]
            self._report(e)
            req = batch[0].request
            return [result(req, prompt_tokens=int(len(batch[0].ids)),
                           error=f"{req.label()}: {type(e).__name__}: {e}")]

    def _report(self, e: Exception) -> None:
        # Input problems are expected; anything else gets one traceback on stderr (once), so a bug that
        # fails every record is visible and not only counted.
        if not isinstance(e, (ValueError, MemoryError)) and not self._traced:
            self._traced = True
            traceback.print_exception(e, file=sys.stderr)


def emitter(writer: PartWriter, stats: Stats, bar: Any, start: float, busy: Callable[[], str]
            ) -> Callable[[list[dict[str, Any]]], None]:
    """`emit(rows)`: append result lines to this process's part, count them, move the progress bar (`busy`: what
    the engine says of its slots, or "")."""

    def emit(rows: list[dict[str, Any]]) -> None:
        writer.write([result_line(r) for r in rows])
        stats.records += len(rows)
        stats.failed += sum(r["error"] is not None for r in rows)
        stats.prompt_tokens += sum(r["prompt_tokens"] or 0 for r in rows if r["error"] is None)
        stats.new_tokens += sum(r["new_tokens"] for r in rows)
        stats.seconds = time.perf_counter() - start
        bar.update(len(rows))
        bar.set_postfix_str(f"{stats.new_tokens / max(stats.seconds, 1e-9):.1f} tok/s, {busy()}{stats.failed} failed",
                            refresh=False)

    return emit


def windows(items: Sequence[Request], size: int) -> Iterator[Sequence[Request]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def run_share(model: Any, processor: Any, pending: Sequence[Request], writer: PartWriter, opts: RunOptions,
              generate: GenerateFn | None = None) -> Stats:
    """Answer `pending` (this process's records not yet done) and append their result lines to `writer`."""
    if opts.slots and generate is None:
        return run_slots(model, processor, pending, writer, opts)
    sampling = model.generation_config.update(**opts.generation)
    eos = frozenset(sampling.eos_token_id)
    pad = sampling.pad_id
    room = max_length(model.config) - sampling.max_new_tokens
    if generate is None:
        def generate(ids, pixels, mask):
            return model.generate(ids, pixels, mask, **opts.generation)

    def decode(tokens: list[int]) -> str:
        return processor.decode(tokens, skip_special_tokens=True)

    gen = Generation(generate, pad, eos, decode, opts.save_token_ids)
    stats, start = Stats(), time.perf_counter()
    bar = _progress(len(pending), opts.progress)

    def encode_window(reqs: Sequence[Request]) -> list[Encoded | dict]:
        return [encode(processor, r, opts.template, room) for r in reqs]

    emit = emitter(writer, stats, bar, start, lambda: "")

    # One encoder thread: the next window is prepared while this one generates.
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
            chunks = list(windows(pending, opts.window_size))
            future = pool.submit(encode_window, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                encoded = future.result()
                future = pool.submit(encode_window, chunks[k + 1]) if k + 1 < len(chunks) else None
                failed = [e for e in encoded if isinstance(e, dict)]
                if failed:
                    emit(failed)
                for batch in plan_batches([e for e in encoded if isinstance(e, Encoded)], opts.batch_size):
                    emit(gen(batch))
    finally:  # also on Ctrl-C: the bar's line ends before the interrupt message
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    # tqdm's own rate is records/s and its ETA follows from it; tokens/s and failures go in the postfix.
    return tqdm(total=total, unit="rec", file=sys.stderr, disable=not enabled, dynamic_ncols=True, smoothing=0.3)


# ----- continuous batching -----
def record_sampling(base: Any, request: Request) -> Any:
    """The record's settings over the command's. A record without its own seed gets one derived from the run's
    seed and its row, so sampled records differ from each other and a resumed or sharded run draws the same."""
    options = dict(request.generation)
    options.setdefault("seed", (base.seed * 1_000_003 + request.row) % 2**31)
    return base.update(**options)


def encoded_ahead(pool: ThreadPoolExecutor, requests: Sequence[Request], encode_one: Callable, ahead: int
                  ) -> Iterator[Encoded | dict]:
    """Encodings in order, `ahead` records encoded in the background before they are asked for."""
    futures: collections.deque = collections.deque()
    source = iter(requests)
    for r in itertools.islice(source, ahead):
        futures.append(pool.submit(encode_one, r))
    while futures:
        done = futures.popleft().result()
        following = next(source, None)
        if following is not None:
            futures.append(pool.submit(encode_one, following))
        yield done


def run_slots(model: Any, processor: Any, pending: Sequence[Request], writer: PartWriter, opts: RunOptions
              ) -> Stats:
    """`run_share` on the slot engine: a record enters a decode slot as soon as one frees, its result line is
    written when it ends (completion order; the merge restores input order)."""
    from internvl_jax.engine import slots as engine_slots

    base = model.generation_config.update(**opts.generation)
    engine = engine_slots.SlotEngine(model.module, model.params, slots=opts.slots, cache_len=opts.cache_len,
                                     mesh=model.mesh)
    stats, start = Stats(), time.perf_counter()
    bar = _progress(len(pending), opts.progress)
    by_row: dict[int, Encoded] = {}

    emit = emitter(writer, stats, bar, start, lambda: f"{engine.busy}/{opts.slots} slots busy, ")

    def encode_one(req: Request) -> Encoded | dict:
        try:
            record_sampling(base, req)
        except ValueError as e:
            return result(req, error=f"{req.label()}: {e}")
        return encode(processor, req, opts.template, engine.room - 1,
                      "leave no room for an answer in a decode slot (--cache-len, the model's maximum length)")

    def engine_requests(pool: ThreadPoolExecutor) -> Iterator[engine_slots.Request]:
        for enc in encoded_ahead(pool, pending, encode_one, max(opts.slots, 4)):
            if isinstance(enc, dict):
                emit([enc])
                continue
            by_row[enc.request.row] = enc
            yield engine_slots.Request(id=enc.request.row, ids=enc.ids, pixels=enc.pixels,
                                       sampling=record_sampling(base, enc.request))

    def finished(c: engine_slots.Completion) -> dict[str, Any]:
        enc = by_row.pop(c.id)
        if c.error is not None:
            return result(enc.request, prompt_tokens=c.prompt_tokens, error=f"{enc.request.label()}: {c.error}")
        tokens = list(c.tokens)
        return result(enc.request, text=processor.decode(tokens, skip_special_tokens=True),
                      prompt_tokens=c.prompt_tokens, new_tokens=len(tokens), finish_reason=c.finish_reason,
                      token_ids=tokens if opts.save_token_ids else None)

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
            for completion in engine.run(engine_requests(pool)):
                emit([finished(completion)])
    finally:  # also on Ctrl-C: the bar's line ends before the interrupt message
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats
