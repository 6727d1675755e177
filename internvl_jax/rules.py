"""The one table that maps logical axes to mesh axes, and the two ways it is applied.

Every parameter declares logical axis names where it is created (`model/layers.py: weight`), the KV cache in
`KVCache.AXES`, and activations where the modules call `constrain` at layer boundaries. `RULES` below maps each
name to a mesh axis; a dimension that the mesh axis does not divide is replicated instead (InternVL3-1B's 2 KV
heads on a tensor axis of 4, the 6B vision tower's 25 heads, the 151674-token vocabulary of the logits on a
tensor axis of 4), so every model runs on every mesh, and the memory planner reports what that costs.

`spec_for` turns axes into a PartitionSpec (weights, caches and inputs: `internvl_jax.sharding`); `constrain` pins
an activation to it inside a program traced under a mesh (`jax.sharding.use_abstract_mesh`, as `InternVL` does, or
`jax.set_mesh`), and does nothing without one (one device, or the engine, which places its inputs and cache
itself). This module imports nothing of ours: the model modules call it, and `internvl_jax.sharding` (which reads
the modules' declarations) builds on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (None: replicated). The only place where this is decided.
RULES: dict[str, str | None] = {
    # decoder weights
    "vocab": "tensor",  # embedding rows and lm_head columns; the logits' vocabulary
    "embed": "fsdp",  # model width: split only by FSDP (weights gathered per layer)
    "heads": "tensor",  # query heads of weights and activations
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,  # the scanned layer axis
    # vision tower weights
    "vis_embed": "fsdp",
    "vis_heads": "tensor",
    "vis_mlp": "tensor",
    "vis_qk": None,  # joint q/k norm scales (width = all heads)
    # projector
    "proj_in": None,
    "proj_hidden": None,
    # activations (`constrain`), inputs and the cache
    "batch": "data",  # rows
    "length": None,  # token positions
    "act_embed": None,  # hidden states' width, text and vision: whole on every chip (FSDP splits weights only)
    "tiles": "data",  # the vision tower's images, split like rows
    "patches": None,  # a tile's tokens (patches + CLS, or image tokens after the projector)
    "cache_slots": None,
}


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh | Mapping[str, int]) -> PartitionSpec:
    """PartitionSpec of an array with these logical axes: a dim the mesh axis does not divide is replicated.
    `mesh` may be a Mesh or just its axis sizes (the memory planner has no devices)."""
    # A mesh without one of our axes (a user's Mesh(devices, ("data", "tensor"))) has it at size 1.
    sizes = {a: int((mesh.shape if isinstance(mesh, Mesh) else mesh).get(a, 1)) for a in MESH_AXES}
    out: list[str | None] = []
    used: set[str] = set()
    for size, name in zip(shape, axes, strict=True):
        target = RULES.get(name) if name else None
        if target is None or target in used or size % sizes[target] or sizes[target] == 1:
            out.append(None)
        else:
            out.append(target)
            used.add(target)
    return PartitionSpec(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Lay an activation out as the table says for its logical `axes`, under the mesh the program is traced with;
    without one, `x` unchanged. Left to itself XLA propagates whatever the weights suggest, and
    a forward on a mesh kept its inputs and logits whole on every chip (issue 13, item 7)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(x.shape, axes, dict(mesh.shape)))
