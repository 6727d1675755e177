"""Parity once at the real InternVL3-1B shape (random weights; minutes on 2 cores, so opt-in with -m slow)."""

from __future__ import annotations

import numpy as np
import pytest

from internvl_jax import InternVL
from internvl_jax.presets import preset
from tests import tiny_models as tm


@pytest.mark.slow
def test_internvl3_1b_shape_parity(tmp_path):
    cfg = preset("InternVL3-1B").to_hf_dict()
    ref = tm.torch_model(cfg, seed=3)
    path = tm.save(ref, tmp_path / "1b", "legacy", shard_size="1GB")
    model = InternVL.from_pretrained(path)
    rng = np.random.default_rng(0)
    ids = np.array([tm.prompt(rng, 300, [1], 256)])
    px = rng.standard_normal((1, 3, 448, 448)).astype(np.float32)
    ref_logits = tm.torch_logits(ref, ids, px)
    ours = np.asarray(model(ids, px))
    tol = 1e-4 * max(1.0, float(np.abs(ref_logits).max()))
    assert np.abs(ours - ref_logits).max() <= tol
    assert (ours[0].argmax(-1) == ref_logits[0].argmax(-1)).mean() > 0.99
