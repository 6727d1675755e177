"""Quantized weights (int8 per output channel, int4 in groups) and the int8 KV cache (`internvl_jax.quant`)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.cli import convert_main, export_main
from internvl_jax import InternVL, checkpoint, compiled, quant
from internvl_jax.cli import main as cli_main
from internvl_jax.demo import demo_config
from internvl_jax.model.params import abstract_params, module_for, quantize_params
from internvl_jax.presets import preset
from internvl_jax.quant import quality
from internvl_jax.sharding import parse_mesh_spec
from internvl_jax.weights import flatten_paths
from tests import tiny_models as tm

# The demo model with 16 image tokens a tile: a whole image+text prompt in a few hundred positions, in seconds.
SMALL = demo_config(999, 1000)
SMALL = SMALL.replace(vision=dataclasses.replace(SMALL.vision, image_size=112))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return tm.save(tm.torch_model(tm.hf_config()), tmp_path_factory.mktemp("quant") / "hf", "legacy")


def test_block_quantization_round_trip():
    w = np.random.default_rng(0).standard_normal((2, 256, 3, 5)).astype(np.float32)
    for scheme, sshape, qmax in (("int8", (2, 1, 3, 5), 127), ("int4", (2, 2, 3, 5), 7)):
        assert quant.scale_shape(w.shape, (1,), scheme) == sshape
        q, scale = quant.quantize(w, sshape, scheme)
        assert q.dtype == quant.storage_dtype(scheme) and scale.shape == sshape
        back = np.asarray(quant.dequantize(q, scale, np.float32))
        # Symmetric rounding: every value within half a step of its block's scale.
        step = np.repeat(np.asarray(scale), 256 // sshape[1], axis=1)
        assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
        assert np.asarray(q.astype(np.int8)).max() == qmax


def test_int4_group_size():
    assert [quant.group_size(n) for n in (896, 4864, 64, 24, 3200)] == [128, 128, 64, 24, 128]
    with pytest.raises(ValueError, match="input width 139"):
        quant.group_size(139)
    # A config with such a width is refused by name when the quantized tree is declared.
    odd = SMALL.replace(text=dataclasses.replace(SMALL.text, intermediate_size=139))
    with pytest.raises(ValueError, match=r"down/kernel has input width 139"):
        abstract_params(odd, quant="int4")


@pytest.mark.slow  # ~17 s: four compiled forwards
def test_quality_against_float32():
    """Relative logit error, KL and top-1 agreement over 512 positions of image+text prompts (random weights)."""
    r = quality.measure(SMALL, 512)
    assert all(v["positions"] == 512 for v in r.values())
    assert r["int8"]["rel_error"] < 0.03 and r["int8"]["kl"] < 1e-4 and r["int8"]["top1"] > 0.95
    assert r["int4"]["rel_error"] < 0.35 and r["int4"]["kl"] < 5e-3 and r["int4"]["top1"] > 0.5
    assert r["int8 KV cache"]["rel_error"] < 0.01 and r["int8 KV cache"]["top1"] > 0.97
    # int4 has 16x fewer levels than int8: clearly worse, and both are not float32.
    assert 0 < r["int8"]["rel_error"] < r["int4"]["rel_error"]


@pytest.mark.parametrize("kv", [None, pytest.param("int8", marks=pytest.mark.slow)])
def test_int8_greedy_tokens_equal_the_int8_forward_argmax(kv):
    model = InternVL.from_config(SMALL, quantize="int8", kv_cache_dtype=kv)
    assert flatten_paths(model.params)["text/layers/q/kernel"].dtype == np.int8
    ids = np.random.default_rng(0).integers(0, 990, (2, 12)).astype(np.int32)
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    new = out[:, ids.shape[1]:]
    argmax = np.asarray(model(out[:, :-1])).argmax(-1)[:, ids.shape[1] - 1:]
    if kv is None:
        np.testing.assert_array_equal(new, argmax)
        return
    # The forward has no cache (keys in float32): the int8 cache may move a near tie, rarely.
    assert (new == argmax).mean() >= 0.85
    many = model.generate_many([{"input_ids": ids[0]}], slots=2, max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(many[0][ids.shape[1]:], new[0])  # the slot engine on the same int8 cache


@pytest.mark.parametrize("scheme", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_from_pretrained_quantizes_while_loading_and_convert_writes_the_same(tmp_path, tiny_hf, scheme):
    floats = InternVL.from_pretrained(tiny_hf)
    loaded = InternVL.from_pretrained(tiny_hf, quantize=scheme)
    want = flatten_paths(quantize_params(floats.config, floats.params, "float32", scheme))
    got = flatten_paths(loaded.params)
    assert got.keys() == want.keys() and any(p.endswith(quant.SCALE) for p in got)
    for p in want:
        assert got[p].dtype == want[p].dtype, p
        np.testing.assert_array_equal(np.asarray(got[p], np.float32), np.asarray(want[p], np.float32), err_msg=p)

    dst = tmp_path / scheme
    assert convert_main([str(tiny_hf), str(dst), "--quantize", scheme, "--quiet"]) == 0
    manifest = checkpoint.read_manifest(dst)
    assert manifest["quantization"] == {"scheme": scheme, "version": quant.VERSION}
    assert manifest["params"]["text/layers/up/kernel"]["dtype"] == scheme
    back = InternVL.from_pretrained(dst)
    assert back.module.quant == scheme
    for p, a in flatten_paths(back.params).items():
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(want[p], np.float32), err_msg=p)


@pytest.mark.slow
def test_float_converted_directory_is_quantized_while_it_loads(tmp_path, tiny_hf):
    assert convert_main([str(tiny_hf), str(tmp_path / "f32"), "--quiet"]) == 0
    got = flatten_paths(InternVL.from_pretrained(tmp_path / "f32", quantize="int8").params)
    want = flatten_paths(InternVL.from_pretrained(tiny_hf, quantize="int8").params)
    for p in want:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=p)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_quantization_inputs(tmp_path, tiny_hf, capsys):
    assert convert_main([str(tiny_hf), str(tmp_path / "x"), "--quantize", "int3"]) == 2
    assert "quantize 'int3'" in _one_error_line(capsys) and not (tmp_path / "x").exists()
    dst = tmp_path / "q"
    assert convert_main([str(tiny_hf), str(dst), "--quantize", "int8", "--quiet"]) == 0
    capsys.readouterr()
    # -hf holds float weights: a quantized checkpoint is not exported (transformers would misread its integers).
    assert export_main([str(dst), str(tmp_path / "hf")]) == 2
    assert "quantized int8" in _one_error_line(capsys) and not (tmp_path / "hf").exists()
    with pytest.raises(ValueError, match="quantized int8"):
        from internvl_jax.export import export_model

        export_model(InternVL.from_pretrained(dst), tmp_path / "hf2")
    with pytest.raises(checkpoint.CheckpointError, match="quantize='int4' cannot be honoured"):
        InternVL.from_pretrained(dst, quantize="int4")
    file = dst / checkpoint.MANIFEST
    manifest = json.loads(file.read_text())
    for edit, match in (({"scheme": "int3", "version": quant.VERSION}, "scheme 'int3'"),
                        ({"scheme": "int8", "version": 0}, "version 0 is older")):
        file.write_text(json.dumps(manifest | {"quantization": edit}))
        with pytest.raises(checkpoint.CheckpointError, match=match):
            InternVL.from_pretrained(dst)
    for option, value in (("--quantize", "int3"), ("--kv-cache-dtype", "fp8")):
        assert cli_main(["generate", "--model", str(tiny_hf), "hi", option, value]) == 2
        assert f"{option} {value!r}".replace("--", "") in _one_error_line(capsys).replace("--", "")
    assert cli_main(["plan", "--preset", "1B", "--quantize", "int3"]) == 2
    assert "quantize 'int3'" in _one_error_line(capsys)


def test_int8_kv_cache_layout():
    assert module_for(SMALL, "bfloat16", kv_cache="int8").cache_dtype == np.int8
    assert module_for(SMALL, "bfloat16").cache_dtype == jnp.bfloat16
    from internvl_jax.model.decoder import KVCache

    cache = KVCache.abstract(SMALL.text, 2, 16, np.int8)
    assert cache.k.dtype == np.int8 and cache.k_scale.shape == (*cache.k.shape[:-1], 1)
    assert KVCache.abstract(SMALL.text, 2, 16, np.float32).k_scale is None
    assert jax.tree.leaves(cache)  # a pytree of arrays the engines allocate


@pytest.mark.slow  # a subprocess with 8 virtual devices: ~1 minute
def test_quantized_weights_shard_by_the_rules_table(tmp_path):
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "tests.quant_mesh_worker", str(out)], cwd=root, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for scheme, r in json.loads(out.read_text()).items():
        assert r["wrong"] == [] and r["unlike"] == [], (scheme, r)
        assert r["split_scales"] > 0  # scales are split across chips too, not copied to every one
        assert r["logit_err"] <= 1e-4 * max(1.0, r["ref_max"]), (scheme, r)
        assert r["converted_equal"], scheme


@pytest.mark.skipif(not compiled.has_libtpu(), reason=f"needs libtpu ({compiled.TPU_EXTRA})")
def test_int8_decode_step_on_tpu_accesses_about_half_the_bfloat16_bytes():
    """The decode step compiled for a TPU (compile only) at the 1B layer shapes, 2 layers: XLA's bytes accessed
    (the layer loop's body counted once, the head whole) with int8 weights against bfloat16 ones.

    XLA:TPU copies each stacked int8 kernel into another tiling before the layer loop (bfloat16 ones are not
    copied; with compiler-chosen parameter layouts the copies stay): 0.62x with the copies, 0.51x without
    (docs/quantization.md)."""
    cfg = preset("1B")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=2))
    mesh = compiled.target_mesh(compiled.tpu_devices("v5e:2x4"), parse_mesh_spec("tensor=8"), "tpu:v5e:2x4")
    bf16 = compiled.decode_bytes(cfg, mesh, batch=1, slots=256)
    int8 = compiled.decode_bytes(cfg, mesh, batch=1, slots=256, quant="int8")
    assert int8.weights <= 0.52 * bf16.weights  # values a byte each, plus one scale per output channel
    assert int8.accessed - sum(int8.copies) <= 0.55 * (bf16.accessed - sum(bf16.copies))
    assert int8.accessed <= 0.65 * bf16.accessed, (int8.accessed, bf16.accessed)


def test_an_integer_dtype_points_to_quantize(tiny_hf):
    with pytest.raises(ValueError, match=r"dtype 'int8'.*pass quantize='int8'"):
        InternVL.from_pretrained(tiny_hf, dtype="int8")
