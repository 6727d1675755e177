"""Command lines: `convert_main` (python -m convert / internvl-jax convert) and `export_main` (internvl-jax export).

Both return a process exit status: 0 on success, 2 with a one-line `error: ...` on stderr for a problem with
the inputs (missing or mismatched checkpoint, existing destination, bad option) or the destination (read-only,
full), 130 after Ctrl-C, so scripts can tell them apart from crashes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from internvl_jax.config import ConfigError
from internvl_jax.interrupts import redelivered
from internvl_jax.safetensors_io import CheckpointError

# OSError: unreadable source files and unwritable destinations (the message names the path).
_USER_ERRORS = (CheckpointError, ConfigError, OSError, ValueError)


def _convert_parser(prog: str = "python -m convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Convert an InternVL safetensors checkpoint (-hf or original "
                                "OpenGVLab layout) to a sharded orbax checkpoint that InternVL.from_pretrained loads.")
    p.add_argument("src", help="checkpoint directory: config.json + model.safetensors (or shards + index)")
    p.add_argument("dst", help="output directory (written to a temporary sibling, renamed when complete)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32", "float16"),
                   help="parameter dtype to store (default: auto, the checkpoint's own)")
    p.add_argument("--quantize", default=None, metavar="{int8,int4}", help="store the weights quantized: int8 per "
                   "output channel or int4 in groups of 128 along the input (default: float)")
    p.add_argument("--layout", default="auto", choices=("auto", "hf", "original"),
                   help="source key layout (default: detected from the tensor names)")
    p.add_argument("--mesh", default=None, help='device mesh used while writing, e.g. "tensor=4" (default: all '
                   "local devices on the fsdp axis); the result restores onto any mesh")
    p.add_argument("--force", action="store_true", help="replace DST if it is an earlier output of ours "
                   "(nothing else is ever replaced)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _export_parser(prog: str = "internvl-jax export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Export a converted (orbax) checkpoint directory to -hf "
                                "safetensors that transformers' InternVLForConditionalGeneration loads.")
    p.add_argument("src", help="directory written by `convert` (or by fine-tuning code that saved with it)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"),
                   help="tensor dtype (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="split into files of at most this size (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace DST if it is an earlier output of ours "
                   "(nothing else is ever replaced)")
    return p


def run_command(fn: Callable[..., object], *args: Any, **kwargs: Any) -> int:
    """`fn(*args, **kwargs)` as a command's exit status: 0, 2 with one line for a user error, 130 for Ctrl-C."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # orbax logs each failed write with its thread's traceback (100+ lines for a full disk) before the error
    # reaches us; the one line below says the same.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        with redelivered():
            fn(*args, **kwargs)
    except _USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written at the destination", file=sys.stderr)
        return 130
    return 0


def convert_main(argv: Sequence[str] | None = None, prog: str = "python -m convert") -> int:
    args = _convert_parser(prog).parse_args(argv)
    from convert.core import convert

    status = run_command(convert, args.src, args.dst, dtype=args.dtype, layout=args.layout, force=args.force,
                         mesh=args.mesh, progress=not args.quiet, quantize=args.quantize)
    if status == 0:
        print(f"wrote {args.dst}", file=sys.stderr)
    return status


def export_main(argv: Sequence[str] | None = None, prog: str = "internvl-jax export") -> int:
    args = _export_parser(prog).parse_args(argv)
    from internvl_jax.export import export_converted

    status = run_command(export_converted, args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                          force=args.force)
    if status == 0:
        print(f"wrote {args.dst}", file=sys.stderr)
    return status
