"""Batch-1 decode matvec at the InternVL3-1B MLP shape (896 -> 4864) on this CPU: float32 against the ways an int8
or int4 kernel can be multiplied, to pick `quant.dot`'s form (docs/quantization.md).

    PYTHONPATH=$PWD python -m benchmarks.quant_matvec
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from internvl_jax import quant

D, F, G = 896, 4864, 128
bar = jax.lax.optimization_barrier


def forms() -> dict:
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(key, (D, F), jnp.float32) * 0.02
    x = jax.random.normal(key, (1, D), jnp.float32)
    q8, s8 = quant.quantize(w, (1, F), "int8")
    q4, s4 = quant.quantize(w, (D // G, F), "int4")
    xs = jnp.max(jnp.abs(x), -1, keepdims=True) / 127
    xq = jnp.round(x / xs).astype(jnp.int8)
    return {
        "float32 dot": (lambda x, w: x @ w, (x, w)),
        "int8: convert fused into the dot": (lambda x, q, s: (x @ q.astype(jnp.float32)) * s[0], (x, q8, s8)),
        "int8: convert, then the dot (barrier)": (lambda x, q, s: (x @ bar(q.astype(jnp.float32))) * s[0],
                                                  (x, q8, s8)),
        "int8 x int8 -> int32 dot (activations quantized too)": (
            lambda xq, q, s: jax.lax.dot_general(xq, q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
                                                 ).astype(jnp.float32) * xs * s[0], (xq, q8, s8)),
        "int4: dequantize fused into the dot": (lambda x, q, s: x @ quant.dequantize(q, s, jnp.float32), (x, q4, s4)),
        "int4: dequantize, then the dot (barrier)": (lambda x, q, s: x @ bar(quant.dequantize(q, s, jnp.float32)),
                                                     (x, q4, s4)),
        "quant.dot int8 (what the model runs)": (lambda x, q, s: quant.dot(x, q, s, 1), (x, q8, s8)),
        "quant.dot int4 (what the model runs)": (lambda x, q, s: quant.dot(x, q, s, 1), (x, q4, s4)),
    }


def main() -> None:
    print(f"load average {os.getloadavg()[0]:.2f} (a shared machine: other work slows every row alike)")
    for name, (fn, args) in forms().items():
        f = jax.jit(fn)
        f(*args).block_until_ready()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(50):
                r = f(*args)
            r.block_until_ready()
            best = min(best, (time.perf_counter() - t) / 50)
        print(f"| {name} | {best * 1e6:.0f} us |")


if __name__ == "__main__":
    main()
