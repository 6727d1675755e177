"""The decode step compiled for a TPU topology (compile only, libtpu on this machine): no copied cache or weights.

Before the layers stopped writing the cache inside the layer scan, XLA:TPU kept the carried cache in another
layout than the attention's and copied it whole into and out of the loop, and each layer's slice once more:
temporary bytes twice the cache, a step reading ~7x the cache (docs/tpu.md).
"""

from __future__ import annotations

import dataclasses

import pytest

from internvl_jax import compiled
from internvl_jax.presets import preset
from internvl_jax.sharding import parse_mesh_spec

pytestmark = pytest.mark.skipif(not compiled.has_libtpu(), reason=f"needs libtpu ({compiled.TPU_EXTRA})")


def small_1b(layers: int = 4):
    """InternVL3-1B's layer shapes (14 heads, 2 KV heads: replicated on tensor=8) at a few layers."""
    cfg = preset("1B")
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=layers))


@pytest.fixture(scope="module")
def step_bytes() -> compiled.DecodeBytes:
    mesh = compiled.target_mesh(compiled.tpu_devices("v5e:2x4"), parse_mesh_spec("tensor=8"), "tpu:v5e:2x4")
    return compiled.decode_bytes(small_1b(), mesh, batch=8, slots=2048)


def test_decode_step_copies_no_cache(step_bytes: compiled.DecodeBytes) -> None:
    b = step_bytes
    assert b.cache == 2 * 4 * 8 * 2048 * 2 * 64 * 2  # k and v: layers, batch, slots, KV heads, head_dim, bf16
    assert b.cache_copies == 0, [c / 2**20 for c in b.copies[:8]]
    assert b.temp <= 0.05 * b.cache, (b.temp, b.cache)


def test_decode_ratio_is_xla_bytes_over_weights_and_cache(step_bytes: compiled.DecodeBytes) -> None:
    b = step_bytes
    assert b.ratio == pytest.approx(b.accessed / (b.weights + b.cache))
    assert b.accessed > 0 and b.weights > 0
