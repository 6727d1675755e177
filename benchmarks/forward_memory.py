"""The forward of issue 13 item 7 at its real size, on 8 CPU devices: peak memory of one process.

    /usr/bin/time -v env PYTHONPATH=$PWD python -m benchmarks.forward_memory --mesh data=2,tensor=4

InternVL3-1B's widths and its 151674-token vocabulary, random weights at `--layers` layers a tower (the logits, not
the depth, are what filled 24 GB), 4 rows x 1043 tokens with 8 tiles (2 images of 4 tiles), float32 as by default.
Prints the compiled per-device figures and the logits' sharding; `/usr/bin/time -v` gives the peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from internvl_jax import InternVL, compiled  # noqa: E402
from internvl_jax.presets import preset  # noqa: E402
from internvl_jax.sharding import make_mesh, param_shardings  # noqa: E402
from internvl_jax.weights import flatten_paths, unflatten_paths  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mesh", default="data=2,tensor=4")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1043)
    p.add_argument("--tiles", type=int, default=8)
    args = p.parse_args()
    cfg = preset("1B")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=args.layers),
                              vision=dataclasses.replace(cfg.vision, num_layers=args.layers))
    mesh = make_mesh(args.mesh)
    model = InternVL.from_config(cfg)
    shardings = param_shardings(cfg, mesh)
    model.params = unflatten_paths({k: jax.device_put(v, shardings[k]) for k, v in flatten_paths(model.params).items()})
    model.mesh = mesh
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150000, (args.rows, args.tokens)).astype(np.int32)
    per_row = args.tiles // args.rows * cfg.image_seq_length  # each row: its share of the tiles' image tokens
    ids[:, 1: 1 + per_row] = cfg.image_token_id
    px = rng.standard_normal((args.tiles, 3, 448, 448)).astype(np.float32)
    program, _ = compiled.forward_program(cfg, mesh, args.rows, args.tokens, args.tiles)
    t = time.perf_counter()
    logits = model(ids, px, np.ones_like(ids))
    logits.block_until_ready()
    seconds = time.perf_counter() - t
    print(json.dumps({"mesh": args.mesh, "logits_shape": list(logits.shape), "logits_spec": str(logits.sharding.spec),
                      "per_device_bytes": {"arguments": program.arguments, "output": program.outputs,
                                           "temp": program.temp}, "forward_seconds_with_compile": round(seconds, 1)}))


if __name__ == "__main__":
    main()
