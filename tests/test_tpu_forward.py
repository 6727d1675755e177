"""The user-facing forward compiled for a TPU topology (compile only): activations and logits split as the rules table
says, at the shape of the report in issue 13 (4 rows x 1043 tokens, 8 tiles, the 151674-token vocabulary)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from jax.sharding import Mesh

from internvl_jax import compiled
from internvl_jax.presets import preset
from internvl_jax.rules import MESH_AXES
from internvl_jax.sharding import parse_mesh_spec

# Slow: XLA:TPU takes 1-3 minutes here for the two programs (the CPU mesh test in test_sharding.py is the quick one).
pytestmark = [pytest.mark.skipif(not compiled.has_libtpu(), reason=f"needs libtpu ({compiled.TPU_EXTRA})"),
              pytest.mark.slow]


@pytest.fixture(scope="module")
def programs() -> dict[str, tuple[compiled.Program, str]]:
    cfg = preset("1B")  # its shapes at two layers a tower: the same per-layer shardings, quick to compile
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=2),
                              vision=dataclasses.replace(cfg.vision, num_layers=2))
    devices = compiled.tpu_devices("v5e:2x4")
    meshes = {"one chip": Mesh(np.asarray(devices[:1]).reshape(1, 1, 1), MESH_AXES),
              "data=2,tensor=4": compiled.target_mesh(devices, parse_mesh_spec("data=2,tensor=4"), "tpu:v5e:2x4")}
    out = {}
    for name, mesh in meshes.items():
        program, c = compiled.forward_program(cfg, mesh, batch=4, length=1043, tiles=8)
        out[name] = (program, c.as_text())
    return out


def test_per_chip_output_and_temp_are_at_most_half_of_one_chips(programs) -> None:
    one, many = programs["one chip"][0], programs["data=2,tensor=4"][0]
    assert one.outputs >= 4 * 1043 * 151674 * 4  # the float32 logits
    assert many.outputs <= one.outputs / 2 and many.temp <= one.temp / 2, (one, many)


def test_no_all_gather_of_the_logits(programs) -> None:
    gathers = compiled.gathered_shapes(programs["data=2,tensor=4"][1])
    assert [s for s in gathers if max(s, default=0) >= 151674] == [], gathers
