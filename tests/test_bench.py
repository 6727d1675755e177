"""`internvl-jax bench` end to end on a tiny model, beside torch: every figure, the JSON, the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from internvl_jax import bench, cli
from tests import tiny_models as tm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bench-shape")
    tm.save(tm.torch_model(tm.hf_config(), seed=1), directory)
    return directory


def test_bench_against_torch_writes_every_figure(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "BANDWIDTH_BYTES", 1 << 22)
    out = tmp_path / "out"
    assert cli.main(["bench", "--preset", str(tiny), "--batch", "1", "--new-tokens", "3", "--repeat", "2",
                     "--compare-torch", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["layers"] == tm.TEXT["num_hidden_layers"]
    assert report["precision"] == {"weights": "float32", "activations": "float32", "softmax": "float32",
                                   "norms": "float32", "matmul_precision": "highest", "attention": "reference"}
    assert len(report["bandwidth_samples_GBps"]) == 4  # two rounds x two engines, sampled beside batch 1
    for name in ("jax", "torch"):
        r = report["results"][name]
        figures = [r["vision_tiles_per_s"], r["prefill_s"], r["ttft_cold_s"], r["ttft_warm_s"],
                   *r["decode_tokens_per_s"].values(), r["decode_b1_fraction_of_bandwidth_bound"],
                   r["vision_fraction_of_flops"], r["prefill_fraction_of_flops"], r["peak_host_bytes"]]
        assert all(math.isfinite(x) and x > 0 for x in figures), (name, r)
        assert sorted(r["decode_tokens_per_s"]) == ["1"]
        assert len(r["decode_b1_fraction_per_round"]) == 2
        assert r["peak_device_bytes"] is None  # CPU: host memory is the device memory
    assert report["results"]["jax"]["ttft_cold_s"] > report["results"]["jax"]["ttft_warm_s"]  # compilation
    assert set(report["ratios_jax_over_torch"]) == {"vision_tiles_per_s", "prefill_speed", "decode_b1"}
    assert Image.open(out / "decode.png").size == (720, 440)
    table = capsys.readouterr().out
    assert "| decode tok/s, batch 1 |" in table and "jax/torch" in table
    cpu = report["machine"]["cpu"]  # the machine kind: the CPU's model and its vector extensions
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert cpu["model"] and cpu["model"] in cpuinfo and cpu["model"] in table.splitlines()[0]
    assert ("avx512f" in cpu["vector_extensions"]) == (" avx512f" in cpuinfo)
    assert ("AVX-512" in table.splitlines()[0]) == (" avx512f" in cpuinfo)
    assert torch.is_grad_enabled()  # torch runs under no_grad, not with grad switched off for the process


def test_decoder_bytes_per_step_counts_what_a_decode_step_reads():
    from internvl_jax.presets import preset

    cfg = preset("1B")
    t = cfg.text
    per_layer = (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim  # q, k, v kernels
                 + (t.num_heads + 2 * t.num_kv_heads) * t.head_dim  # their biases
                 + t.num_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
                 + 2 * t.hidden_size)  # two norms
    head = t.padded_vocab * t.hidden_size  # the lm_head (or, when tied, the embedding read as one)
    assert bench.decoder_bytes_per_step(cfg, "float32") == 4 * (t.num_layers * per_layer + t.hidden_size + head)



def test_mixed_workload_writes_its_figures(tiny, tmp_path, capsys, monkeypatch):
    """`bench --workload mixed` on the tiny shape, with short prompts and caches (few programs to
    compile): the engine against static batches, the JSON, the plot (prompt-memory runs children at the 1B
    shape: exercised by its own command, docs/benchmarks.md)."""
    from internvl_jax import bench_serving

    monkeypatch.setattr(bench_serving, "PROMPT_TOKENS", (16, 40))
    monkeypatch.setattr(bench_serving, "NEW_TOKENS", (2, 12))
    out = tmp_path / "out"
    assert cli.main(["bench", "--preset", str(tiny), "--workload", "mixed", "--requests", "4", "--slots", "2",
                     "--out", str(out)]) == 0
    report = json.loads((out / "serving-mixed.json").read_text())["mixed"]
    for side in ("engine", "static"):
        r = report[side]
        assert len(r["done_at_s"]) == 4 and r["tokens_per_s"] > 0 and r["ttft_s"]["p50"] <= r["ttft_s"]["p99"]
        assert 0 <= r["compile_s"] < r["wall_s"]
    assert report["engine_over_static_without_compile"] > 0
    # Both sides generate each request's own tokens: random weights never stop early.
    assert report["engine"]["generated_tokens"] == report["static"]["generated_tokens"]
    t = report["engine"]["time"]  # where the engine's time went: every generated token is a busy slot's step
    assert t["slot_steps"] == report["engine"]["generated_tokens"] and t["decode_steps"] <= t["slot_steps"]
    assert t["vision_s"] + t["prefill_s"] + t["decode_s"] <= report["engine"]["wall_s"]
    Image.open(out / "serving-mixed.png").verify()
    assert "engine / static generated tokens/s" in capsys.readouterr().out


@pytest.mark.slow  # two more decode programs for one ratio; the mixed workload above runs the same engine
def test_cache_len_workload_writes_its_ratio(tiny, tmp_path, monkeypatch):
    from internvl_jax import bench_serving

    monkeypatch.setattr(bench_serving, "CACHE_LENS", (64, 512))
    out = tmp_path / "out"
    assert cli.main(["bench", "--preset", str(tiny), "--workload", "cache-len", "--out", str(out)]) == 0
    c = json.loads((out / "serving-cache-len.json").read_text())["cache_len"]
    assert c["64"] > 0 and c["512"] > 0 and c["ratio_large_over_small"] > 0
