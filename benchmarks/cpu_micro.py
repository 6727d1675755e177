"""The micro-figures behind `internvl-jax bench` on a CPU, each beside torch, in seconds (issue 20):
a plain matmul of the vision tower's shape (also in bfloat16: our layers' form with a float32 result, a plain
bfloat16 dot, torch's), the vision attention (heads x 1025 tokens x head_dim 64) as the tower
runs it on a CPU (`full_attention`: one head at a time), as all heads in one einsum + softmax, as our blockwise
`model.attention` and as torch's `scaled_dot_product_attention`, the exact-erf GELU as our layers compute it and
as `jax.nn.gelu`, the decoder's prefill attention (a 384-token prompt, one head at a time and all heads at once,
against torch's causal SDPA), the decoder MLP's up product [rows, 896] x [896, 4864] at the decode batches 1, 16
and 32 (the batched-decode figure), and the CPU's name and vector extensions. A change to one of them can be
judged in seconds.

    python benchmarks/cpu_micro.py [--heads 16] [--tokens 1025] [--prompt 384] [--rounds 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.bench import cpu_info, quantile_seconds
from internvl_jax.model import attention as attention_module
from internvl_jax.model.attention import KeyMask, attention, einsum_softmax, full_attention
from internvl_jax.model.dot import contract
from internvl_jax.model.layers import ACTIVATIONS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=1025)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=4096)
    p.add_argument("--decoder", type=int, nargs=2, default=(896, 4864), metavar=("WIDTH", "MLP"),
                   help="the decoder's width and MLP width (InternVL3-1B's)")
    p.add_argument("--prompt", type=int, default=384, help="prompt tokens of the decoder's prefill attention")
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

    full = KeyMask(jnp.zeros((1,), jnp.int32), jnp.zeros((1, 0), bool), jnp.ones((1, n), bool))

    def blockwise(q, k, v):  # causal (the decoder's case): half the blocks are skipped
        return attention(q[:, :, :, None], k, v, full)

    jq, jk, jv, jx, jw, jg = map(jnp.asarray, (q, k, v, x, w, g))
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2).contiguous() for a in (q, k, v))
    matmul, tower, ref, blocks = (jax.jit(f) for f in (lambda a, b: a @ b, full_attention, einsum_softmax, blockwise))
    # bfloat16: our layers' form (`model.dot.contract`: a float32 result, rounded once) and a plain bfloat16 dot
    jxb, jwb = jx.astype(jnp.bfloat16), jw.astype(jnp.bfloat16)
    txb, twb = torch.from_numpy(x).bfloat16(), torch.from_numpy(w).bfloat16()
    bf16_dot = jax.jit(contract)
    gelu, jax_gelu = jax.jit(ACTIVATIONS["gelu"]), jax.jit(lambda a: jax.nn.gelu(a, approximate=False))
    timed = {
        "matmul [n, width] x [width, mlp] jax": lambda: jax.block_until_ready(matmul(jx, jw)),
        "matmul torch": lambda: torch.from_numpy(x) @ torch.from_numpy(w),
        "matmul bfloat16 as our layers (float32 result) jax": lambda: jax.block_until_ready(bf16_dot(jxb, jwb)),
        "matmul bfloat16 with a bfloat16 result jax": lambda: jax.block_until_ready(matmul(jxb, jwb)),
        "matmul bfloat16 torch": lambda: txb @ twb,
        "vision attention as the tower runs it jax": lambda: jax.block_until_ready(tower(jq, jk, jv)),
        "vision attention all heads einsum+softmax jax": lambda: jax.block_until_ready(ref(jq, jk, jv)),
        "causal attention blockwise jax": lambda: jax.block_until_ready(blocks(jq, jk, jv)),
        "vision attention sdpa torch": lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv),
        "gelu exact as our layers jax": lambda: jax.block_until_ready(gelu(jg)),
        "gelu exact jax.nn.gelu (erfc) jax": lambda: jax.block_until_ready(jax_gelu(jg)),
        "gelu exact torch": lambda: torch.nn.functional.gelu(torch.from_numpy(g)),
    }
    # The decoder's prefill attention at InternVL3-1B's heads (14 query heads on 2 KV heads, head_dim 64), causal,
    # as one tile: one head at a time (what runs on a CPU) and all heads at once (before), each compiled under its
    # form, beside torch's SDPA.
    kv_heads, group, dh = 2, 7, 64
    dq = rng.standard_normal((1, args.prompt, kv_heads, group, dh)).astype(np.float32)
    dk, dv = (rng.standard_normal((1, args.prompt, kv_heads, dh)).astype(np.float32) for _ in range(2))
    causal = KeyMask.uncached(jnp.ones((1, args.prompt), bool))
    forms = {}
    for name, threshold in (("head by head", attention_module.HEAD_LOOP_QUERIES), ("all heads", 10**9)):
        attention_module.HEAD_LOOP_QUERIES, kept = threshold, attention_module.HEAD_LOOP_QUERIES
        forms[name] = jax.jit(lambda q, k, v: attention(q, k, v, causal)).lower(dq, dk, dv).compile()
        attention_module.HEAD_LOOP_QUERIES = kept
    jd = tuple(map(jnp.asarray, (dq, dk, dv)))
    for name, fn in forms.items():
        timed[f"decoder prefill attention {name} jax"] = lambda fn=fn: jax.block_until_ready(fn(*jd))
    tdq = torch.from_numpy(dq).reshape(1, args.prompt, kv_heads * group, dh).transpose(1, 2).contiguous()
    tdk, tdv = (torch.from_numpy(a).transpose(1, 2).contiguous() for a in (dk, dv))
    timed["decoder prefill attention sdpa torch"] = lambda: torch.nn.functional.scaled_dot_product_attention(
        tdq, tdk, tdv, is_causal=True, enable_gqa=True)
    dw = rng.standard_normal(args.decoder).astype(np.float32)
    jdw, tdw = jnp.asarray(dw), torch.from_numpy(dw)
    for rows in (1, 16, 32):
        r = rng.standard_normal((rows, args.decoder[0])).astype(np.float32)
        jr, tr = jnp.asarray(r), torch.from_numpy(r)
        timed[f"decode up product, {rows} rows jax"] = lambda jr=jr: jax.block_until_ready(matmul(jr, jdw))
        timed[f"decode up product, {rows} rows torch"] = lambda tr=tr: tr @ tdw
    out = {"cpu": cpu_info(), "threads_torch": torch.get_num_threads(), "jax": jax.__version__,
           "torch": torch.__version__, "seconds_p50": {}}
    with torch.no_grad():
        for name, fn in timed.items():
            out["seconds_p50"][name] = quantile_seconds(fn, args.rounds)
            print(f"{name:45s} {out['seconds_p50'][name] * 1e3:8.2f} ms")
    print(json.dumps(out["cpu"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
