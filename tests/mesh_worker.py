"""Run in a subprocess with 8 virtual CPU devices (see test_sharding.py): logits, greedy tokens, parameter
shardings and per-device bytes on several meshes, printed as one JSON object."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from internvl_jax import InternVL, compiled  # noqa: E402
from internvl_jax import weights as W  # noqa: E402
from internvl_jax.planner import cache_bytes, weight_bytes  # noqa: E402
from internvl_jax.sharding import logical_axes, make_mesh, spec_for  # noqa: E402
from tests import tiny_models as tm  # noqa: E402

# data=8 alone is left out: 4x2 has a data axis that does not divide the 6 rows too, and 1x1 the unsplit weights
# (each mesh costs the fixture about half a minute of compiling).
MESHES = {"1x1": "data=1", "1x8": "tensor=8", "2x4": "data=2,tensor=4", "4x2": "data=4,tensor=2"}
# Gradients (compiling the backward pass is a third of this worker's time) on the mesh that splits both rows and
# weights; the other meshes check the forward, the loss and generation.
GRAD_MESHES = ("2x4",)
# The loss (its own program) where the vocabulary's padded columns are split: 1x1 is the unsplit reference's, 4x2
# checks the logits' layout when the data axis does not divide the rows.
LOSS_MESHES = ("1x8", "2x4")
# Generation (the sharded cache, the decode program) where rows and heads are both split: 1x8 splits the same
# 8 query heads and 2 KV heads by the same rules, and its forward and loss are checked above.
GENERATE_MESHES = ("2x4",)
# The compiled forward's memory and gathers: the unsplit mesh and the two that split weights most.
FORWARD_MESHES = ("1x1", "1x8", "2x4")


def main(out: str) -> None:
    # 2 KV heads (fewer than the tensor axis) and 6 vision heads (not a divisor of 4 or 8).
    vision = dict(tm.VISION, hidden_size=48, num_attention_heads=6)
    text = dict(tm.TEXT, num_attention_heads=8, num_key_value_heads=2)
    cfg = tm.hf_config(vision, text)
    path = tm.save(tm.torch_model(cfg, seed=4), Path(tempfile.mkdtemp()) / "ckpt")
    rng = np.random.default_rng(0)
    per = tm.tokens_per_tile(cfg)
    rows = [tm.prompt(rng, 10 + 3 * i, [1] if i % 3 == 0 else [], per) for i in range(6)]
    ids, mask = tm.left_pad(rows)
    px = rng.standard_normal((2, 3, 56, 56)).astype(np.float32)

    base = InternVL.from_pretrained(path)
    ref_logits = np.asarray(base(ids, px, mask))
    labels = np.where(mask.astype(bool), ids, -100)
    ref_loss = float(base.loss(ids, labels, px, mask))

    def loss_of(model: InternVL):
        return lambda params: model.loss(ids, labels, px, mask, params=params)

    ref_grads = W.flatten_paths(jax.grad(loss_of(base))(base.params))
    ref_tokens = base.generate(ids, px, mask, max_new_tokens=12)
    result: dict = {"ref_max": float(np.abs(ref_logits).max()), "grad_meshes": list(GRAD_MESHES),
                     "loss_meshes": list(LOSS_MESHES), "generate_meshes": list(GENERATE_MESHES)}
    for name, spec in MESHES.items():
        devices = jax.devices()[:1] if name == "1x1" else None
        mesh = make_mesh(spec, devices)
        model = InternVL.from_pretrained(path, mesh=mesh)
        forward = model(ids, px, mask)
        logits, vocab = np.asarray(forward), model.config.text.vocab_size
        program, compiled_forward = (compiled.forward_program(model.config, mesh, batch=4, length=256, tiles=2)
                                     if name in FORWARD_MESHES else (None, None))
        tokens = model.generate(ids, px, mask, max_new_tokens=12) if name in GENERATE_MESHES else None
        axes = logical_axes(model.config)
        flat = W.flatten_paths(model.params)
        wrong = [p for p, a in flat.items() if a.sharding.spec != spec_for(a.shape, axes[p], mesh)]
        dev0 = jax.devices()[0]
        actual = sum(s.data.nbytes for a in flat.values() for s in a.addressable_shards if s.device == dev0)
        specs = {p: [str(x) for x in flat[p].sharding.spec] for p in
                 ("text/embedding", "text/lm_head", "text/layers/q/kernel", "text/layers/k/kernel",
                  "vision/layers/q/kernel", "vision/layers/fc1/kernel")}
        from internvl_jax.engine.generate import KVCache  # noqa: F401  (cache sharding checked below)
        from internvl_jax.sharding import cache_sharding

        cache_spec = [str(x) for x in cache_sharding(model.config, mesh, 8, 64).spec]
        cache_planned = cache_bytes(model.config, dict(mesh.shape), 8, 64, "float32")
        cache = jax.jit(lambda: jax.numpy.zeros((2, 8, 64, 2, 8), "float32"),
                        out_shardings=cache_sharding(model.config, mesh, 8, 64))()
        cache_actual = 2 * max(s.data.nbytes for s in cache.addressable_shards)
        result[name] = {
            "logit_err": float(np.abs(logits[..., :vocab] - ref_logits)[mask.astype(bool)].max()),
            "logits_width": logits.shape[-1], "logits_spec": [str(x) for x in forward.sharding.spec],
            "padding_is_min": bool((logits[..., vocab:] == np.finfo(np.float32).min).all()),
            "loss_err": abs(float(model.loss(ids, labels, px, mask)) - ref_loss) if name in LOSS_MESHES else None,
            "grad_err": max(float(np.abs(np.asarray(g) - np.asarray(ref_grads[p])).max())
                            for p, g in W.flatten_paths(jax.grad(loss_of(model))(model.params)).items())
            if name in GRAD_MESHES else None,
            "forward_bytes": program and {"output": program.outputs, "temp": program.temp},
            "forward_gathers": compiled_forward and compiled.gathered_shapes(compiled_forward.as_text()),
            "tokens_equal": None if tokens is None else bool((tokens == ref_tokens).all()),
            "wrong_specs": wrong, "specs": specs, "param_bytes_dev0": int(actual),
            "planned_param_bytes": int(weight_bytes(model.config, dict(mesh.shape), "float32")),
            "cache_spec": cache_spec, "cache_planned": int(cache_planned), "cache_actual": int(cache_actual),
        }
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
