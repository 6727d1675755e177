"""Quality of quantized weights and of the int8 KV cache against float32, on the same weights and inputs.

    python -m internvl_jax.quant.quality --preset InternVL3-1B      # the figures in docs/quantization.md

Random weights of the preset's shape; image+text prompts (one tile, then text) of `positions` tokens in all;
for each variant, over every position: relative logit error ||l - l_ref|| / ||l_ref||, mean KL(p_ref || p) and
top-1 agreement. The KV-cache variant runs the prompt through an int8 cache (the keys attend as stored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import InternVLConfig
from internvl_jax.model.attention import KeyMask
from internvl_jax.model.decoder import KVCache
from internvl_jax.model.params import module_for, quantize_params, random_params

VARIANTS = {"int8": ("int8", ""), "int4": ("int4", ""), "int8 KV cache": ("", "int8")}


def prompts(config: InternVLConfig, positions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `min(positions, 2 x image tokens)` tokens: 8 text tokens, one tile's image tokens, text; as many rows
    as make `positions` (ids [rows, t], pixels [rows, 3, H, W])."""
    v, image = config.vision, config.image_seq_length
    length = min(positions, 2 * image + 16)
    rows = -(-positions // length)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(config.text.vocab_size, config.image_token_id), (rows, length)).astype(np.int32)
    ids[:, 8:8 + image] = config.image_token_id
    pixels = rng.standard_normal((rows, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return ids, pixels


def logits(config: InternVLConfig, params: Any, ids: np.ndarray, pixels: np.ndarray, quant: str = "",
           kv_cache: str = "") -> np.ndarray:
    """Logits [rows, t, vocab] float32; with `kv_cache`, the prompt goes through a cache of that dtype."""
    module = module_for(config, "float32", quant, kv_cache)
    b, t = ids.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), ids.shape)
    valid = np.ones(ids.shape, bool)

    @jax.jit
    def run(params, ids, pixels):
        cache = None
        mask = KeyMask.uncached(valid)
        if kv_cache:
            cache = KVCache.zeros(config.text, b, t, module.cache_dtype)
            mask = KeyMask(jnp.zeros((b,), jnp.int32), jnp.zeros((b, t), bool), jnp.asarray(valid))
        return module.apply({"params": params}, ids, pixels, positions, mask, cache)[0]

    return np.asarray(run(params, ids, pixels))


def compare(ref: np.ndarray, out: np.ndarray, positions: int | None = None) -> dict[str, float]:
    """Relative logit error, mean KL(ref || out) and top-1 agreement over the first `positions` (default: all)."""
    ref, out = (a.reshape(-1, a.shape[-1])[:positions].astype(np.float64) for a in (ref, out))
    logp, logq = (jax.nn.log_softmax(a, axis=-1) for a in (jnp.asarray(ref), jnp.asarray(out)))
    kl = np.asarray(jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1))
    return {"rel_error": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), "kl": float(kl.mean()),
            "top1": float(np.mean(ref.argmax(-1) == out.argmax(-1))), "positions": int(ref.shape[0])}


def measure(config: InternVLConfig, positions: int = 512, seed: int = 0, variants: tuple[str, ...] = tuple(VARIANTS)
            ) -> dict[str, dict[str, float]]:
    """{variant: compare(float32, variant)} on random weights of `config` and `prompts(config, positions)`."""
    floats = random_params(config, "float32", seed)
    ids, pixels = prompts(config, positions, seed)
    ref = logits(config, floats, ids, pixels)
    out = {}
    for name in variants:
        quant, kv = VARIANTS[name]
        params = quantize_params(config, floats, "float32", quant) if quant else floats
        out[name] = compare(ref, logits(config, params, ids, pixels, quant, kv), positions)
        del params
    return out


def main(argv: list[str] | None = None) -> None:
    from internvl_jax.presets import shape_of

    p = argparse.ArgumentParser(prog="python -m internvl_jax.quant.quality", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="InternVL3-1B", help="preset name or checkpoint directory (its shape)")
    p.add_argument("--positions", type=int, default=512)
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quicker, shallower check)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args(argv)
    config = shape_of(args.preset)
    if args.layers:
        config = config.replace(text=dataclasses.replace(config.text, num_layers=args.layers))
    t0 = time.perf_counter()
    result = measure(config, args.positions)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.preset}, random weights, {args.positions} positions of image+text prompts "
          f"({time.perf_counter() - t0:.0f} s)\n")
    print("| variant | relative logit error | KL(float32 ‖ variant) | top-1 agreement |\n|---|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['rel_error']:.4f} | {r['kl']:.2e} | {r['top1']:.3f} |")


if __name__ == "__main__":
    main()
