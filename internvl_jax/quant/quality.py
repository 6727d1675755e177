"""Quality of quantized weights and of the int8 KV cache against float32, on the same weights and inputs.

    python -m internvl_jax.quant.quality --preset InternVL3-1B      # random weights of a real shape
    python -m internvl_jax.quant.quality --model internvl_jax/demo/shapes-internvl   # the trained shapes model

Random weights of the preset's shape and image+text prompts (one tile, then text), or a trained checkpoint's
weights and the shapes task's held-out pictures and conversations; `positions` tokens in all. For each variant,
over every position: relative logit error ||l - l_ref|| / ||l_ref||, mean KL(p_ref || p) and top-1 agreement.
The KV-cache variant runs the prompt through an int8 cache (the keys attend as stored). With `--model`, also the
accuracy of each variant's greedy answers on the shapes held-out set (the drop is what docs/quantization.md
reports against the issue's bounds).
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


def shapes_prompts(model_dir: str, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out shapes conversations (a picture, ten questions and their answers) cut to one length, as many as
    make `positions` tokens."""
    import tempfile

    from internvl_jax.demo import shapes
    from internvl_jax.demo.shapes_model import HELDOUT
    from internvl_jax.processing.processor import InternVLProcessor
    from internvl_jax.runners.records import read_prompts

    processor = InternVLProcessor.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = shapes.write(tmp, 8, HELDOUT["seed"] + 1000, name="quality", questions=10)
        rows = [processor.apply_chat_template(r.conversation, tokenize=True, return_dict=True)
                for r in read_prompts(jsonl)]
    t = min(r["input_ids"].shape[1] for r in rows)
    n = -(-positions // t)
    ids = np.concatenate([r["input_ids"][:, :t] for r in rows[:n]]).astype(np.int32)
    return ids, np.concatenate([r["pixel_values"] for r in rows[:n]])


def measure(config: InternVLConfig, positions: int = 512, seed: int = 0, variants: tuple[str, ...] = tuple(VARIANTS),
            model_dir: str | None = None) -> dict[str, dict[str, float]]:
    """{variant: compare(float32, variant)} on random weights of `config` and `prompts(config, positions)`, or on
    the weights of `model_dir` and `shapes_prompts` (plus each variant's held-out accuracy)."""
    from internvl_jax.demo.shapes_model import heldout_accuracy

    if model_dir is None:
        floats = random_params(config, "float32", seed)
        ids, pixels = prompts(config, positions, seed)
    else:
        from internvl_jax.modeling import InternVL

        floats = InternVL.from_pretrained(model_dir, dtype="float32").params
        ids, pixels = shapes_prompts(model_dir, positions)
    ref = logits(config, floats, ids, pixels)
    out = {}
    for name in variants:
        quant, kv = VARIANTS[name]
        params = quantize_params(config, floats, "float32", quant) if quant else floats
        out[name] = compare(ref, logits(config, params, ids, pixels, quant, kv), positions)
        del params
        if model_dir is not None:
            out[name]["accuracy"] = heldout_accuracy(model_dir, quant, kv)
    if model_dir is not None:
        out["float32"] = {"accuracy": heldout_accuracy(model_dir)}
    return out


def main(argv: list[str] | None = None) -> None:
    from internvl_jax.presets import shape_of

    p = argparse.ArgumentParser(prog="python -m internvl_jax.quant.quality", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="InternVL3-1B", help="preset name or checkpoint directory (its shape)")
    p.add_argument("--model", help="a trained shapes checkpoint: its weights, held-out prompts and accuracy")
    p.add_argument("--positions", type=int, default=512)
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quicker, shallower check)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args(argv)
    config = shape_of(args.model or args.preset)
    if args.layers:
        config = config.replace(text=dataclasses.replace(config.text, num_layers=args.layers))
    t0 = time.perf_counter()
    result = measure(config, args.positions, model_dir=args.model)
    if args.json:
        print(json.dumps(result))
        return
    what = f"{args.model}, trained weights, held-out shapes conversations" if args.model else \
        f"{args.preset}, random weights, image+text prompts"
    print(f"{what}: {args.positions} positions ({time.perf_counter() - t0:.0f} s)\n")
    acc = " held-out accuracy |" if args.model else ""
    print(f"| variant | relative logit error | KL(float32 ‖ variant) | top-1 agreement |{acc}\n|---|---|---|---|"
          + ("---|" if args.model else ""))
    for name, r in result.items():
        cells = [f"{r['rel_error']:.4f}", f"{r['kl']:.2e}", f"{r['top1']:.3f}"] if "kl" in r else ["", "", ""]
        if args.model:
            cells.append(f"{r['accuracy']:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
