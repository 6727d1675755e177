"""`internvl-jax bench --workload ...`: the slot engine (continuous batching) measured as batch and eval runs use it.

Workloads, on a family-shape model with random weights (random weights never emit EOS: every request runs to its
own max_new_tokens, which is what the workload draws):
- `mixed`: N seeded requests, text prompts and one-tile image prompts of 16-600 tokens, max_new_tokens drawn from
  4-256; the engine with S slots against static batches of S (the runner's `--slots 0`: sorted by length bucket
  and tiles, each batch generating up to its longest request's max_new_tokens). Generated tokens/s (each
  request's own tokens), requests/s, time to first token p50 / p99 (static: when its batch's first 8 tokens
  arrive), and a plot of requests done against time.
- `prompt-memory`: one request of 1k, 2k, 4k, 8k prompt tokens (a video of 4-32 frames of one tile each), each
  in a fresh process: peak resident memory against weights + KV cache.
- `cache-len`: decode tokens/s at batch 1 with 256 filled slots in a 4096-slot cache and in a 256-slot one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from internvl_jax.engine.generate import bucket, prompt_bucket
from internvl_jax.engine.sampling import SamplingConfig
from internvl_jax.engine.slots import Request, SlotEngine

WORKLOADS = ("mixed", "prompt-memory", "cache-len")
PROMPT_TOKENS = (16, 600)  # mixed: prompt lengths drawn from this range
NEW_TOKENS = (4, 256)  # mixed: max_new_tokens drawn from this range
CACHE_LENS = (256, 4096)  # cache-len: the two caches (the first is also the filled length)


def mixed_requests(config: Any, n: int, seed: int = 0) -> list[Request]:
    """Half text, half one 448px tile; 16-600 prompt tokens; max_new_tokens 4-256; ids below the special ones."""
    rng = np.random.default_rng(seed)
    v, per = config.vision, config.image_seq_length
    out = []
    for i in range(n):
        image = bool(rng.integers(0, 2))
        low, high = PROMPT_TOKENS
        length = int(rng.integers(per + low if image else low, high + 1))
        ids = rng.integers(100, 1000, length).astype(np.int32)
        px = None
        if image:
            ids[4: 4 + per] = config.image_token_id
            px = rng.standard_normal((1, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
        new = int(rng.integers(NEW_TOKENS[0], NEW_TOKENS[1] + 1))
        out.append(Request(id=i, ids=ids, pixels=px, sampling=SamplingConfig(max_new_tokens=new, eos_token_id=())))
    return out


def quantiles(xs: Sequence[float]) -> dict[str, float]:
    return {"p50": float(np.quantile(xs, 0.5)), "p99": float(np.quantile(xs, 0.99))}


class CompileClock:
    """Seconds JAX spent tracing, lowering and compiling while it is open (a timed run that compiles pays for
    it in its wall time: reported beside it, so that a figure can be judged with and without)."""

    seconds = 0.0
    _open = False
    _registered = False

    def __enter__(self) -> CompileClock:
        if not CompileClock._registered:
            import jax

            jax.monitoring.register_event_duration_secs_listener(CompileClock._event)
            CompileClock._registered = True
        CompileClock.seconds, CompileClock._open = 0.0, True
        return self

    def __exit__(self, *exc: object) -> None:
        CompileClock._open = False

    @staticmethod
    def _event(name: str, secs: float, **_: Any) -> None:
        if CompileClock._open and name.startswith("/jax/core/compile/"):
            CompileClock.seconds += secs


def run_engine(model: Any, reqs: list[Request], slots: int, cache_len: int) -> dict[str, Any]:
    engine = SlotEngine(model.module, model.params, slots=slots, cache_len=cache_len, mesh=model.mesh)
    start = time.perf_counter()
    with CompileClock() as clock:
        done = list(engine.run(reqs))
    wall = time.perf_counter() - start
    assert all(c.error is None for c in done), [c.error for c in done if c.error]
    tokens = sum(len(c.tokens) for c in done)
    return {"wall_s": wall, "compile_s": clock.seconds, "generated_tokens": tokens, "tokens_per_s": tokens / wall,
            "requests_per_s": len(done) / wall, "ttft_s": quantiles([c.first_token_s for c in done]),
            "done_at_s": sorted(c.seconds for c in done), "time": dataclasses.asdict(engine.stats)}


def run_static(model: Any, reqs: list[Request], batch: int) -> dict[str, Any]:
    """The runner's static batches: sort by (length bucket, tiles, length), cut into `batch` rows, generate each
    batch up to its longest request's max_new_tokens, keep each request's own."""
    order = sorted(reqs, key=lambda r: (prompt_bucket(len(r.ids)), 0 if r.pixels is None else 1, len(r.ids)))
    start = time.perf_counter()
    ttft: list[float] = []
    done_at: list[float] = []
    with CompileClock() as clock:
        _static_batches(model, order, batch, start, ttft, done_at)
    tokens = sum(r.sampling.max_new_tokens for r in reqs)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "compile_s": clock.seconds, "generated_tokens": tokens, "tokens_per_s": tokens / wall,
            "requests_per_s": len(reqs) / wall, "ttft_s": quantiles(ttft), "done_at_s": sorted(done_at)}


def _static_batches(model: Any, order: list[Request], batch: int, start: float, ttft: list[float],
                    done_at: list[float]) -> None:
    from internvl_jax.runners.batch import left_pad

    for i in range(0, len(order), batch):
        rows = order[i: i + batch]
        ids, mask = left_pad([r.ids for r in rows], 0)
        px = [r.pixels for r in rows if r.pixels is not None]
        new = max(r.sampling.max_new_tokens for r in rows)
        first = None
        for _ in model.stream(ids, np.concatenate(px) if px else None, mask, chunk=8, max_new_tokens=new,
                              eos_token_id=[]):
            first = first or time.perf_counter() - start
        ttft.extend([first] * len(rows))
        done_at.extend([time.perf_counter() - start] * len(rows))


def mixed(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    reqs = mixed_requests(model.config, args.requests, args.seed)
    cache_len = bucket(max(len(r.ids) + r.sampling.max_new_tokens for r in reqs))
    # Warm-up on a few requests of every kind, so that both sides are timed with little compilation; what a side
    # still compiles in its timed run (the static side's shapes depend on how the requests fall into batches) is
    # its compile_s, and the ratio is given with and without it.
    warm = [Request(id=r.id, ids=r.ids, pixels=r.pixels, sampling=SamplingConfig(max_new_tokens=2, eos_token_id=()))
            for r in reqs[: 2 * args.slots]]
    run_engine(model, warm, args.slots, cache_len)
    run_static(model, warm, args.slots)
    engine = run_engine(model, reqs, args.slots, cache_len)
    static = run_static(model, reqs, args.slots)
    def without_compile(side: dict[str, Any]) -> float:
        return side["wall_s"] - side["compile_s"]

    return {"requests": args.requests, "slots": args.slots, "cache_len": cache_len, "engine": engine,
            "static": static, "engine_over_static_tokens_per_s": engine["tokens_per_s"] / static["tokens_per_s"],
            "engine_over_static_without_compile": without_compile(static) / without_compile(engine)}


def one_request(model: Any, frames: int, new: int) -> dict[str, Any]:
    """One video request of `frames` one-tile frames (plus a few text tokens); peak RSS of this process."""
    config = model.config
    rng = np.random.default_rng(frames)
    v, per = config.vision, config.image_seq_length
    ids = np.concatenate([rng.integers(100, 1000, 8), np.full(frames * per, config.image_token_id),
                          rng.integers(100, 1000, 8)]).astype(np.int32)
    px = rng.standard_normal((frames, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    import jax

    jax.block_until_ready(model.params)
    before = reset_peak_rss()  # the weights' random init has its own peak; this counts the request's alone
    engine = SlotEngine(model.module, model.params, slots=1, cache_len=bucket(len(ids) + new), mesh=model.mesh,
                        max_tiles=frames)
    start = time.perf_counter()
    (done,) = engine.run([Request(id=0, ids=ids, pixels=px, sampling=SamplingConfig(max_new_tokens=new,
                                                                                    eos_token_id=()))])
    assert done.error is None, done.error
    cache = sum(a.nbytes for a in (engine.cache.k, engine.cache.v))
    weights = sum(x.nbytes for x in jax.tree.leaves(model.params))
    return {"frames": frames, "prompt_tokens": len(ids), "seconds": time.perf_counter() - start,
            "peak_rss_bytes": peak_rss_since_reset(), "rss_before_request_bytes": before, "weights_bytes": weights,
            "kv_cache_bytes": cache, "budget_bytes": weights + cache + 2 * 2**30}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Give freed heap back to the system (the weights' random init leaves gigabytes of freed temporaries
    resident), reset this process's peak resident size (Linux: /proc/self/clear_refs, 5), return the current one."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss_since_reset() -> int:
    return _status_kib("VmHWM") * 1024


def prompt_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for frames in args.frames:
        cmd = [sys.executable, "-m", "internvl_jax.bench_serving", "--one-request", str(frames), "--preset",
               args.preset, "--dtype", args.dtype]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            out.append({"frames": frames, "error": res.stderr.strip().splitlines()[-1:]})
            continue
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"  {frames} frames: {out[-1]}", file=sys.stderr)
    return out


def cache_len_decode(model: Any, new: int = 64) -> dict[str, Any]:
    """Batch-1 decode tokens/s with 256 filled slots (a 192-token prompt + 64 new) in caches of 256 and 4096."""
    small, large = CACHE_LENS
    new = min(new, small // 4)
    ids = np.random.default_rng(0).integers(100, 1000, small - new).astype(np.int32)
    out = {}
    for cache_len in CACHE_LENS:
        engine = SlotEngine(model.module, model.params, slots=1, cache_len=cache_len, mesh=model.mesh)
        rates = []
        for _ in range(3):  # the first compiles
            (c,) = engine.run([Request(id=0, ids=ids, sampling=SamplingConfig(max_new_tokens=new, eos_token_id=()))])
            rates.append((len(c.tokens) - 1) / (c.seconds - c.first_token_s))
        out[str(cache_len)] = max(rates[1:])
    out["ratio_large_over_small"] = out[str(large)] / out[str(small)]
    return out


def plot_done(path: Path, series: dict[str, list[float]], title: str) -> None:
    """Requests done against time, one line per side."""
    from internvl_jax.plots import lines

    lines(path, {name: [(0.0, 0.0)] + [(t, i + 1) for i, t in enumerate(done)] for name, done in series.items()},
          title + " - requests done vs seconds")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    import jax

    from internvl_jax.modeling import InternVL
    from internvl_jax.presets import shape_of

    report: dict[str, Any] = {"preset": args.preset, "dtype": args.dtype, "workload": args.workload,
                              "machine": {"platform": platform.platform(), "processor": cpu_name(),
                                          "devices": [str(d) for d in jax.devices()], "jax": jax.__version__}}
    if args.workload == "prompt-memory":
        report["prompt_memory"] = prompt_memory(args)
        return report
    model = InternVL.from_config(shape_of(args.preset), dtype=args.dtype, seed=0)
    if args.workload == "mixed":
        report["mixed"] = mixed(model, args)
    else:
        report["cache_len"] = cache_len_decode(model)
    return report


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal (the JSON has everything)."""
    head = f"{report['preset']} {report['dtype']} on {report['machine']['processor']}"
    if "mixed" in report:
        m = report["mixed"]
        rows = [f"{head}: {m['requests']} mixed requests, {m['slots']} slots (cache {m['cache_len']})",
                "| | generated tok/s | requests/s | TTFT p50 (s) | TTFT p99 (s) | wall (s) | of it compiling (s) |",
                "|---|---|---|---|---|---|---|"]
        for side in ("engine", "static"):
            r = m[side]
            rows.append(f"| {side} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.3f} | {r['ttft_s']['p50']:.1f} "
                        f"| {r['ttft_s']['p99']:.1f} | {r['wall_s']:.0f} | {r['compile_s']:.0f} |")
        rows.append(f"engine / static generated tokens/s: {m['engine_over_static_tokens_per_s']:.2f}x "
                    f"({m['engine_over_static_without_compile']:.2f}x without compile time)")
        t = m["engine"]["time"]
        rows.append(f"engine time: vision {t['vision_s']:.0f} s ({t['vision_calls']} calls), prefill "
                    f"{t['prefill_s']:.0f} s ({t['prefill_calls']} calls, {t['prefill_tokens']} tokens with padding), "
                    f"decode {t['decode_s']:.0f} s ({t['decode_steps']} steps, "
                    f"{t['slot_steps'] / max(t['decode_steps'], 1):.1f} busy slots a step)")
        return "\n".join(rows)
    if "cache_len" in report:
        c = report["cache_len"]
        small, large = (k for k in c if k.isdigit())
        return (f"{head}: batch-1 decode with {small} filled slots: {c[small]:.2f} tok/s in a {small}-slot cache, "
                f"{c[large]:.2f} in a {large}-slot cache ({c['ratio_large_over_small']:.2f}x)")
    rows = [f"{head}: one video request, peak resident memory",
            "| frames | prompt tokens | peak RSS (GiB) | weights + KV cache + 2 GiB | seconds |",
            "|---|---|---|---|---|"]
    for r in report["prompt_memory"]:
        if "error" in r:
            rows.append(f"| {r['frames']} | failed: {r['error']} | | | |")
            continue
        rows.append(f"| {r['frames']} | {r['prompt_tokens']} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                    f"{r['budget_bytes'] / 2**30:.2f} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=64, help="mixed: requests in the workload")
    p.add_argument("--slots", type=int, default=16, help="mixed: decode slots (and the static batch size)")
    p.add_argument("--seed", type=int, default=0, help="mixed: the workload's seed")
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32],
                   help="prompt-memory: video frames (256 prompt tokens each at 448px)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m internvl_jax.bench_serving")
    p.add_argument("--one-request", type=int, help=argparse.SUPPRESS)  # a prompt-memory child process
    p.add_argument("--preset", default="InternVL3-1B")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    from internvl_jax.modeling import InternVL
    from internvl_jax.presets import shape_of

    model = InternVL.from_config(shape_of(args.preset), dtype=args.dtype, seed=0)
    print(json.dumps(one_request(model, args.one_request, 16)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
