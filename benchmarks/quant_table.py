"""InternVL3-38B and 78B with int8 and int4 weights: the smallest TPU slice (v5e, v6e, v5p) and GPU count (H100, H200)
that holds each, batch 1 at 8k context (bfloat16: benchmarks/tpu_table.py, the same settings). TPU rows are compiled
for the topology on this machine (libtpu, compile only: `compiled.compiled_plan` with `quant`), GPU rows are the
analytic planner against HBM.

    PYTHONPATH=$PWD python -m benchmarks.quant_table --out docs/benchmarks/quant-table.json

Slices and meshes as benchmarks/tpu_table.py (its `SLICES` and `mesh_for`); a slice whose weights and cache alone
exceed HBM is skipped without compiling.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.tpu_table import CONTEXT, SLICES, chips_of, mesh_for, row
from internvl_jax import compiled, planner
from internvl_jax.presets import preset
from internvl_jax.targets import CHIPS, GiB, parse_target

PRESETS, SCHEMES, BATCH = ("38B", "78B"), ("int8", "int4"), 1
GPUS, GPU_COUNTS = ("h100", "h200"), (1, 2, 4, 8)


def tpu_fit(name: str, generation: str, quant: str | None) -> dict:
    config = preset(name)
    for grid in SLICES[generation]:
        mesh = mesh_for(config, chips_of(grid), BATCH)
        target = parse_target(f"tpu:{generation}:{grid}")
        if planner.weight_bytes(config, mesh, quant=quant) + planner.cache_bytes(config, mesh, BATCH, CONTEXT) \
                > target.chip.hbm:
            continue
        t = time.perf_counter()
        try:
            plan = compiled.compiled_plan(config, target, mesh, BATCH, CONTEXT, 0, quant=quant)
        except compiled.TargetError:
            continue
        if plan.headroom >= 0:
            return row(plan, name, time.perf_counter() - t) | {"quantize": quant,
                                                               "weights_gib_per_chip": plan.weights / GiB}
    return {"preset": name, "target": f"tpu:{generation}", "quantize": quant, "fits": False}


def gpu_fit(name: str, chip: str, quant: str | None) -> dict:
    config = preset(name)
    for n in GPU_COUNTS:
        mesh = mesh_for(config, n, BATCH)
        p = planner.plan(config, mesh, BATCH, CONTEXT, 0, device_memory=CHIPS[chip].hbm, quant=quant)
        if p.fits:
            return {"preset": name, "target": f"{chip} x{n}", "quantize": quant, "chips": n, "fits": True,
                    "mesh": {a: k for a, k in mesh.items() if k > 1}, "gib_per_chip": p.total / GiB,
                    "weights_gib_per_chip": p.weights / GiB}
    return {"preset": name, "target": chip, "quantize": quant, "fits": False}


def table(rows: list[dict]) -> str:
    lines = ["| preset | weights | smallest slice / GPUs | mesh | weights GiB per chip | total GiB per chip |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if not r["fits"]:
            lines.append(f"| {r['preset']} | {r['quantize']} | {r['target']}: none | | | |")
            continue
        mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items()) or "1 chip"
        lines.append(f"| {r['preset']} | {r['quantize']} | {r['target']} | {mesh} | {r['weights_gib_per_chip']:.1f} | "
                     f"{r['gib_per_chip']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/quant-table.json"))
    p.add_argument("--generations", default=",".join(SLICES))
    p.add_argument("--schemes", default=",".join(("bfloat16", *SCHEMES)))
    args = p.parse_args()
    rows = []
    for name in PRESETS:
        for quant in args.schemes.split(","):
            q = None if quant == "bfloat16" else quant  # bfloat16: the GPU rows (its TPU rows: tpu_table.py)
            some = [] if q is None else [tpu_fit(name, g, q) for g in args.generations.split(",")]
            some += [gpu_fit(name, chip, q) for chip in GPUS]
            rows += [r | {"quantize": quant} for r in some]
            print(table(rows[-len(some):]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"context": CONTEXT, "batch": BATCH, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
