"""Facts about the chips the planner plans for: HBM per chip, HBM bandwidth, dense bf16 peak. One table, with sources.

A target is "cpu" (the analytic plan), "tpu:<topology>" (a libtpu topology name: its generation, then the chip
grid, e.g. tpu:v5p:2x2x2) or a GPU name (analytic only: there is no compile-only GPU backend here).
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
class Target:
    kind: str  # "cpu", "tpu" or "gpu"
    chip: Chip | None
    topology: str | None = None  # libtpu's name, e.g. "v5p:2x2x2"

    @property
    def label(self) -> str:
        return {"cpu": "cpu", "tpu": f"tpu:{self.topology}"}.get(self.kind, self.chip.name if self.chip else "")


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
    if s in CHIPS and not s.startswith("v"):
        return Target("gpu", CHIPS[s])
    raise ValueError(f"--target {text!r} is not cpu, tpu:GENERATION:GRID (e.g. tpu:v5p:2x2x2) or one of "
                     f"{', '.join(n for n in CHIPS if n.startswith('h'))}")


def chip_table() -> str:
    """The table itself, for the docs and `plan --chips`."""
    rows = [f"{'chip':<6}{'HBM':>12}{'bandwidth':>14}{'bf16 peak':>14}  source"]
    for c in CHIPS.values():
        rows.append(f"{c.name:<6}{c.hbm / GiB:>8.1f} GiB{c.bandwidth / GB:>9.0f} GB/s{c.bf16_flops / 1e12:>8.0f} "
                    f"TFLOPS  {c.source}")
    return "\n".join(rows)
