"""Two local processes joined by jax.distributed (CPU collectives) run one sharded batch generate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from internvl_jax import InternVL
from tests import tiny_models as tm

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_like_one(tmp_path):
    cfg = tm.hf_config(text=dict(tm.TEXT, num_attention_heads=8, num_key_value_heads=2))
    path = tm.save(tm.torch_model(cfg, seed=8), tmp_path / "ckpt")
    rng = np.random.default_rng(1)
    per = tm.tokens_per_tile(cfg)
    rows = [[{"ids": tm.prompt(rng, 9 + 4 * i, [1] if i in (1, 3) else [], per), "tiles": int(i in (1, 3))}
             for i in range(3)],
            [{"ids": tm.prompt(rng, 20 - 5 * i, [1] if i == 0 else [], per), "tiles": int(i == 0)}
             for i in range(2)]]
    pixels = [rng.standard_normal((sum(r["tiles"] for r in part), 3, 56, 56)).astype(np.float32) for part in rows]
    spec = tmp_path / "rows.json"
    spec.write_text(json.dumps({"rows": rows, "pixels": [p.tolist() for p in pixels]}))
    out = tmp_path / "out.json"
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", port, str(i), str(path), str(spec),
                               str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    logs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-2000:] for _, err in logs)
    result = json.loads(out.read_text())
    assert result["devices"] == 4

    # One process, the same five rows in process order, left padded together.
    model = InternVL.from_pretrained(path)
    flat = [r["ids"] for part in rows for r in part]
    ids, mask = tm.left_pad(flat)
    single = model.generate(ids, np.concatenate(pixels), mask, max_new_tokens=10)
    multi = np.asarray(result["tokens"])
    assert multi.shape == single.shape
    np.testing.assert_array_equal(multi[:, -10:], single[:, -10:])
    np.testing.assert_array_equal(multi[:, :-10], ids)
