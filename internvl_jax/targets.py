"""Facts about the chips the planner plans for: HBM per chip, HBM bandwidth, dense bf16 peak. One table, with sources.

A target is "cpu" (the analytic plan), "tpu:<topology>" (a libtpu topology name: its generation, then the chip
grid, e.g. tpu:v5p:2x2x2), "gpu:<chip>x<count>" (compiled by the jax CUDA plugin for that many GPUs, e.g. gpu:h100x8)
or a GPU name alone (the analytic plan against its HBM).
"""

from __future__ import annotations

from dataclasses import dataclass

GB, GiB = 10**9, 2**30


@dataclass(frozen=True)
class Chip:
    name: str
    hbm: int  # bytes per chip
    bandwidth: float  # HBM bytes per second
    bf16_flops: float  # dense bf16 peak, per second
    source: str


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", 32 * GiB, 1200 * GB, 275e12, "https://cloud.google.com/tpu/docs/v4"),
    Chip("v5e", 16 * GiB, 819 * GB, 197e12, "https://cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", 95 * GiB, 2765 * GB, 459e12, "https://cloud.google.com/tpu/docs/v5p"),
    Chip("v6e", 32 * GiB, 1640 * GB, 918e12, "https://cloud.google.com/tpu/docs/v6e"),
    Chip("h100", 80 * GB, 3350 * GB, 989e12, "https://www.nvidia.com/en-us/data-center/h100/ (SXM, dense)"),
    Chip("h200", 141 * GB, 4800 * GB, 989e12, "https://www.nvidia.com/en-us/data-center/h200/ (SXM, dense)"),
)}


@dataclass(frozen=True)
class GpuSpec:
    """What XLA's GPU compiler needs to know of a GPU it compiles for without one (its `GpuTargetConfigProto`)."""

    description: str  # the device name XLA reports
    compute_capability: tuple[int, int]
    sm_count: int
    clock_ghz: float  # boost
    l2_bytes: int
    shared_per_sm: int  # bytes of shared memory per SM (228 KiB on Hopper), of which a block may opt in to 227 KiB


# NVIDIA Hopper tuning guide and H100/H200 datasheets: compute capability 9.0, 132 SMs (SXM), 50 MB L2, 1.98 GHz.
GPU_SPECS: dict[str, GpuSpec] = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 1.98, 50 * 2**20, 228 * 1024),
    "h200": GpuSpec("NVIDIA H200", (9, 0), 132, 1.98, 50 * 2**20, 228 * 1024),
}


@dataclass(frozen=True)
class Target:
    kind: str  # "cpu", "tpu" or "gpu"
    chip: Chip | None
    topology: str | None = None  # compiled targets: libtpu's name ("v5p:2x2x2") or a GPU count ("h100x8")

    @property
    def label(self) -> str:
        if self.topology is not None:
            return f"{self.kind}:{self.topology}"
        return "cpu" if self.kind == "cpu" else self.chip.name if self.chip else ""

    @property
    def chips(self) -> int:
        """GPUs of a compiled GPU target ("h100x8": 8)."""
        assert self.kind == "gpu" and self.topology is not None
        return int(self.topology.partition("x")[2])


def parse_target(text: str) -> Target:
    """"cpu", "tpu:v5e:2x4", "h100" -> Target; an unknown one is a ValueError naming it and what is known."""
    s = text.strip().lower()
    if s == "cpu":
        return Target("cpu", None)
    if s.startswith("tpu:"):
        topology = s[4:]
        generation, _, grid = topology.partition(":")
        chip = CHIPS.get(generation)
        if chip is None or chip.name.startswith("h") or not grid:
            tpus = ", ".join(n for n in CHIPS if n.startswith("v"))
            raise ValueError(f"--target {text!r}: expected tpu:GENERATION:GRID with GENERATION one of {tpus}, "
                             "e.g. tpu:v5e:2x4 or tpu:v5p:2x2x2")
        return Target("tpu", chip, topology)
    if s.startswith("gpu:"):
        name, _, count = s[4:].partition("x")
        if name not in GPU_SPECS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--target {text!r}: expected gpu:CHIPxCOUNT with CHIP one of {', '.join(GPU_SPECS)}, "
                             "e.g. gpu:h100x8")
        return Target("gpu", CHIPS[name], f"{name}x{int(count)}")
    if s in CHIPS and not s.startswith("v"):
        return Target("gpu", CHIPS[s])
    raise ValueError(f"--target {text!r} is not cpu, tpu:GENERATION:GRID (e.g. tpu:v5p:2x2x2), gpu:CHIPxCOUNT (e.g. "
                     f"gpu:h100x8) or one of {', '.join(n for n in CHIPS if n.startswith('h'))}")


def chip_table() -> str:
    """The table itself, for the docs and `plan --chips`."""
    rows = [f"{'chip':<6}{'HBM':>12}{'bandwidth':>14}{'bf16 peak':>14}  source"]
    for c in CHIPS.values():
        rows.append(f"{c.name:<6}{c.hbm / GiB:>8.1f} GiB{c.bandwidth / GB:>9.0f} GB/s{c.bf16_flops / 1e12:>8.0f} "
                    f"TFLOPS  {c.source}")
    return "\n".join(rows)
