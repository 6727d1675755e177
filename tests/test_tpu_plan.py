"""`internvl-jax plan --target tpu:...`: programs compiled for a TPU topology on abstract weights (compile only)."""

from __future__ import annotations

import dataclasses
import json

import jax
import pytest

from internvl_jax import compiled, planner
from internvl_jax.cli import main
from internvl_jax.presets import preset
from internvl_jax.sharding import parse_mesh_spec

needs_libtpu = pytest.mark.skipif(not compiled.has_libtpu(), reason=f"needs libtpu ({compiled.TPU_EXTRA})")


def shallow(name: str):
    """A preset's shapes at two layers a tower: the same per-layer shardings, quick to compile."""
    cfg = preset(name)
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=2),
                               vision=dataclasses.replace(cfg.vision, num_layers=2))


@needs_libtpu
@pytest.mark.parametrize("name, topology, spec", [("1B", "v5e:2x4", "tensor=8"), ("1B", "v5e:2x4", "data=2,tensor=4"),
                                                  ("8B", "v5p:2x2x2", "fsdp=2,tensor=4")])
def test_planner_bytes_are_the_compiled_argument_bytes(name: str, topology: str, spec: str) -> None:
    cfg, sizes = shallow(name), parse_mesh_spec(spec)
    mesh = compiled.target_mesh(compiled.tpu_devices(topology), sizes, topology)
    params = compiled.abstract_params_on(cfg, mesh, "bfloat16")
    cache = compiled.abstract_cache_on(cfg, mesh, 8, 1024, "bfloat16")
    planned_w, planned_c = planner.weight_bytes(cfg, sizes), planner.cache_bytes(cfg, sizes, 8, 1024)
    assert compiled.bytes_of(params) == planned_w
    assert compiled.bytes_of((cache.k, cache.v)) == planned_c
    program = jax.jit(lambda p, c: 0, keep_unused=True).lower(params, (cache.k, cache.v)).compile()
    xla = program.memory_analysis().argument_size_in_bytes
    # XLA:TPU pads small arrays (norm scales, biases) to its (8, 128) tiles: a few hundred KB, nothing more.
    assert 0 <= xla - (planned_w + planned_c) <= 0.005 * (planned_w + planned_c), (xla, planned_w + planned_c)


@needs_libtpu
def test_compiled_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--preset", "1B", "--target", "tpu:v5e:2x4", "--mesh", "tensor=8", "--batch", "2",
                 "--context", "256", "--tiles", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"] is True
    assert [p["name"] for p in out["programs"]] == ["prefill", "decode step"]
    per_chip = out["per_chip_bytes"]
    assert per_chip["weights"] == planner.weight_bytes(preset("1B"), {"tensor": 8})
    assert per_chip["kv_cache"] == planner.cache_bytes(preset("1B"), {"tensor": 8}, 2, 256)
    assert per_chip["total"] == per_chip["weights"] + per_chip["kv_cache"] + per_chip["xla_temp"]
    assert out["roofline_seconds"]["decode_step"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--target", "tpu:v9:2x4"], "--target 'tpu:v9:2x4': expected tpu:GENERATION:GRID"),
    (["--target", "tpu"], "--target 'tpu' is not cpu, tpu:GENERATION:GRID"),
    pytest.param(["--target", "tpu:v5e:9x9"], "TPU topology 'v5e:9x9' is not known to libtpu", marks=needs_libtpu),
    pytest.param(["--target", "tpu:v5e:2x4", "--mesh", "tensor=4"],
                 "--mesh tensor=4 has 4 devices but target tpu:v5e:2x4 has 8 chips", marks=needs_libtpu),
    (["--target", "gpu:a100x8"], "--target 'gpu:a100x8': expected gpu:CHIPxCOUNT with CHIP one of h100, h200"),
    (["--target", "gpu:h100x0"], "--target 'gpu:h100x0': expected gpu:CHIPxCOUNT"),
])
def test_bad_targets_one_line_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_without_libtpu_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(compiled, "has_libtpu", lambda: False)
    assert main(["plan", "--target", "tpu:v5p:2x2x2", "--mesh", "tensor=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "internvl-jax plan: error: target tpu:v5p:2x2x2 needs libtpu: pip install -e '.[tpu]'"


def test_gpu_target_without_the_cuda_plugin_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`--target gpu:h100x8` compiles with the jax CUDA plugin (no GPU needed: docs/tpu.md); CI does not install it."""
    if compiled.has_cuda_plugin():  # where it is installed, the same answer as without it
        monkeypatch.setattr(compiled, "has_cuda_plugin", lambda: False)
    assert main(["plan", "--preset", "1B", "--target", "gpu:h100x8", "--mesh", "tensor=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("internvl-jax plan: error: target gpu:h100x8 needs the jax CUDA plugin (compile only, no GPU): "
                   "pip install -e '.[gpu-plan]'")


def test_gpu_target_config_is_the_chip_table() -> None:
    from internvl_jax.targets import CHIPS, parse_target

    target = parse_target("gpu:H200x16")
    assert (target.label, target.chips, target.chip) == ("gpu:h200x16", 16, CHIPS["h200"])
    text = compiled.gpu_target_config(target)
    assert f"device_memory_size: {CHIPS['h200'].hbm}\n" in text and "core_count: 132\n" in text
    assert "cuda_compute_capability { major: 9 minor: 0 }" in text and 'device_description_str: "NVIDIA H200"' in text
