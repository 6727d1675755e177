"""Run in a subprocess with 8 virtual CPU devices (see test_quant.py): quantized weights loaded onto a mesh shard
by the rules table (each scale as its weight), give the single-device logits, and convert on the mesh."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from convert import convert  # noqa: E402
from internvl_jax import InternVL, quant  # noqa: E402
from internvl_jax import weights as W  # noqa: E402
from internvl_jax.sharding import make_mesh, param_shardings  # noqa: E402
from tests import tiny_models as tm  # noqa: E402


def _unlike(scale: jax.Array, w: jax.Array) -> bool:
    """Whether some axis of full size is split differently in the scale than in its weight."""
    pad = lambda spec: tuple(spec) + (None,) * (w.ndim - len(spec))  # noqa: E731
    return any(n == m and s != t for n, m, s, t in zip(scale.shape, w.shape, pad(scale.sharding.spec),
                                                       pad(w.sharding.spec), strict=True))


def main(out: str) -> None:
    root = Path(out).parent
    ckpt = tm.save(tm.torch_model(tm.hf_config()), root / "hf", "legacy")
    ids = np.random.default_rng(0).integers(0, 1000, (2, 10)).astype(np.int32)
    report: dict = {}
    for scheme in quant.SCHEMES:
        ref = np.asarray(InternVL.from_pretrained(ckpt, quantize=scheme)(ids))
        mesh = make_mesh("fsdp=2,tensor=4")
        model = InternVL.from_pretrained(ckpt, quantize=scheme, mesh=mesh)
        want = param_shardings(model.config, mesh, quant=scheme)
        flat = W.flatten_paths(model.params)
        wrong = [p for p, a in flat.items() if not a.sharding.is_equivalent_to(want[p], a.ndim)]
        # A scale is split on every axis it shares with its weight at full size (its size-1 axes replicated).
        unlike = [p for p, a in flat.items() if p.endswith(quant.SCALE) and _unlike(a, flat[p[:-len(quant.SCALE)]])]
        split = sum(any(s is not None for s in a.sharding.spec) for p, a in flat.items() if p.endswith(quant.SCALE))
        logits = np.asarray(model(ids))[..., : ref.shape[-1]]
        dst = root / f"conv-{scheme}"
        convert(ckpt, dst, mesh=mesh, quantize=scheme, progress=False)
        back = W.flatten_paths(InternVL.from_pretrained(dst).params)
        single = W.flatten_paths(InternVL.from_pretrained(ckpt, quantize=scheme).params)
        same = all(np.array_equal(np.asarray(back[p], np.float32), np.asarray(single[p], np.float32)) for p in single)
        report[scheme] = {"wrong": wrong, "unlike": unlike, "split_scales": split,
                          "logit_err": float(np.abs(logits - ref).max()), "ref_max": float(np.abs(ref).max()),
                          "converted_equal": same}
    Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
