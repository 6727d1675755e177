"""Bandwidth of the decoder's own matrix-vector products next to the 1 GiB one that `internvl-jax bench` takes
as the machine's limit, in alternating rounds (the machine's bandwidth drifts).

Shows how close batch-1 decode can come to the bound on XLA:CPU: each layer's kernels are read by separate
products of 0.5-17 MB, and a small product does not reach the bandwidth of a large one.

    python benchmarks/matvec_shapes.py [--preset 1B] [--rounds 4]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from internvl_jax.bench import Bandwidth, quantile_seconds
from internvl_jax.presets import preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1B")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    t = preset(args.preset).text
    shapes = {  # our kernel layout, [in, out]
        "q, o": (t.hidden_size, t.num_heads * t.head_dim),
        "k, v": (t.hidden_size, t.num_kv_heads * t.head_dim),
        "gate, up": (t.hidden_size, t.intermediate_size),
        "down": (t.intermediate_size, t.hidden_size),
        "lm_head": (t.hidden_size, t.padded_vocab),
    }
    def copies(shape: tuple[int, int]) -> int:  # distinct kernels, 256 MB or more: nothing served from cache
        return min(256, -(-(256 << 20) // (4 * shape[0] * shape[1])))

    kernels = {k: [jax.random.normal(jax.random.PRNGKey(i), s) for i in range(copies(s))] for k, s in shapes.items()}
    f = jax.jit(lambda ws, x: [x @ w for w in ws])
    reference = Bandwidth("float32")
    print("GB/s per round: the 1 GiB reference, then each shape (our [in, out] kernels)")
    for _ in range(args.rounds):
        row = [f"1 GiB: {reference.sample() / 1e9:.1f}"]
        for name, ws in kernels.items():
            x = jnp.ones((1, ws[0].shape[0]))
            seconds = quantile_seconds(lambda ws=ws, x=x: jax.block_until_ready(f(ws, x)), q=0.25)
            row.append(f"{name} {ws[0].shape[0]}x{ws[0].shape[1]}: {sum(w.nbytes for w in ws) / seconds / 1e9:.1f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
