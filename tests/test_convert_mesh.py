"""Sharded safetensors input, and converted checkpoints restored onto 1 and 8 (virtual CPU) devices.

The multi-device part runs in a subprocess: `--xla_force_host_platform_device_count` must be set before jax
starts, and the rest of the suite keeps its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# 8 devices split weights over both fsdp and tensor (a 2-device tensor mesh adds a compile, not a case).
MESHES = {"1": (1, "data=1"), "8": (8, "fsdp=2,tensor=4")}


def _worker(converted: str, source: str, out: str) -> None:
    """In a process with 8 CPU devices: restore `converted` onto each mesh, check the placements, save logits;
    then convert `source` again on the 8-device mesh (into out/conv8), to be restored elsewhere on 1 device."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from convert import convert
    from internvl_jax import InternVL
    from internvl_jax import weights as W
    from internvl_jax.sharding import make_mesh, param_shardings

    assert len(jax.devices()) == 8, jax.devices()
    inputs = np.load(Path(out) / "inputs.npz")
    report = {}
    for name, (n, spec) in MESHES.items():
        mesh = make_mesh(spec, jax.devices()[:n])
        model = InternVL.from_pretrained(converted, mesh=mesh)
        want = param_shardings(model.config, mesh)
        flat = W.flatten_paths(model.params)
        for path, array in flat.items():
            assert array.sharding.is_equivalent_to(want[path], array.ndim), (name, path, array.sharding)
        # Devices that hold less than the whole array: the restore really split it.
        split = sorted(p for p, a in flat.items() if a.addressable_shards[0].data.size < a.size)
        report[name] = {"devices": len(model.params["text"]["embedding"].sharding.device_set), "split": split}
        logits = np.asarray(model(inputs["ids"], inputs["px"]))[..., : model.config.text.vocab_size]  # tensor=4: padded
        np.save(Path(out) / f"logits_{name}.npy", logits)
    mesh8 = make_mesh(MESHES["8"][1])
    convert(source, Path(out) / "conv8", dtype="float32", mesh=mesh8, progress=False)
    (Path(out) / "report.json").write_text(json.dumps(report))


def test_sharded_input_and_restore_on_1_and_8_devices(tmp_path):
    from convert import convert
    from internvl_jax import InternVL
    from internvl_jax import weights as W
    from tests import tiny_models as tm
    from tests.test_convert import save_original
    from tests.test_model_parity import close

    cfg = tm.hf_config()
    ref = tm.torch_model(cfg, seed=11)
    hf = tm.save(ref, tmp_path / "hf_sharded", "legacy", shard_size="10MB")
    orig = save_original(ref, cfg, "Qwen2ForCausalLM", tmp_path / "orig_sharded", shard_bytes=10 * 2**20)
    for d in (hf, orig):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 3
    convert(hf, tmp_path / "conv1", dtype="float32", progress=False)
    convert(orig, tmp_path / "conv1_orig", dtype="float32", progress=False)

    rng = np.random.default_rng(0)
    px = rng.standard_normal((4, 3, 56, 56)).astype(np.float32)  # two rows, one 2-tile image each
    ids = np.array([tm.prompt(rng, 30, [2], tm.tokens_per_tile(cfg)) for _ in range(2)])
    out = tmp_path / "out"
    out.mkdir()
    np.savez(out / "inputs.npz", ids=ids, px=px)
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
                        "PYTHONPATH": str(REPO)}
    args = ", ".join(repr(str(p)) for p in (tmp_path / "conv1", hf, out))
    code = f"from tests.test_convert_mesh import _worker; _worker({args})"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]

    report = json.loads((out / "report.json").read_text())
    assert [report[n]["devices"] for n in MESHES] == [1, 8]
    assert not report["1"]["split"]
    assert {"text/layers/gate/kernel", "text/embedding"} <= set(report["8"]["split"])

    expected = tm.torch_logits(ref, ids, px)
    logits = {n: np.load(out / f"logits_{n}.npy") for n in MESHES}
    for n in MESHES:
        close(logits[n], expected)
    close(logits["8"], logits["1"])

    # Converted on 8 devices, restored here on 1; both inputs (-hf and original, sharded) give the same params.
    p1, p8, po = (W.flatten_paths(InternVL.from_pretrained(tmp_path / d).params) for d in
                  ("conv1", "out/conv8", "conv1_orig"))
    assert p1.keys() == p8.keys() == po.keys()
    for k in p1:
        assert np.array_equal(np.asarray(p1[k]), np.asarray(p8[k])), k
        assert np.array_equal(np.asarray(p1[k]), np.asarray(po[k])), k
    close(InternVL.from_pretrained(tmp_path / "out" / "conv8")(ids, px), expected)
