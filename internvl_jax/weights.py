"""The weight table: how each of our parameters maps to a `-hf` checkpoint tensor, both ways.

Shapes, dtypes and logical axes come from the modules (`jax.eval_shape` of `init`); this file holds only
what the modules cannot know: the checkpoint key of each parameter and how its layout differs. Loading,
export and the converter all go through `checkpoint_key` / `to_ours` / `to_torch`.

Layouts of our parameters versus torch:
- `linear`: torch Linear weight [out, in] -> our kernel [*in, *out] (transpose, then split heads).
- `conv`:   torch Conv2d weight [d, c, p, p] -> [c, p, p, d].
- `flat`:   torch tensor of any shape holding our array's values in order (biases split per head, the CLS
            token [1, 1, d] -> [d], position embeddings [1, n, d] -> [n, d]); `lead` leading 1s on export.
- `same`:   identical.
Per-layer tensors (`{i}` in the key) are stacked on a leading layer axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from internvl_jax.config import InternVLConfig

# Our module path -> -hf module key (canonical: the layout transformers' module tree uses).
_MODULES: dict[str, str] = {
    "vision/embeddings": "model.vision_tower.embeddings",
    "vision/layers/norm1": "model.vision_tower.encoder.layer.{i}.layernorm_before",
    "vision/layers/q": "model.vision_tower.encoder.layer.{i}.attention.q_proj",
    "vision/layers/k": "model.vision_tower.encoder.layer.{i}.attention.k_proj",
    "vision/layers/v": "model.vision_tower.encoder.layer.{i}.attention.v_proj",
    "vision/layers/q_norm": "model.vision_tower.encoder.layer.{i}.attention.q_norm",
    "vision/layers/k_norm": "model.vision_tower.encoder.layer.{i}.attention.k_norm",
    "vision/layers/o": "model.vision_tower.encoder.layer.{i}.attention.projection_layer",
    "vision/layers/norm2": "model.vision_tower.encoder.layer.{i}.layernorm_after",
    "vision/layers/fc1": "model.vision_tower.encoder.layer.{i}.mlp.fc1",
    "vision/layers/fc2": "model.vision_tower.encoder.layer.{i}.mlp.fc2",
    "vision/final_norm": "model.vision_tower.layernorm",
    "projector/norm": "model.multi_modal_projector.layer_norm",
    "projector/fc1": "model.multi_modal_projector.linear_1",
    "projector/fc2": "model.multi_modal_projector.linear_2",
    "text/layers/attn_norm": "model.language_model.layers.{i}.input_layernorm",
    "text/layers/q": "model.language_model.layers.{i}.self_attn.q_proj",
    "text/layers/k": "model.language_model.layers.{i}.self_attn.k_proj",
    "text/layers/v": "model.language_model.layers.{i}.self_attn.v_proj",
    "text/layers/o": "model.language_model.layers.{i}.self_attn.o_proj",
    "text/layers/mlp_norm": "model.language_model.layers.{i}.post_attention_layernorm",
    "text/layers/gate": "model.language_model.layers.{i}.mlp.gate_proj",
    "text/layers/up": "model.language_model.layers.{i}.mlp.up_proj",
    "text/layers/down": "model.language_model.layers.{i}.mlp.down_proj",
    "text/final_norm": "model.language_model.norm",
}

# Leaf name -> (key suffix, layout) for ordinary modules.
_LEAVES: dict[str, tuple[str, str]] = {"kernel": ("weight", "linear"), "bias": ("bias", "flat"),
                                       "scale": ("weight", "flat")}

# Parameters that are not an ordinary module leaf: full path -> (key, layout, leading ones on export).
_SPECIAL: dict[str, tuple[str, str, int]] = {
    "vision/embeddings/patch_kernel": ("model.vision_tower.embeddings.patch_embeddings.projection.weight", "conv", 0),
    "vision/embeddings/patch_bias": ("model.vision_tower.embeddings.patch_embeddings.projection.bias", "flat", 0),
    "vision/embeddings/cls_token": ("model.vision_tower.embeddings.cls_token", "flat", 2),
    "vision/embeddings/position_embedding": ("model.vision_tower.embeddings.position_embeddings", "flat", 1),
    "vision/layers/ls1": ("model.vision_tower.encoder.layer.{i}.lambda_1", "flat", 0),
    "vision/layers/ls2": ("model.vision_tower.encoder.layer.{i}.lambda_2", "flat", 0),
    "text/embedding": ("model.language_model.embed_tokens.weight", "same", 0),
    "text/lm_head": ("lm_head.weight", "linear", 0),
}

# Output projections contract two of our dims (heads, head_dim).
_TWO_INPUT_DIMS = ("vision/layers/o", "text/layers/o")

# The older key layout that InternVLForConditionalGeneration.save_pretrained still writes.
LEGACY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


@dataclass(frozen=True)
class Mapping:
    """How one of our parameters is stored in a checkpoint."""

    key: str  # -hf key; contains "{i}" for per-layer tensors, stacked on our leading axis
    layout: str  # linear | conv | flat | same
    n_in: int = 1  # linear: how many leading dims of our kernel are the torch input
    lead: int = 0  # flat: leading 1-dims of the torch tensor

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key


def mapping(path: str) -> Mapping:
    """Mapping for our parameter path (e.g. 'text/layers/q/kernel')."""
    if path in _SPECIAL:
        key, layout, lead = _SPECIAL[path]
        return Mapping(key, layout, 1, lead)
    module, _, leaf = path.rpartition("/")
    if module not in _MODULES or leaf not in _LEAVES:
        raise KeyError(f"no checkpoint key for parameter {path!r}")
    suffix, layout = _LEAVES[leaf]
    return Mapping(f"{_MODULES[module]}.{suffix}", layout, 2 if module in _TWO_INPUT_DIMS else 1)


def to_ours(m: Mapping, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One torch tensor (one layer's, for stacked weights) -> our layout of `shape` (without the layer axis)."""
    if m.layout == "linear":
        if tensor.ndim != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tensor.shape}")
        out = tensor.T
    elif m.layout == "conv":
        if tensor.ndim != 4:
            raise ValueError(f"expected a 4-D conv weight, got shape {tensor.shape}")
        out = tensor.transpose(1, 2, 3, 0)
    else:
        out = tensor
    if out.size != math.prod(shape) or (m.layout != "flat" and m.layout != "linear" and out.shape != shape):
        raise ValueError(f"shape {tensor.shape} does not fit our {shape}")
    if m.layout == "linear":
        n_in = m.n_in
        if out.shape != (math.prod(shape[:n_in]), math.prod(shape[n_in:])):
            raise ValueError(f"shape {tensor.shape} does not fit our {shape}")
    return np.ascontiguousarray(out.reshape(shape))


def to_torch(m: Mapping, array: np.ndarray) -> np.ndarray:
    """Inverse of `to_ours` for one (unstacked) array."""
    if m.layout == "linear":
        return np.ascontiguousarray(array.reshape(math.prod(array.shape[: m.n_in]), -1).T)
    if m.layout == "conv":
        return np.ascontiguousarray(array.transpose(3, 0, 1, 2))
    if m.layout == "flat":
        return array.reshape((1,) * m.lead + (array.shape[-1] if m.lead else array.size,))
    return array


def flatten_paths(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    out: dict[str, object] = {}
    for name, value in tree.items():
        path = f"{prefix}/{name}" if prefix else name
        if isinstance(value, dict):
            out.update(flatten_paths(value, path))
        else:
            out[path] = value
    return out


def unflatten_paths(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def checkpoint_keys(cfg: InternVLConfig, paths: list[str]) -> dict[str, tuple[str, int | None]]:
    """Every -hf key our parameters need -> (our path, layer index or None)."""
    out: dict[str, tuple[str, int | None]] = {}
    for path in paths:
        m = mapping(path)
        if m.stacked:
            n = cfg.vision.num_layers if path.startswith("vision/") else cfg.text.num_layers
            for i in range(n):
                out[m.key.format(i=i)] = (path, i)
        else:
            out[m.key] = (path, None)
    return out
