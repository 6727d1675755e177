"""Command-line options shared by `generate`, `batch` and `eval`: generation settings with transformers' names."""

from __future__ import annotations

import argparse
from typing import Any

GENERATION_ARGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
# Options of `generate` / `batch` that must be whole numbers >= 1 when given.
POSITIVE_ARGS = ("num_frames", "max_patches")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling options (unset ones fall back to the checkpoint's generation_config.json) and --dtype."""
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens to generate (default: generation_config.json, else 20)")
    p.add_argument("--do-sample", action="store_true", default=None,
                   help="sample the next token instead of taking the most likely one (greedy)")
    p.add_argument("--temperature", type=float, help="with --do-sample: divide the logits by this (> 0, finite)")
    p.add_argument("--top-k", type=int, help="with --do-sample: keep only the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float,
                   help="with --do-sample: keep the most likely tokens up to this total probability (0 < p <= 1)")
    p.add_argument("--repetition-penalty", type=float,
                   help="divide the logits of tokens already seen by this (> 0; 1: off)")
    p.add_argument("--seed", type=int, help="random seed for --do-sample (default 0)")
    p.add_argument("--dtype", help="float32 or bfloat16 (default: bfloat16 on GPU and TPU, float32 on CPU, where it "
                   "is the fast path)")
    p.add_argument("--quantize", default=None, metavar="{int8,int4}",
                   help="quantize the weights while loading (a checkpoint converted with --quantize loads quantized)")
    p.add_argument("--kv-cache-dtype", default=None, metavar="{auto,int8}",
                   help="int8: keep keys and values in int8, one scale per token and KV head (default: --dtype)")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`InternVL.from_pretrained` keyword arguments of the model options (--quantize, --kv-cache-dtype)."""
    return {"quantize": getattr(args, "quantize", None), "kv_cache_dtype": getattr(args, "kv_cache_dtype", None)}


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generation options that were given, as `generate` keyword arguments."""
    return {k: getattr(args, k) for k in GENERATION_ARGS if getattr(args, k, None) is not None}


def check_generation_arguments(args: argparse.Namespace) -> None:
    """Refuse bad generation options before any model loads, naming the option. `SamplingConfig.check` decides
    what is valid; its messages start with the field name."""
    from internvl_jax.engine.sampling import SamplingConfig
    from internvl_jax.model.params import as_dtype, check_kv_cache
    from internvl_jax.quant import check_scheme

    if getattr(args, "dtype", None) is not None:  # unset: the backend's, decided when the model loads (asking jax
        args.dtype = as_dtype(args.dtype).name  # for it here would start its backend before jax.distributed)

    try:
        check_scheme(getattr(args, "quantize", None))
        check_kv_cache(getattr(args, "kv_cache_dtype", None))
    except ValueError as exc:
        raise ValueError(f"--{str(exc).replace('_', '-')}") from None
    for key in POSITIVE_ARGS:
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    try:
        SamplingConfig().update(**generation_kwargs(args))
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        raise ValueError(f"--{field.replace('_', '-')} {rest}") from None
