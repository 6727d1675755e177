"""Run in a subprocess with 8 virtual CPU devices (test_slots.py): the slot engine on a (data=2, tensor=4) mesh
against generate on one device (the tokens the test process computed: `expected`); writes one JSON object."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

from internvl_jax import InternVL  # noqa: E402
from internvl_jax.engine.slots import SlotEngine  # noqa: E402
from internvl_jax.sharding import make_mesh  # noqa: E402
from tests import tiny_models as tm  # noqa: E402
from tests.test_slots import MESH_REQUESTS, requests  # noqa: E402


def main(out: str, expected: str) -> None:
    path, _ = tm.make(Path(tempfile.mkdtemp()), tm.hf_config(), seed=7)
    mesh = make_mesh("data=2,tensor=4")
    model = InternVL.from_pretrained(path, mesh=mesh)
    alone = json.loads(Path(expected).read_text())
    reqs = requests(*MESH_REQUESTS)
    engine = SlotEngine(model.module, model.params, slots=4, cache_len=256, chunk=32, mesh=mesh)
    done = {c.id: c for c in engine.run(reqs)}
    report = {"same": {r.id: list(done[r.id].tokens) == alone[r.id] for r in reqs},
              "errors": [c.error for c in done.values() if c.error],
              "cache_spec": str(engine.cache.k.sharding.spec)}
    Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
