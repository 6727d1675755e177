"""One of two local processes of a `jax.distributed` run (see test_multihost.py): each process feeds its own
rows of a batch to a sharded generate; the gathered tokens come back in process order."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main(port: str, process_id: str, ckpt: str, rows_file: str, out: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id))
    from internvl_jax import InternVL
    from internvl_jax.sharding import make_mesh
    from tests import tiny_models as tm

    spec = json.loads(Path(rows_file).read_text())
    mine = spec["rows"][int(process_id)]
    ids, mask = tm.left_pad([r["ids"] for r in mine])
    tiles = sum(r["tiles"] for r in mine)
    px = np.asarray(spec["pixels"][int(process_id)], np.float32) if tiles else None
    mesh = make_mesh("data=2,tensor=2")  # the data axis spans the two processes
    model = InternVL.from_pretrained(ckpt, mesh=mesh)
    tokens = model.generate(ids, px, mask, max_new_tokens=10)
    if jax.process_index() == 0:
        Path(out).write_text(json.dumps({"tokens": tokens.tolist(), "devices": jax.device_count()}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
