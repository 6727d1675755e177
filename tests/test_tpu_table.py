"""benchmarks/tpu_table.py (the table of docs/tpu.md): its mesh rule and its search for the smallest slice, with the
compile replaced by a stand-in (the real run compiles for minutes)."""

from __future__ import annotations

import pytest

from benchmarks import tpu_table
from internvl_jax.presets import preset


@pytest.mark.parametrize("name, chips, batch, mesh", [
    ("8B", 8, 32, {"data": 2, "fsdp": 1, "tensor": 4}),  # 4 KV heads: tensor=8 would replicate the cache
    ("8B", 8, 1, {"data": 1, "fsdp": 2, "tensor": 4}),  # one row: the other chips split the weights
    ("1B", 4, 32, {"data": 2, "fsdp": 1, "tensor": 2}),
    ("78B", 16, 32, {"data": 2, "fsdp": 1, "tensor": 8}),
])
def test_mesh_splits_the_kv_heads_then_rows_or_weights(name: str, chips: int, batch: int, mesh: dict) -> None:
    assert tpu_table.mesh_for(preset(name), chips, batch) == mesh


def test_smallest_fit_compiles_only_slices_the_weights_fit_and_stops_at_the_first_that_fits() -> None:
    tried = []

    def compile_one(name: str, target: str, mesh: dict, batch: int) -> dict:
        tried.append(target)
        return {"target": target, "fits": len(tried) == 2}

    result = tpu_table.smallest_fit("78B", "v5e", 1, compile_one)
    # 156 GB of bfloat16 weights: 4 or 8 chips of 16 GiB cannot hold them, so those slices are not compiled.
    assert tried[0] not in ("tpu:v5e:2x2", "tpu:v5e:2x4") and len(tried) == 2
    assert result == {"target": tried[1], "fits": True}
    assert tpu_table.smallest_fit("1B", "v5p", 1, lambda *a: {"fits": False}) == {
        "preset": "1B", "target": "tpu:v5p", "batch": 1, "fits": False}
