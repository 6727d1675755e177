"""`internvl-jax bench`: speed of a family-shape model with random weights, optionally beside torch.

Figures (ours, and with --compare-torch transformers on the same weights, measured in rounds that alternate
the two in the same process): vision tower tiles/s; prefill latency for one 448px tile + 64 text tokens;
decode tokens/s at several batch sizes after a 64-token prompt; time to first token cold (compilation
included) and warm; peak host and device memory. Each is also given as a fraction of what the machine
allows: decode against the measured memory bandwidth (decoder bytes read per step), vision and prefill
against the measured matmul FLOP/s."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.model.params import as_dtype, precision, precision_line
from internvl_jax.presets import shape_of

TEXT_TOKENS = 64
BANDWIDTH_BYTES = 1 << 30  # well past the last-level cache


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and the vector extensions its flags list (AVX2, the AVX-512 parts, AMX): XLA:CPU and
    torch pick their kernels by them, so a figure belongs to a machine kind (issue 20)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith(key)), "")  # noqa: E731
    flags = field("flags").split()
    vector = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"model": field("model name") or platform.processor() or platform.machine(), "vector_extensions": vector}


def _best(fn: Callable[[], Any], repeat: int) -> float:
    """Smallest wall time of `repeat` calls (after the caller's warm-up)."""
    return min(_time(fn) for _ in range(repeat))


def quantile_seconds(fn: Callable[[], Any], n: int = 20, q: float = 0.5) -> float:
    """The `q` quantile of `n` timed calls after one warm-up call (for the scripts in benchmarks/)."""
    fn()
    return float(np.quantile([_time(fn) for _ in range(n)], q))


def _time(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----- the machine's limits -----
class Bandwidth:
    """Bytes/s of a jitted matrix-vector product over `nbytes` of weights (the decode access pattern).

    Kept allocated so that it can be sampled right beside each batch-1 decode measurement: on a shared machine
    the bandwidth itself drifts (45-65 GB/s within minutes on the 2-core CI machine)."""

    def __init__(self, dtype: str, nbytes: int = BANDWIDTH_BYTES):
        n = int(math.sqrt(nbytes / jnp.dtype(dtype).itemsize))
        self.w, self.x = jnp.ones((n, n), dtype), jnp.ones((n,), dtype)
        self.f = jax.jit(lambda w, x: w @ x)
        self.f(self.w, self.x).block_until_ready()

    def sample(self, repeat: int = 3) -> float:
        return self.w.nbytes / _best(lambda: self.f(self.w, self.x).block_until_ready(), repeat)


def measured_flops(dtype: str, n: int = 2048) -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    return 2 * n**3 / _best(lambda: f(a).block_until_ready(), 5)


# ----- workload -----
def decoder_bytes_per_step(config, dtype: str, quant: str | None = None) -> int:
    """Weights a decode step reads: every decoder layer, the final norm and the lm_head (not the embedding);
    `quant`: stored quantized (values and scales)."""
    from internvl_jax.model.params import abstract_params
    from internvl_jax.quant import SCALE, nbytes
    from internvl_jax.weights import flatten_paths

    flat = flatten_paths(abstract_params(config, dtype, quant=quant))
    table = ("text/embedding", "text/embedding" + SCALE)
    used = [s for p, s in flat.items() if p.startswith("text/") and p not in table]
    if config.tie_word_embeddings:
        used += [flat[p] for p in table if p in flat]
    return sum(nbytes(s.shape, s.dtype) for s in used)


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


def text_inputs(batch: int, seed: int = 0) -> np.ndarray:
    """TEXT_TOKENS random text ids per row: decode is timed after a short prompt, so that batch 32 does not
    spend minutes in the vision tower (the cache length barely changes a decode step's cost)."""
    return np.random.default_rng(seed).integers(100, 1000, (batch, TEXT_TOKENS))


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

    def peak_device_bytes(self) -> int | None:
        device = jax.local_devices()[0]
        stats = device.memory_stats() if device.platform != "cpu" else None
        return stats.get("peak_bytes_in_use") if stats else None


class Torch:
    """transformers eager with SDPA attention, on the GPU when torch sees one."""

    name = "torch"

    def __init__(self, directory: Path, dtype: str):
        import torch
        from transformers import InternVLForConditionalGeneration

        self.torch = torch  # calls run under torch.no_grad() (not set globally: bench.run is also a library call)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = InternVLForConditionalGeneration.from_pretrained(
            directory, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval().to(self.device)

    def _tensor(self, x: np.ndarray):
        t = self.torch.tensor(x, device=self.device)
        return t.to(self.model.dtype) if t.is_floating_point() else t

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def vision(self, px):
        with self.torch.no_grad():
            self.model.model.get_image_features(pixel_values=self._tensor(px))
        self._sync()

    def prefill(self, ids, px):
        self.generate(ids, px, 1)

    def generate(self, ids, px, new):
        extra = {} if px is None else {"pixel_values": self._tensor(px)}  # None crashes its generate
        with self.torch.no_grad():
            self.model.generate(input_ids=self._tensor(ids), **extra, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0)
        self._sync()

    def peak_device_bytes(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.device == "cuda" else None


def measure(engines: Sequence[Any], config, batches: Sequence[int], new: int, repeat: int,
            bandwidth: Bandwidth, quant: str | None = None) -> tuple[dict[str, dict[str, Any]], list[float]]:
    """Every figure in rounds that alternate the engines (the machine drifts; both see the same drift): the
    figures of each engine by name, and the bandwidth samples (bytes/s) taken beside the batch-1 rounds.

    Decode tokens/s = batch x `new` / (time of generate with new + 1 tokens - time with 1), best round. The
    batch-1 rate is also divided by the bandwidth bound sampled just before it in the same round; the median of
    those per-round fractions is reported."""
    ids1, px1 = make_inputs(config, 1)
    res: dict[str, dict[str, Any]] = {e.name: {} for e in engines}
    for e in engines:  # the first call of each engine: compilation included for ours
        res[e.name]["ttft_cold_s"] = _time(lambda e=e: e.prefill(ids1, px1))
        e.vision(px1)
    step_bytes = decoder_bytes_per_step(config, jnp.dtype(bandwidth.w.dtype).name, quant)
    ttft, vision = defaultdict(list), defaultdict(list)
    for _ in range(repeat):
        for e in engines:
            ttft[e.name].append(_time(lambda e=e: e.prefill(ids1, px1)))
            vision[e.name].append(_time(lambda e=e: e.vision(px1)))
    rates, fractions, bandwidths = defaultdict(dict), defaultdict(list), []
    for b in batches:
        ids = text_inputs(b, seed=b)
        for e in engines:
            e.generate(ids, None, new + 1)  # warm-up (compilation for ours)
        best = defaultdict(float)
        for _ in range(repeat):
            for e in engines:
                bw = bandwidth.sample() if b == 1 else None
                first = _time(lambda e=e, ids=ids: e.prefill(ids, None))
                full = _time(lambda e=e, ids=ids: e.generate(ids, None, new + 1))
                rate = b * new / max(full - first, 1e-9)
                best[e.name] = max(best[e.name], rate)
                if bw is not None:
                    bandwidths.append(bw)
                    fractions[e.name].append(rate / (bw / step_bytes))
        for e in engines:
            rates[e.name][b] = best[e.name]
    for e in engines:
        r = res[e.name]
        r["ttft_warm_s"] = r["prefill_s"] = min(ttft[e.name])
        r["vision_tiles_per_s"] = 1 / min(vision[e.name])
        r["decode_tokens_per_s"] = rates[e.name]
        if fractions[e.name]:
            r["decode_b1_fraction_of_bandwidth_bound"] = float(np.median(fractions[e.name]))
            r["decode_b1_fraction_per_round"] = fractions[e.name]
        r["peak_host_bytes"] = peak_rss_bytes()  # the process's peak: both engines live in it
        r["peak_device_bytes"] = e.peak_device_bytes()
    return res, bandwidths


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
    import dataclasses

    from internvl_jax.modeling import InternVL

    config = shape_of(args.preset)
    if args.layers:
        config = config.replace(text=dataclasses.replace(config.text, num_layers=args.layers))
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu": cpu_info(),
               "devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    bandwidth, flops = Bandwidth(args.dtype, BANDWIDTH_BYTES), measured_flops(args.dtype)
    t0 = time.perf_counter()
    model = InternVL.from_config(config, dtype=args.dtype, seed=0, quantize=args.quantize)
    jax.block_until_ready(model.params)
    engines: list[Any] = [Ours(model)]
    tmp = None
    if args.compare_torch:
        from internvl_jax.export import export_model

        tmp = tempfile.TemporaryDirectory()
        export_model(model, Path(tmp.name) / "ckpt")
        engines.append(Torch(Path(tmp.name) / "ckpt", args.dtype))
    results, samples = measure(engines, config, args.batch, args.new_tokens, args.repeat, bandwidth, args.quantize)
    samples = samples or [bandwidth.sample()]
    bound = max(samples) / decoder_bytes_per_step(config, args.dtype, args.quantize)
    vision_ideal = flops / vision_flops_per_tile(config)
    prefill_tokens = config.image_seq_length + TEXT_TOKENS + 4
    prefill_ideal = (decoder_flops(config, prefill_tokens) + vision_flops_per_tile(config)) / flops
    for r in results.values():
        r["vision_fraction_of_flops"] = r["vision_tiles_per_s"] / vision_ideal
        r["prefill_fraction_of_flops"] = prefill_ideal / r["prefill_s"]
    report = {"preset": args.preset, "dtype": args.dtype, "quantize": args.quantize, "load_average": os.getloadavg(),
              "layers": config.text.num_layers, "machine": machine,
              "measured_bandwidth_GBps": max(samples) / 1e9,
              "bandwidth_samples_GBps": [x / 1e9 for x in samples], "measured_matmul_TFLOPs": flops / 1e12,
              "decode_bound_tokens_per_s_b1": bound, "setup_s": time.perf_counter() - t0, "results": results,
              "precision": precision(args.dtype)}
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


def cpu_name(machine: dict[str, Any]) -> str:
    """The header's machine: the CPU model and its vector extensions (older reports: the processor field)."""
    cpu = machine.get("cpu")
    if not cpu:
        return machine["processor"]
    ext = set(cpu["vector_extensions"])
    vec = [name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in ext]
    vec = vec or (["AVX2"] if "avx2" in ext else [])
    return cpu["model"] + (f" ({', '.join(vec)})" if vec else "")


def table(report: dict[str, Any]) -> str:
    res = report["results"]
    names = list(res)
    rows = [("vision tiles/s", lambda r: f"{r['vision_tiles_per_s']:.3f}"),
            ("prefill 1 tile + 64 tok (s)", lambda r: f"{r['prefill_s']:.2f}"),
            ("TTFT cold (s)", lambda r: f"{r['ttft_cold_s']:.2f}"),
            ("TTFT warm (s)", lambda r: f"{r['ttft_warm_s']:.2f}")]
    for b in next(iter(res.values()))["decode_tokens_per_s"]:
        rows.append((f"decode tok/s, batch {b}", lambda r, b=b: f"{r['decode_tokens_per_s'][b]:.2f}"))
    if "decode_b1_fraction_of_bandwidth_bound" in next(iter(res.values())):
        rows.append(("decode b1 / bandwidth bound (median of rounds)",
                     lambda r: f"{r['decode_b1_fraction_of_bandwidth_bound']:.0%}"))
    rows += [
             ("vision / matmul peak", lambda r: f"{r['vision_fraction_of_flops']:.0%}"),
             ("prefill / matmul peak", lambda r: f"{r['prefill_fraction_of_flops']:.0%}"),
             ("peak host memory, process (GiB)", lambda r: f"{r['peak_host_bytes'] / 2**30:.1f}"),
             ("peak device memory (GiB)", lambda r: "n/a (CPU)" if r["peak_device_bytes"] is None
              else f"{r['peak_device_bytes'] / 2**30:.1f}")]
    bw = f"{min(report['bandwidth_samples_GBps']):.1f}-{report['measured_bandwidth_GBps']:.1f} GB/s"
    weights = f" weights {report['quantize']}" if report.get("quantize") else ""
    lines = [f"{report['preset']} {report['dtype']}{weights} ({report['layers']} decoder layers) on "
             f"{cpu_name(report['machine'])}, {len(report['machine']['devices'])} device(s); measured {bw}, "
             f"{report['measured_matmul_TFLOPs'] * 1e3:.0f} GFLOP/s; decode bound "
             f"{report['decode_bound_tokens_per_s_b1']:.1f} tok/s at batch 1 (at the highest bandwidth)",
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
    p.add_argument("--preset", default="InternVL3-1B",
                   help="family shape (random weights), e.g. 1B, 8B, or a checkpoint directory (its config only)")
    p.add_argument("--dtype", help="float32 or bfloat16 (default: the backend's, model.params.default_dtype: "
                   "bfloat16 on GPU and TPU, float32 on CPU, the fast path there)")
    p.add_argument("--quantize", default=None, choices=("int8", "int4"), help="weights stored quantized")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 32], help="decode batch sizes")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per batch size")
    p.add_argument("--repeat", type=int, default=3, help="rounds per figure (each alternates the engines)")
    p.add_argument("--layers", type=int, help="override the decoder depth (compile-time scaling checks)")
    p.add_argument("--compare-torch", action="store_true", help="also run transformers on the same weights")
    p.add_argument("--out", default="bench-out", help="folder for bench.json and decode.png")
    p.add_argument("--workload", default="speed", choices=("speed", *serving_workloads()),
                   help="speed: the figures above (default); mixed, prompt-memory, cache-len: the slot engine as "
                        "batch and eval runs use it (internvl_jax/bench_serving.py)")
    from internvl_jax.bench_serving import add_arguments as serving_arguments

    serving_arguments(p)


def serving_workloads() -> tuple[str, ...]:
    from internvl_jax.bench_serving import WORKLOADS

    return WORKLOADS


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="internvl-jax bench", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    args.dtype = as_dtype(args.dtype).name  # None: the backend's default
    out = Path(args.out)
    if args.workload != "speed":
        from internvl_jax import bench_serving

        report = bench_serving.run(args)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"serving-{args.workload}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        if args.workload == "mixed":
            m = report["mixed"]
            bench_serving.plot_done(out / "serving-mixed.png", {"engine": m["engine"]["done_at_s"],
                                                                 "static": m["static"]["done_at_s"]},
                                    f"{args.preset} {args.dtype}, {m['requests']} requests, {m['slots']} slots")
        print(bench_serving.summary(report))
        print(f"wrote {path}")
        return 0
    report = run(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(out / "decode.png", report["results"], f"{args.preset} {args.dtype}")
    print(table(report))
    print(precision_line(report["precision"]))
    print(f"wrote {out / 'bench.json'} and {out / 'decode.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
