"""The prepared accelerator check (issue 13, item 6): `bash benchmarks/device_check.sh` on a GPU machine.

One run, one JSON: for InternVL3-1B and 8B shapes with random weights in bfloat16, our figures and transformers'
on the same weights and inputs (SDPA attention, bfloat16, a static KV cache), measured by `internvl_jax.bench`
(rounds that alternate the two engines): vision tiles/s and its fraction of the chip's bf16 peak, prefill time,
decode tokens/s at batch 1, 16 and 64 and the batch-1 rate's fraction of the HBM bound (decoder bytes per step /
HBM bandwidth), the jax/torch ratios, and whether greedy decoding picks the same tokens in both. The chip's peak
and bandwidth come from `internvl_jax.targets` (datasheet figures); where the device is not in that table (CPU:
`--smoke`) the fractions are of the bandwidth and matmul rate measured in the same run.

The JSON is rewritten after each preset, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from internvl_jax import bench, kernels
from internvl_jax.config import InternVLConfig
from internvl_jax.model.params import precision
from internvl_jax.presets import shape_of
from internvl_jax.targets import CHIPS, Chip

PRESETS = ("InternVL3-1B", "InternVL3-8B")
BATCHES = (1, 16, 64)
AGREEMENT_TOKENS = 32


class TorchStatic(bench.Torch):
    """transformers with SDPA in bfloat16 and a static KV cache (allocated once per call, as ours)."""

    def generate(self, ids: np.ndarray, px: np.ndarray | None, new: int) -> np.ndarray:
        extra = {} if px is None else {"pixel_values": self._tensor(px)}  # None crashes its generate
        with self.torch.no_grad():
            out = self.model.generate(input_ids=self._tensor(ids), **extra, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, pad_token_id=0, cache_implementation="static")
        self._sync()
        return out.cpu().numpy()


def chip_of(device: jax.Device) -> Chip | None:
    """The datasheet facts of the device, when `targets.CHIPS` has it ("NVIDIA H200" -> h200)."""
    kind = device.device_kind.lower()
    return next((c for name, c in CHIPS.items() if name in kind.replace(" ", "")), None)


def smoke_config() -> InternVLConfig:
    """A tiny model for a CPU run of the whole check (tests): text ids up to 1000 (bench.make_inputs) and 56px
    tiles (4 image tokens)."""
    from internvl_jax.demo import demo_config

    config = demo_config(image_token_id=1001, vocab_size=1024)
    return config.replace(vision=dataclasses.replace(config.vision, image_size=56))


def agreement(ours: np.ndarray, theirs: np.ndarray, prompt: int) -> dict[str, Any]:
    """Greedy tokens after the prompt: the fraction equal position by position and the first that differs."""
    a, b = ours[:, prompt:], theirs[:, prompt:]
    same = a == b
    first = int(np.argmin(same[0])) if not same.all() else None
    return {"tokens": int(a.shape[1]), "fraction_equal": float(same.mean()), "first_difference": first,
            "jax": a[0].tolist(), "torch": b[0].tolist()}


def check_preset(config: InternVLConfig, batches: Sequence[int], new: int, repeat: int, dtype: str,
                 bandwidth_bytes: int, chip: Chip | None) -> dict[str, Any]:
    """Every figure for one model shape, ours beside transformers'."""
    from internvl_jax.export import export_model
    from internvl_jax.modeling import InternVL

    t0 = time.perf_counter()
    model = InternVL.from_config(config, dtype=dtype, seed=0)
    jax.block_until_ready(model.params)
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, Path(tmp) / "ckpt")
        torch_engine = TorchStatic(Path(tmp) / "ckpt", dtype)
    setup_s = time.perf_counter() - t0
    bandwidth = bench.Bandwidth(dtype, bandwidth_bytes)
    results, samples = bench.measure([bench.Ours(model), torch_engine], config, batches, new, repeat, bandwidth)
    flops = bench.measured_flops(dtype)
    peak = chip.bf16_flops if chip else flops
    hbm = chip.bandwidth if chip else max(samples)
    step_bytes = bench.decoder_bytes_per_step(config, dtype)
    tile_flops = bench.vision_flops_per_tile(config)
    prefill_flops = bench.decoder_flops(config, config.image_seq_length + bench.TEXT_TOKENS + 4) + tile_flops
    for r in results.values():
        r["vision_fraction_of_bf16_peak"] = r["vision_tiles_per_s"] * tile_flops / peak
        r["prefill_fraction_of_bf16_peak"] = prefill_flops / r["prefill_s"] / peak
        r["decode_b1_fraction_of_hbm_bound"] = r["decode_tokens_per_s"][batches[0]] * step_bytes / hbm
    ids, px = bench.make_inputs(config, 1)
    ours = model.generate(ids, px, max_new_tokens=new, do_sample=False, eos_token_id=())
    theirs = torch_engine.generate(ids, px, new)
    j, t = results["jax"], results["torch"]
    report = {
        "layers": config.text.num_layers, "setup_s": setup_s, "decoder_bytes_per_step": step_bytes,
        "hbm_bound_tokens_per_s_b1": hbm / step_bytes, "peak_flops": peak, "measured_matmul_flops": flops,
        "measured_bandwidth_bytes_per_s": max(samples), "results": results,
        "ratios_jax_over_torch": {"vision_tiles_per_s": j["vision_tiles_per_s"] / t["vision_tiles_per_s"],
                                  "prefill_speed": t["prefill_s"] / j["prefill_s"],
                                  **{f"decode_b{b}": j["decode_tokens_per_s"][b] / t["decode_tokens_per_s"][b]
                                     for b in batches}},
        "greedy_agreement": agreement(np.asarray(ours), theirs, ids.shape[1]),
    }
    del model, torch_engine, bandwidth
    gc.collect()
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    device = jax.devices()[0]
    chip = None if args.smoke else chip_of(device)
    report: dict[str, Any] = {
        "jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "device_kind": device.device_kind, "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_cuda": torch.cuda.is_available(), "platform": platform.platform(), "smoke": args.smoke,
        "chip": dataclasses.asdict(chip) if chip else None, "precision": precision(args.dtype),
        "batches": list(args.batch), "new_tokens": args.new_tokens, "repeat": args.repeat, "presets": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = ["smoke"] if args.smoke else args.presets
    for name in names:
        config = smoke_config() if args.smoke else shape_of(name)
        if args.layers:
            config = config.replace(text=dataclasses.replace(config.text, num_layers=args.layers))
        report["presets"][name] = check_preset(config, args.batch, args.new_tokens, args.repeat, args.dtype,
                                               1 << 22 if args.smoke else bench.BANDWIDTH_BYTES, chip)
        report["elapsed_s"] = time.perf_counter() - t0
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return report


def summary(report: dict[str, Any]) -> str:
    lines = [f"jax {report['jax']} on {report['device_kind']} ({report['backend']}), "
             f"transformers {report['transformers']} (torch {report['torch']})"]
    for name, p in report["presets"].items():
        j = p["results"]["jax"]
        b1 = str(report["batches"][0])
        lines.append(f"{name}: vision {j['vision_tiles_per_s']:.1f} tiles/s ({j['vision_fraction_of_bf16_peak']:.0%}"
                     f" of peak), prefill {j['prefill_s'] * 1e3:.1f} ms, decode "
                     + ", ".join(f"b{b} {v:.0f}" for b, v in j["decode_tokens_per_s"].items())
                     + f" tok/s (b{b1}: {j['decode_b1_fraction_of_hbm_bound']:.0%} of the HBM bound); jax/torch "
                     + ", ".join(f"{k} {v:.2f}x" for k, v in p["ratios_jax_over_torch"].items())
                     + f"; greedy tokens equal {p['greedy_agreement']['fraction_equal']:.0%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m internvl_jax.device_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="device-check.json", help="the JSON written (after each preset)")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), help="model shapes (default: 1B and 8B)")
    p.add_argument("--batch", type=int, nargs="+", default=list(BATCHES), help="decode batch sizes (first: the "
                   "one held against the HBM bound)")
    p.add_argument("--new-tokens", type=int, default=AGREEMENT_TOKENS, help="decode steps timed and compared")
    p.add_argument("--repeat", type=int, default=2, help="rounds per figure")
    p.add_argument("--layers", type=int, help="cap the decoder depth (a quicker, partial check)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (the accelerator default) or float32")
    p.add_argument("--attention", choices=kernels.IMPLS, help="attention implementation (default: the backend's, "
                   "docs/kernels.md)")
    p.add_argument("--smoke", action="store_true", help="a tiny model, batch 1, 8 new tokens, 1 round: the whole "
                   "check on a CPU in well under a minute (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.new_tokens, args.repeat = [1], 8, 1
    try:
        with kernels.use(args.attention):
            report = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
