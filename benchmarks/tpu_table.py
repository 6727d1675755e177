"""Every InternVL3 preset on the smallest v5e / v5p / v6e slice where it fits (bfloat16, 8k context, batch 1 and 32),
then the decode mesh with the most tokens/s per chip for 8B and 78B. Compiled for the TPU topologies on this machine
(libtpu, compile only: docs/tpu.md); writes one JSON and prints the markdown tables of docs/tpu.md.

    PYTHONPATH=$PWD python -m benchmarks.tpu_table --out docs/benchmarks/tpu-table.json

For each preset, generation and batch the slices are tried smallest first; one whose weights and KV cache alone exceed
HBM (the analytic planner, which equals XLA's argument bytes: tests/test_tpu_plan.py) is skipped without compiling,
and the first whose compiled plan (prefill, decode step: `compiled.compiled_plan`, text only) fits is the row.
The mesh of a slice: `tensor` over as many chips as the KV heads allow (up to 8: one host's ICI neighbours), so the
cache is split rather than replicated; the other chips split the rows (`data`) where the batch allows, else the
weights (`fsdp`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from internvl_jax import compiled, planner
from internvl_jax.config import InternVLConfig
from internvl_jax.presets import preset
from internvl_jax.sharding import parse_mesh_spec
from internvl_jax.targets import GiB, parse_target

PRESETS = ("1B", "2B", "8B", "9B", "14B", "38B", "78B")
# libtpu topology names, smallest first: one host of 4 chips is the smallest libtpu compiles for without being told
# other host bounds ("v5e:1x1": 'not divisible by the given (or default) chips_per_host_bounds "2x2x1"').
SLICES = {"v5e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
          "v6e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
          "v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8")}
BATCHES, CONTEXT = (1, 32), 8192
MESHES = ("tensor=8", "data=2,tensor=4", "data=4,tensor=2", "data=8", "fsdp=2,tensor=4")


def chips_of(grid: str) -> int:
    return math.prod(int(x) for x in grid.split("x"))


def mesh_for(config: InternVLConfig, chips: int, batch: int) -> dict[str, int]:
    """The table's mesh (see the module's docstring)."""
    tensor = math.gcd(chips, config.text.num_kv_heads, 8)
    rest = chips // tensor
    other = "data" if batch % rest == 0 else "fsdp"
    return {"data": 1, "fsdp": 1, "tensor": tensor} | ({other: rest} if rest > 1 else {})


def row(plan: compiled.CompiledPlan, name: str, seconds: float) -> dict:
    step = plan.roofline()["decode_step"]
    chips = math.prod(plan.mesh.values())
    return {"preset": name, "target": plan.target.label, "mesh": {a: n for a, n in plan.mesh.items() if n > 1},
            "batch": plan.batch, "chips": chips, "gib_per_chip": plan.total / GiB, "fits": plan.headroom >= 0,
            "decode_step_ms": step * 1e3, "tokens_per_s_per_sequence": 1 / step,
            "tokens_per_s_batch": plan.batch / step, "tokens_per_s_per_chip": plan.batch / step / chips,
            "compile_s": seconds, "programs": {p.name: p.compile_s for p in plan.programs}}


def compile_row(name: str, target: str, mesh: dict[str, int], batch: int) -> dict:
    t = time.perf_counter()
    try:
        plan = compiled.compiled_plan(preset(name), parse_target(target), mesh, batch, CONTEXT, 0)
    except compiled.TargetError:  # the decode step alone does not fit
        return {"preset": name, "target": target, "mesh": {a: n for a, n in mesh.items() if n > 1}, "batch": batch,
                "fits": False}
    return row(plan, name, time.perf_counter() - t)


def smallest_fit(name: str, generation: str, batch: int, compile_one: Callable[..., dict] = compile_row) -> dict:
    config = preset(name)
    for grid in SLICES[generation]:
        chips = chips_of(grid)
        mesh = mesh_for(config, chips, batch)
        hbm = parse_target(f"tpu:{generation}:{grid}").chip.hbm
        if planner.weight_bytes(config, mesh) + planner.cache_bytes(config, mesh, batch, CONTEXT) > hbm:
            continue  # weights and cache alone do not fit: no compile needed
        result = compile_one(name, f"tpu:{generation}:{grid}", mesh, batch)
        if result["fits"]:
            return result
    return {"preset": name, "target": f"tpu:{generation}", "batch": batch, "fits": False}


def table(rows: list[dict]) -> str:
    lines = ["| preset | batch | slice | mesh | GiB per chip | decode tokens/s per sequence | tokens/s batch | "
             "compile s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["fits"]:
            lines.append(f"| {r['preset']} | {r['batch']} | {r['target']}: no slice up to "
                         f"{SLICES[r['target'].split(':')[1]][-1]} | | | | | |")
            continue
        mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items()) or "1 chip"
        lines.append(f"| {r['preset']} | {r['batch']} | {r['target']} | {mesh} | {r['gib_per_chip']:.1f} | "
                     f"{r['tokens_per_s_per_sequence']:.0f} | {r['tokens_per_s_batch']:.0f} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def mesh_table(rows: list[dict]) -> str:
    lines = ["| preset | slice | mesh | GiB per chip | fits | decode step ms | tokens/s per chip |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items())
        if "gib_per_chip" not in r:  # XLA refused the decode step: its temporaries alone exceed HBM
            lines.append(f"| {r['preset']} | {r['target']} | {mesh} | > HBM | no | | |")
            continue
        lines.append(f"| {r['preset']} | {r['target']} | {mesh} | {r['gib_per_chip']:.1f} | "
                     f"{'yes' if r['fits'] else 'no'} | {r['decode_step_ms']:.2f} | {r['tokens_per_s_per_chip']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/tpu-table.json"))
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--mesh-target", default="tpu:v5p:2x2x2", help="the slice of the mesh comparison")
    p.add_argument("--mesh-presets", default="8B,78B")
    args = p.parse_args()
    # Every compiled row is kept in --out as it comes (a run takes tens of minutes): a rerun compiles only the rest.
    done = json.loads(args.out.read_text()).get("compiled", {}) if args.out.exists() else {}

    def compile_once(name: str, target: str, mesh: dict[str, int], batch: int) -> dict:
        key = f"{name} {target} {','.join(f'{a}={n}' for a, n in mesh.items())} {batch}"
        if key not in done:
            done[key] = compile_row(name, target, mesh, batch)
            args.out.write_text(json.dumps({"context": CONTEXT, "dtype": "bfloat16", "compiled": done}, indent=1))
            print(key, "fits" if done[key]["fits"] else "does not fit", flush=True)
        return done[key]

    rows = [smallest_fit(name, gen, batch, compile_once) for name in args.presets.split(",") for gen in SLICES
            for batch in BATCHES]
    meshes = [compile_once(name, args.mesh_target, parse_mesh_spec(m), 32)
              for name in args.mesh_presets.split(",") for m in MESHES]
    args.out.write_text(json.dumps({"context": CONTEXT, "dtype": "bfloat16", "smallest": rows, "meshes": meshes,
                                    "compiled": done}, indent=1))
    print(table(rows), "\n", mesh_table(meshes), sep="\n")


if __name__ == "__main__":
    main()
