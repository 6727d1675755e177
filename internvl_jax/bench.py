"""`internvl-jax bench`: speed of a family-shape model with random weights, optionally beside torch.

Figures (ours, and with --compare-torch transformers on the same weights, measured interleaved in the same
process): vision tower tiles/s; prefill latency for one 448px tile + 64 text tokens; decode tokens/s at
several batch sizes; time to first token cold (compilation included) and warm; peak host memory. Each is
also given as a fraction of what the machine allows: decode against the measured memory bandwidth
(decoder bytes read per step), vision and prefill against the measured matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.presets import preset

TEXT_TOKENS = 64


def _best(fn: Callable[[], Any], repeat: int) -> float:
    """Smallest wall time of `repeat` calls (after the caller's warm-up)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----- the machine's limits -----
def measured_bandwidth(dtype: str, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a jitted matrix-vector product over `nbytes` of weights (the decode access pattern)."""
    n = int(math.sqrt(nbytes / jnp.dtype(dtype).itemsize))
    w = jnp.ones((n, n), dtype)
    x = jnp.ones((n,), dtype)
    f = jax.jit(lambda w, x: w @ x)
    f(w, x).block_until_ready()
    return n * n * jnp.dtype(dtype).itemsize / _best(lambda: f(w, x).block_until_ready(), 5)


def measured_flops(dtype: str, n: int = 2048) -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    return 2 * n**3 / _best(lambda: f(a).block_until_ready(), 5)


# ----- workload -----
def decoder_bytes_per_step(config, dtype: str) -> int:
    """Weights a decode step reads: every decoder layer, the final norm and the lm_head (not the embedding)."""
    from internvl_jax.modeling import InternVL
    from internvl_jax.weights import flatten_paths

    flat = flatten_paths(InternVL.abstract_params(config, dtype))
    used = [s for p, s in flat.items() if p.startswith("text/") and p != "text/embedding"]
    if config.tie_word_embeddings:
        used.append(flat["text/embedding"])
    return sum(math.prod(s.shape) * jnp.dtype(dtype).itemsize for s in used)


def vision_flops_per_tile(config) -> float:
    v = config.vision
    s = v.grid * v.grid + 1
    per_layer = 2 * s * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * s * s * v.hidden_size
    projector = 2 * config.image_seq_length * (config.projector_in * config.text.hidden_size
                                               + config.text.hidden_size**2)
    return v.num_layers * per_layer + projector


def decoder_flops(config, tokens: int) -> float:
    t = config.text
    per_token = 2 * t.num_layers * (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
                                    + t.num_heads * t.head_dim * t.hidden_size
                                    + 3 * t.hidden_size * t.intermediate_size)
    return per_token * tokens + 2 * t.hidden_size * t.vocab_size  # lm_head at the last position only


def make_inputs(config, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One 448px tile + TEXT_TOKENS random text ids per row (ids below the special tokens)."""
    rng = np.random.default_rng(seed)
    n = config.image_seq_length
    ids = np.concatenate([rng.integers(100, 1000, (batch, 4)), np.full((batch, n), config.image_token_id),
                          rng.integers(100, 1000, (batch, TEXT_TOKENS))], axis=1)
    v = config.vision
    px = rng.standard_normal((batch, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return ids, px


# ----- the two engines behind one interface -----
class Ours:
    name = "jax"

    def __init__(self, model):
        self.model = model

    def vision(self, px):
        np.asarray(self.model.get_image_features(px))

    def prefill(self, ids, px):  # prompt -> first token
        self.model.generate(ids, px, max_new_tokens=1, eos_token_id=())

    def generate(self, ids, px, new):
        self.model.generate(ids, px, max_new_tokens=new, eos_token_id=())


class Torch:
    name = "torch"

    def __init__(self, directory: Path, dtype: str):
        import torch
        from transformers import InternVLForConditionalGeneration

        self.torch = torch
        torch.set_grad_enabled(False)
        self.model = InternVLForConditionalGeneration.from_pretrained(
            directory, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()

    def vision(self, px):
        self.model.model.get_image_features(pixel_values=self.torch.tensor(px))

    def prefill(self, ids, px):
        self.generate(ids, px, 1)

    def generate(self, ids, px, new):
        self.model.generate(input_ids=self.torch.tensor(ids), pixel_values=self.torch.tensor(px),
                            max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def measure(engine, config, batches: Sequence[int], new: int, repeat: int) -> dict[str, Any]:
    ids1, px1 = make_inputs(config, 1)
    out: dict[str, Any] = {}
    t = time.perf_counter()
    engine.prefill(ids1, px1)
    out["ttft_cold_s"] = time.perf_counter() - t
    out["ttft_warm_s"] = _best(lambda: engine.prefill(ids1, px1), repeat)
    engine.vision(px1)
    out["vision_tiles_per_s"] = 1 / _best(lambda: engine.vision(px1), repeat)
    out["prefill_s"] = out["ttft_warm_s"]
    decode = {}
    for b in batches:
        ids, px = make_inputs(config, b, seed=b)
        engine.generate(ids, px, new + 1)  # warm-up (compilation for ours)
        first = _best(lambda ids=ids, px=px: engine.prefill(ids, px), 1)
        full = _best(lambda ids=ids, px=px: engine.generate(ids, px, new + 1), max(1, repeat - 1))
        decode[b] = b * new / max(full - first, 1e-9)
    out["decode_tokens_per_s"] = decode
    out["peak_host_bytes"] = peak_rss_bytes()
    return out


def plot(path: Path, results: dict[str, dict], title: str) -> None:
    """Decode throughput against batch size, one line per engine (Pillow only)."""
    from PIL import Image, ImageDraw

    w, h, m = 720, 440, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    series = {k: r["decode_tokens_per_s"] for k, r in results.items()}
    batches = sorted({int(b) for s in series.values() for b in s})
    top = max(v for s in series.values() for v in s.values()) * 1.1
    x = lambda i: m + (w - 2 * m) * (i / max(1, len(batches) - 1))  # noqa: E731
    y = lambda v: h - m - (h - 2 * m) * v / top  # noqa: E731
    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    for i, b in enumerate(batches):
        d.text((x(i) - 6, h - m + 8), str(b), fill="black")
    for k in range(5):
        v = top * k / 4
        d.text((6, y(v) - 6), f"{v:.0f}", fill="black")
    colors = {"jax": (30, 90, 200), "torch": (220, 80, 30)}
    for n, (name, s) in enumerate(series.items()):
        pts = [(x(batches.index(int(b))), y(v)) for b, v in sorted(s.items(), key=lambda kv: int(kv[0]))]
        d.line(pts, fill=colors.get(name, "gray"), width=3)
        d.text((w - m - 120, m + 16 * n), f"{name}", fill=colors.get(name, "gray"))
    d.text((m, 16), title + " - decode tokens/s vs batch", fill="black")
    d.text((w // 2 - 20, h - 24), "batch", fill="black")
    img.save(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from internvl_jax.modeling import InternVL

    config = preset(args.preset)
    if args.layers:
        config = config.replace(text=__import__("dataclasses").replace(config.text, num_layers=args.layers))
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    bandwidth, flops = measured_bandwidth(args.dtype), measured_flops(args.dtype)
    t0 = time.perf_counter()
    model = InternVL.from_config(config, dtype=args.dtype, seed=0)
    jax.block_until_ready(model.params)
    engines: list[Any] = [Ours(model)]
    tmp = None
    if args.compare_torch:
        from internvl_jax.export import export_model

        tmp = tempfile.TemporaryDirectory()
        export_model(model, Path(tmp.name) / "ckpt")
        engines.append(Torch(Path(tmp.name) / "ckpt", args.dtype))
    results = {}
    for engine in engines:  # one engine at a time, each fully warmed; same inputs, same process
        results[engine.name] = measure(engine, config, args.batch, args.new_tokens, args.repeat)
    bound = bandwidth / decoder_bytes_per_step(config, args.dtype)
    vision_ideal = flops / vision_flops_per_tile(config)
    prefill_tokens = config.image_seq_length + TEXT_TOKENS + 4
    prefill_ideal = (decoder_flops(config, prefill_tokens) + vision_flops_per_tile(config)) / flops
    for r in results.values():
        r["decode_b1_fraction_of_bandwidth_bound"] = r["decode_tokens_per_s"][args.batch[0]] / bound
        r["vision_fraction_of_flops"] = r["vision_tiles_per_s"] / vision_ideal
        r["prefill_fraction_of_flops"] = prefill_ideal / r["prefill_s"]
    report = {"preset": args.preset, "dtype": args.dtype, "layers": config.text.num_layers, "machine": machine,
              "measured_bandwidth_GBps": bandwidth / 1e9, "measured_matmul_TFLOPs": flops / 1e12,
              "decode_bound_tokens_per_s_b1": bound, "setup_s": time.perf_counter() - t0, "results": results}
    if "torch" in results:
        j, t = results["jax"], results["torch"]
        report["ratios_jax_over_torch"] = {
            "vision_tiles_per_s": j["vision_tiles_per_s"] / t["vision_tiles_per_s"],
            "prefill_speed": t["prefill_s"] / j["prefill_s"],
            **{f"decode_b{b}": j["decode_tokens_per_s"][b] / t["decode_tokens_per_s"][b] for b in args.batch},
        }
    if tmp is not None:
        tmp.cleanup()
    return report


def table(report: dict[str, Any]) -> str:
    res = report["results"]
    names = list(res)
    rows = [("vision tiles/s", lambda r: f"{r['vision_tiles_per_s']:.3f}"),
            ("prefill 1 tile + 64 tok (s)", lambda r: f"{r['prefill_s']:.2f}"),
            ("TTFT cold (s)", lambda r: f"{r['ttft_cold_s']:.2f}"),
            ("TTFT warm (s)", lambda r: f"{r['ttft_warm_s']:.2f}")]
    for b in next(iter(res.values()))["decode_tokens_per_s"]:
        rows.append((f"decode tok/s, batch {b}", lambda r, b=b: f"{r['decode_tokens_per_s'][b]:.2f}"))
    rows += [("decode b1 / bandwidth bound", lambda r: f"{r['decode_b1_fraction_of_bandwidth_bound']:.0%}"),
             ("vision / matmul peak", lambda r: f"{r['vision_fraction_of_flops']:.0%}"),
             ("prefill / matmul peak", lambda r: f"{r['prefill_fraction_of_flops']:.0%}"),
             ("peak host memory (GiB)", lambda r: f"{r['peak_host_bytes'] / 2**30:.1f}")]
    lines = [f"{report['preset']} {report['dtype']} ({report['layers']} decoder layers) on "
             f"{report['machine']['processor']}, {len(report['machine']['devices'])} device(s); measured "
             f"{report['measured_bandwidth_GBps']:.1f} GB/s, {report['measured_matmul_TFLOPs'] * 1e3:.0f} GFLOP/s; "
             f"decode bound {report['decode_bound_tokens_per_s_b1']:.1f} tok/s at batch 1",
             "| figure | " + " | ".join(names) + (" | jax/torch |" if "torch" in res else " |"),
             "|---|" + "---|" * (len(names) + ("torch" in res))]
    ratios = report.get("ratios_jax_over_torch", {})
    ratio_key = {"vision tiles/s": "vision_tiles_per_s", "prefill 1 tile + 64 tok (s)": "prefill_speed"}
    for label, fmt in rows:
        cells = [fmt(res[n]) for n in names]
        if "torch" in res:
            key = ratio_key.get(label) or (f"decode_b{label.rsplit(' ', 1)[-1]}" if label.startswith("decode tok")
                                           else None)
            cells.append(f"{ratios[key]:.2f}x" if key in ratios else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="InternVL3-1B", help="family shape (random weights), e.g. 1B, 8B")
    p.add_argument("--dtype", default="float32", help="float32 (the fast path on CPU) or bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 32], help="decode batch sizes")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per batch size")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--layers", type=int, help="override the decoder depth (compile-time scaling checks)")
    p.add_argument("--compare-torch", action="store_true", help="also run transformers on the same weights")
    p.add_argument("--out", default="bench-out", help="folder for bench.json and decode.png")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="internvl-jax bench", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(out / "decode.png", report["results"], f"{args.preset} {args.dtype}")
    print(table(report))
    print(f"wrote {out / 'bench.json'} and {out / 'decode.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
