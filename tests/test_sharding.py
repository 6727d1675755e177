"""Sharded runs on 8 virtual CPU devices (in a subprocess: the device count is fixed when JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_jax.planner import parse_bytes, plan
from internvl_jax.presets import preset
from internvl_jax.sharding import RULES, make_mesh

ROOT = Path(__file__).resolve().parent.parent
MESHES = ["1x1", "1x8", "2x4", "4x2"]  # tests/mesh_worker.py: MESHES
VOCAB, PADDED = 151674, 151680  # the tiny models' vocabulary (tiny_models.VOCAB), padded to a multiple of 128


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / "result.json"
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_worker", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", MESHES)
def test_logits_and_greedy_tokens_equal_single_device(results, mesh):
    r = results[mesh]
    assert r["logit_err"] <= 1e-4 * max(1.0, results["ref_max"])
    if mesh in results["generate_meshes"]:
        assert r["tokens_equal"]

@pytest.mark.parametrize("mesh, width, spec", [("1x1", VOCAB, []),
                                               ("4x2", VOCAB, ["None", "None", "tensor"]),
                                               ("1x8", PADDED, ["None", "None", "tensor"]),
                                               ("2x4", PADDED, ["data", "None", "tensor"])])
def test_logits_and_loss_split_over_data_and_vocabulary(results, mesh, width, spec):
    """6 rows: split by a data axis of 2, not of 4 or 8 (the rules table replicates what an axis does not divide).
    151674 = 2 x 75837: a tensor axis of 4 or 8 splits only the padded vocabulary, whose extra columns are the
    float32 minimum (softmax and argmax unchanged)."""
    r = results[mesh]
    assert (r["logits_width"], r["logits_spec"]) == (width, spec)
    assert r["padding_is_min"]
    if mesh in results["loss_meshes"]:  # mesh_worker.LOSS_MESHES: where the vocabulary is split
        assert r["loss_err"] <= 1e-4 * max(1.0, results["ref_max"])
    if mesh in results["grad_meshes"]:  # mesh_worker.GRAD_MESHES: the costly ones
        assert r["grad_err"] <= 1e-4  # jax.grad through `loss` on the mesh (jax.set_mesh would refuse to be traced)


@pytest.mark.parametrize("mesh", ["2x4", "1x8"])
def test_forward_memory_per_device_is_split_and_the_logits_are_not_gathered(results, mesh):
    """Compiled forward, 4 rows x 256 tokens, 2 tiles: a host-fed forward kept the [4, 256, vocab] logits (and all
    XLA derived from the unsplit inputs) whole on every device."""
    one, many = results["1x1"]["forward_bytes"], results[mesh]["forward_bytes"]
    assert many["output"] <= one["output"] / 2 and many["temp"] <= one["temp"] / 2, (one, many)
    assert [s for s in results[mesh]["forward_gathers"] if max(s, default=0) >= VOCAB] == []


@pytest.mark.parametrize("mesh", MESHES)
def test_every_parameter_sharded_as_the_rules_table_says(results, mesh):
    r = results[mesh]
    assert r["wrong_specs"] == []
    assert r["param_bytes_dev0"] == r["planned_param_bytes"]  # the planner predicts the real arrays
    assert r["cache_actual"] == r["cache_planned"]


def test_tensor_axis_shards_heads_mlp_vocab_and_replicates_what_does_not_divide(results):
    s = results["2x4"]["specs"]
    assert s["text/layers/q/kernel"] == ["None", "None", "tensor", "None"]  # 8 query heads / 4
    assert s["text/layers/k/kernel"] == ["None", "None", "None", "None"]  # 2 KV heads: replicated
    assert s["vision/layers/q/kernel"] == ["None", "None", "None", "None"]  # 6 vision heads: replicated
    assert s["vision/layers/fc1/kernel"] == ["None", "None", "tensor"]
    assert s["text/embedding"] == ["tensor", "None"] and s["text/lm_head"] == ["None", "tensor"]
    assert results["2x4"]["cache_spec"] == ["None", "data", "None", "None", "None"]
    assert results["1x8"]["param_bytes_dev0"] < results["2x4"]["param_bytes_dev0"] < results["1x1"][
        "param_bytes_dev0"]


def test_planner_78b_needs_more_than_one_80gb_device_but_fits_eight():
    cfg = preset("InternVL3-78B")
    one = plan(cfg, {}, batch=1, seq=4096, tiles=13, dtype="bfloat16", device_memory=parse_bytes("80GB"))
    eight = plan(cfg, {"tensor": 8}, batch=1, seq=4096, tiles=13, dtype="bfloat16",
                 device_memory=parse_bytes("80GB"))
    assert not one.fits and eight.fits
    # Not a full 1/8: the 6B tower's 25 attention heads do not divide 8 and stay replicated (README).
    assert 150e9 < one.weights < 160e9 and one.weights / 8 < eight.weights < one.weights / 6
    assert "does NOT fit" in one.report() and "fits in" in eight.report()


def test_mesh_strings():
    import jax

    n = len(jax.devices())
    assert make_mesh(None).shape["data"] == n
    with pytest.raises(ValueError, match="axis 'model'"):
        make_mesh("model=2")
    with pytest.raises(ValueError, match="has 3 devices"):
        make_mesh("data=3")
    assert set(RULES.values()) <= {None, "data", "fsdp", "tensor"}
