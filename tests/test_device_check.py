"""The prepared accelerator check (benchmarks/device_check.sh) in its CPU smoke mode: every field of its JSON."""

from __future__ import annotations

import json
import math

import pytest

from internvl_jax import device_check


@pytest.mark.slow  # ~25 s alone, ~50 s on a busy 2-core machine: 7 compiled programs and a torch model
def test_smoke_run_writes_every_figure_and_the_greedy_agreement(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert device_check.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"jax", "backend", "devices", "torch", "transformers", "precision", "chip", "presets"} <= set(report)
    assert report["backend"] == "cpu" and report["chip"] is None  # fractions of what was measured here
    assert report["precision"]["weights"] == "bfloat16" and report["precision"]["softmax"] == "float32"
    p = report["presets"]["smoke"]
    for name in ("jax", "torch"):
        r = p["results"][name]
        assert list(r["decode_tokens_per_s"]) == ["1"]
        figures = [r["vision_tiles_per_s"], r["prefill_s"], *r["decode_tokens_per_s"].values(),
                   r["vision_fraction_of_bf16_peak"], r["prefill_fraction_of_bf16_peak"],
                   r["decode_b1_fraction_of_hbm_bound"]]
        assert all(math.isfinite(x) and x > 0 for x in figures), (name, r)
    assert set(p["ratios_jax_over_torch"]) == {"vision_tiles_per_s", "prefill_speed", "decode_b1"}
    agree = p["greedy_agreement"]
    assert agree["tokens"] == 8 == len(agree["jax"]) == len(agree["torch"])
    assert 0 <= agree["fraction_equal"] <= 1
    assert (agree["fraction_equal"] == 1) == (agree["first_difference"] is None)
    assert "greedy tokens equal" in capsys.readouterr().out
