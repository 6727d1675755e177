"""One batch-1 decode step through the decoder layers, three ways, on the InternVL3-1B shape (random weights):

- scan: the layers scanned over the stacked weights in one program (the on-device loop's step);
- unrolled: one program with every layer spelled out over per-layer weights (compile time printed at the
  model's depth and at twice it);
- layer loop: what `generate` does on one CPU device (engine/layer_loop.py), a compiled group of layers
  called from the host on zero-copy views of the stacked weights.

    python benchmarks/decode_step.py [--preset 1B] [--slots 512]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.bench import quantile_seconds
from internvl_jax.engine import layer_loop
from internvl_jax.model.decoder import Decoder, DecoderLayer, KVCache, rope_tables, write_slots
from internvl_jax.presets import preset


def median_ms(fn) -> float:
    return 1e3 * quantile_seconds(fn, n=15)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1B")
    p.add_argument("--slots", type=int, default=512)
    args = p.parse_args()
    cfg = preset(args.preset).text
    n, slots = cfg.num_layers, args.slots
    decoder = Decoder(cfg, True, jnp.float32, jnp.float32)
    x = jnp.zeros((1, 1, cfg.hidden_size))
    positions = jnp.full((1, 1), slots // 2, jnp.int32)
    mask = jnp.ones((1, 1, slots), bool)

    def fresh_cache(layers: int = n) -> KVCache:
        shape = (layers, 1, slots, cfg.num_kv_heads, cfg.head_dim)
        return KVCache(jnp.zeros(shape), jnp.zeros(shape), jnp.int32(slots // 2))

    params = jax.jit(lambda k: decoder.init(k, x, positions, mask, fresh_cache()))(jax.random.PRNGKey(0))
    stacked = jax.tree.map(lambda a: getattr(a, "value", a), params["params"]["layers"],
                           is_leaf=lambda a: hasattr(a, "value"))
    layer = DecoderLayer(cfg, jnp.float32)
    rope = rope_tables(cfg, positions)

    def scan(stacked, x, cache):
        def body(h, inputs):
            return layer.apply({"params": inputs[0]}, h, inputs[1], rope, mask, cache.slot)

        h, (k, v) = jax.lax.scan(body, x, (stacked, (cache.k, cache.v)))
        return h, write_slots(cache.k, k, 0, cache.slot), write_slots(cache.v, v, 0, cache.slot)

    def unrolled(per_layer, x, cache):
        new = []
        for i, w in enumerate(per_layer):
            x, kv = layer.apply({"params": w}, x, (cache.k[i], cache.v[i]), rope, mask, cache.slot)
            new.append(kv)
        k, v = (jnp.stack([kv[j] for kv in new]) for j in (0, 1))
        return x, write_slots(cache.k, k, 0, cache.slot), write_slots(cache.v, v, 0, cache.slot)

    cache = fresh_cache()
    f = jax.jit(scan)
    print(f"scan:       {median_ms(lambda: jax.block_until_ready(f(stacked, x, cache))):6.1f} ms a step")

    views = layer_loop.layer_views(stacked, n)
    g = jax.jit(unrolled)
    print(f"unrolled:   {median_ms(lambda: jax.block_until_ready(g(views, x, cache))):6.1f} ms a step")
    for depth in (n, 2 * n):
        t = time.perf_counter()
        fresh = jax.jit(lambda *a: unrolled(*a))  # a new function: nothing cached from above
        fresh.lower((views * 2)[:depth], x, fresh_cache(depth)).compile()
        print(f"unrolled:   {time.perf_counter() - t:6.2f} s to compile {depth} layers")

    size = layer_loop.group_size(n)
    run = layer_loop._group_fn(cfg, jnp.dtype(jnp.float32), size)
    groups = [(np.int32(i), tuple(views[i:i + size])) for i in range(0, n, size)]
    slot = np.int32(slots // 2)
    write = layer_loop._write_fn()
    state = {"k": cache.k, "v": cache.v}
    t = time.perf_counter()
    run.lower(groups[0][1], groups[0][0], x, cache.k, cache.v, rope, mask, slot).compile()
    compile_s = time.perf_counter() - t

    def loop():
        h, k, v = x, state["k"], state["v"]
        new_k, new_v = [], []
        for first, group in groups:
            h, nk, nv = run(group, first, h, k, v, rope, mask, slot)  # reads the cache
            new_k.append(nk)
            new_v.append(nv)
        state["k"], state["v"] = write(k, v, tuple(new_k), tuple(new_v), slot)  # in place
        jax.block_until_ready(h)

    print(f"layer loop: {median_ms(loop):6.1f} ms a step ({len(groups)} calls of {size} layers; "
          f"{compile_s:.2f} s to compile, at any depth)")


if __name__ == "__main__":
    main()
