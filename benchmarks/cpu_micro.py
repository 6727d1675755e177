"""The micro-figures behind `internvl-jax bench` on a CPU, each beside torch, in seconds (issue 20):
a plain matmul of the vision tower's shape, the vision attention (heads x 1025 tokens x head_dim 64) as our
reference einsum + softmax, as our blockwise `model.attention` and as torch's `scaled_dot_product_attention`, the
exact-erf GELU, and the CPU's name and vector extensions. A change to one of them can be judged in seconds.

    python benchmarks/cpu_micro.py [--heads 16] [--tokens 1025] [--rounds 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.bench import quantile_seconds
from internvl_jax.model.attention import KeyMask, attention


def cpu() -> dict[str, object]:
    """The CPU model and the vector extensions its flags list (AVX2, AVX-512 parts, AMX)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    keep = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"model": name, "vector_extensions": keep}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=1025)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    import torch

    rng = np.random.default_rng(0)
    n, h, d = args.tokens, args.heads, args.width // args.heads
    q, k, v = (rng.standard_normal((1, n, h, d)).astype(np.float32) for _ in range(3))
    x = rng.standard_normal((n, args.width)).astype(np.float32)
    w = rng.standard_normal((args.width, args.mlp)).astype(np.float32)
    g = rng.standard_normal((n, args.mlp)).astype(np.float32)

    def reference(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

    full = KeyMask(jnp.zeros((1,), jnp.int32), jnp.zeros((1, 0), bool), jnp.ones((1, n), bool))

    def blockwise(q, k, v):  # causal (the decoder's case): half the blocks are skipped
        return attention(q[:, :, :, None], k, v, full)

    jq, jk, jv, jx, jw, jg = map(jnp.asarray, (q, k, v, x, w, g))
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2).contiguous() for a in (q, k, v))
    matmul, ref, blocks = jax.jit(lambda a, b: a @ b), jax.jit(reference), jax.jit(blockwise)
    gelu = jax.jit(lambda a: jax.nn.gelu(a, approximate=False))
    timed = {
        "matmul [n, width] x [width, mlp] jax": lambda: jax.block_until_ready(matmul(jx, jw)),
        "matmul torch": lambda: torch.from_numpy(x) @ torch.from_numpy(w),
        "vision attention einsum+softmax jax": lambda: jax.block_until_ready(ref(jq, jk, jv)),
        "causal attention blockwise jax": lambda: jax.block_until_ready(blocks(jq, jk, jv)),
        "vision attention sdpa torch": lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv),
        "gelu exact jax": lambda: jax.block_until_ready(gelu(jg)),
        "gelu exact torch": lambda: torch.nn.functional.gelu(torch.from_numpy(g)),
    }
    out = {"cpu": cpu(), "threads_torch": torch.get_num_threads(), "jax": jax.__version__, "torch": torch.__version__,
           "seconds_p50": {}}
    with torch.no_grad():
        for name, fn in timed.items():
            out["seconds_p50"][name] = quantile_seconds(fn, args.rounds)
            print(f"{name:45s} {out['seconds_p50'][name] * 1e3:8.2f} ms")
    print(json.dumps(out["cpu"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
