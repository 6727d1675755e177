"""Command-line options shared by `generate`, `batch` and `eval`: generation settings with transformers' names."""

from __future__ import annotations

import argparse
from typing import Any

GENERATION_ARGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling options (unset ones fall back to the checkpoint's generation_config.json) and --dtype."""
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--do-sample", action="store_true", default=None)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="float32", help="float32 (fastest on CPU) or bfloat16")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generation options that were given, as `generate` keyword arguments."""
    return {k: getattr(args, k) for k in GENERATION_ARGS if getattr(args, k, None) is not None}
