"""The weight table: how each of our parameters maps to a `-hf` checkpoint tensor, both ways.

Shapes, dtypes and logical axes come from the modules (`jax.eval_shape` of `init`); this file holds only
what the modules cannot know: the checkpoint key of each parameter and how its layout differs. Loading,
export and the converter all go through `mapping` / `to_ours` / `to_torch`. Each row also names the key in the
original OpenGVLab layout (`InternVLChatModel`), where q/k/v are fused (`split_fused`), so the converter
reads those checkpoints through the same table.

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

from internvl_jax.config import VOCAB_MULTIPLE, InternVLConfig

# Key prefixes: -hf (transformers' module tree) and the original OpenGVLab layout (InternVLChatModel).
_HV, _HT = "model.vision_tower", "model.language_model"
_OV, _OT = "vision_model", "language_model.model"
# ... and of one layer's modules ("{i}": the layer index).
_HVL, _OVL = f"{_HV}.encoder.layer.{{i}}", f"{_OV}.encoder.layers.{{i}}"
_HTL, _OTL = f"{_HT}.layers.{{i}}", f"{_OT}.layers.{{i}}"

# Our module path -> (-hf module key, original-layout module key). In the original layout the vision q/k/v
# are one fused `attn.qkv` tensor (see `_FUSED`), and the LLM keeps its own model's names (Qwen2/Llama/
# InternLM3: the -hf names under `language_model.model.`; InternLM2: `_INTERNLM2`).
_MODULES: dict[str, tuple[str, str]] = {
    "vision/embeddings": (f"{_HV}.embeddings", f"{_OV}.embeddings"),
    "vision/layers/norm1": (f"{_HVL}.layernorm_before", f"{_OVL}.norm1"),
    "vision/layers/q": (f"{_HVL}.attention.q_proj", f"{_OVL}.attn.qkv"),
    "vision/layers/k": (f"{_HVL}.attention.k_proj", f"{_OVL}.attn.qkv"),
    "vision/layers/v": (f"{_HVL}.attention.v_proj", f"{_OVL}.attn.qkv"),
    "vision/layers/q_norm": (f"{_HVL}.attention.q_norm", f"{_OVL}.attn.q_norm"),
    "vision/layers/k_norm": (f"{_HVL}.attention.k_norm", f"{_OVL}.attn.k_norm"),
    "vision/layers/o": (f"{_HVL}.attention.projection_layer", f"{_OVL}.attn.proj"),
    "vision/layers/norm2": (f"{_HVL}.layernorm_after", f"{_OVL}.norm2"),
    "vision/layers/fc1": (f"{_HVL}.mlp.fc1", f"{_OVL}.mlp.fc1"),
    "vision/layers/fc2": (f"{_HVL}.mlp.fc2", f"{_OVL}.mlp.fc2"),
    "vision/final_norm": (f"{_HV}.layernorm", f"{_OV}.layernorm"),
    "projector/norm": ("model.multi_modal_projector.layer_norm", "mlp1.0"),
    "projector/fc1": ("model.multi_modal_projector.linear_1", "mlp1.1"),
    "projector/fc2": ("model.multi_modal_projector.linear_2", "mlp1.3"),
    "text/layers/attn_norm": (f"{_HTL}.input_layernorm", f"{_OTL}.input_layernorm"),
    "text/layers/q": (f"{_HTL}.self_attn.q_proj", f"{_OTL}.self_attn.q_proj"),
    "text/layers/k": (f"{_HTL}.self_attn.k_proj", f"{_OTL}.self_attn.k_proj"),
    "text/layers/v": (f"{_HTL}.self_attn.v_proj", f"{_OTL}.self_attn.v_proj"),
    "text/layers/o": (f"{_HTL}.self_attn.o_proj", f"{_OTL}.self_attn.o_proj"),
    "text/layers/mlp_norm": (f"{_HTL}.post_attention_layernorm", f"{_OTL}.post_attention_layernorm"),
    "text/layers/gate": (f"{_HTL}.mlp.gate_proj", f"{_OTL}.mlp.gate_proj"),
    "text/layers/up": (f"{_HTL}.mlp.up_proj", f"{_OTL}.mlp.up_proj"),
    "text/layers/down": (f"{_HTL}.mlp.down_proj", f"{_OTL}.mlp.down_proj"),
    "text/final_norm": (f"{_HT}.norm", f"{_OT}.norm"),
}

# Original layout with an InternLM2 LLM: module (or full parameter path) -> key. q/k/v are one `wqkv`.
_INTERNLM2: dict[str, str] = {
    "text/layers/attn_norm": f"{_OTL}.attention_norm",
    "text/layers/q": f"{_OTL}.attention.wqkv",
    "text/layers/k": f"{_OTL}.attention.wqkv",
    "text/layers/v": f"{_OTL}.attention.wqkv",
    "text/layers/o": f"{_OTL}.attention.wo",
    "text/layers/mlp_norm": f"{_OTL}.ffn_norm",
    "text/layers/gate": f"{_OTL}.feed_forward.w1",
    "text/layers/up": f"{_OTL}.feed_forward.w3",
    "text/layers/down": f"{_OTL}.feed_forward.w2",
    "text/embedding": f"{_OT}.tok_embeddings.weight",
    "text/lm_head": "language_model.output.weight",
}

# Which part of a fused original tensor a module is: vision `attn.qkv` is [Q; K; V] in equal thirds;
# InternLM2 `wqkv` rows are grouped per KV head, [q_0 .. q_{g-1}, k, v] per group (see `split_fused`).
_FUSED: dict[str, int] = {"vision/layers/q": 0, "vision/layers/k": 1, "vision/layers/v": 2,
                          "text/layers/q": 0, "text/layers/k": 1, "text/layers/v": 2}

# Leaf name -> (key suffix, layout) for ordinary modules.
_LEAVES: dict[str, tuple[str, str]] = {"kernel": ("weight", "linear"), "bias": ("bias", "flat"),
                                       "scale": ("weight", "flat")}

# Parameters that are not an ordinary module leaf: full path -> (-hf key, original key, layout, leading ones
# on export).
_SPECIAL: dict[str, tuple[str, str, str, int]] = {
    "vision/embeddings/patch_kernel": (f"{_HV}.embeddings.patch_embeddings.projection.weight",
                                       f"{_OV}.embeddings.patch_embedding.weight", "conv", 0),
    "vision/embeddings/patch_bias": (f"{_HV}.embeddings.patch_embeddings.projection.bias",
                                     f"{_OV}.embeddings.patch_embedding.bias", "flat", 0),
    "vision/embeddings/cls_token": (f"{_HV}.embeddings.cls_token", f"{_OV}.embeddings.class_embedding", "flat", 2),
    "vision/embeddings/position_embedding": (f"{_HV}.embeddings.position_embeddings",
                                             f"{_OV}.embeddings.position_embedding", "flat", 1),
    "vision/layers/ls1": (f"{_HVL}.lambda_1", f"{_OVL}.ls1", "flat", 0),
    "vision/layers/ls2": (f"{_HVL}.lambda_2", f"{_OVL}.ls2", "flat", 0),
    "text/embedding": (f"{_HT}.embed_tokens.weight", f"{_OT}.embed_tokens.weight", "same", 0),
    "text/lm_head": ("lm_head.weight", "language_model.lm_head.weight", "linear", 0),
}

# Checkpoint layouts: "hf" (either -hf key style, see LEGACY_PREFIXES), "original" (OpenGVLab, Qwen2/Llama/
# InternLM3 LLM), "original-internlm2" (OpenGVLab with an InternLM2 LLM).
LAYOUTS = ("hf", "original", "original-internlm2")

# Parameters whose vocabulary axis we pad (TextConfig.padded_vocab): zeros in, cut off again on export.
_VOCAB_AXIS: dict[str, int] = {"text/embedding": 0, "text/lm_head": 1}

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
    original: str = ""  # key in the original OpenGVLab layout
    internlm2: str = ""  # key in the original layout when the LLM is InternLM2
    part: int | None = None  # q/k/v: which part of a fused original tensor (attn.qkv / wqkv)
    vocab_axis: int | None = None  # our axis that is the (padded) vocabulary: embedding rows, lm_head columns

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key

    def source_key(self, layout: str) -> str:
        """The key (with "{i}") in a checkpoint of `layout` (one of LAYOUTS; "hf" means the canonical keys)."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown checkpoint layout {layout!r} (one of {LAYOUTS})")
        return {"hf": self.key, "original": self.original, "original-internlm2": self.internlm2}[layout]

    def fused(self, layout: str) -> str | None:
        """'qkv' / 'wqkv' when, in `layout`, this parameter is one part of a fused tensor; None otherwise."""
        if self.part is None or layout == "hf":
            return None
        key = self.source_key(layout)
        return "wqkv" if ".wqkv." in key else "qkv" if ".attn.qkv." in key else None


def mapping(path: str) -> Mapping:
    """Mapping for our parameter path (e.g. 'text/layers/q/kernel')."""
    if path in _SPECIAL:
        key, original, layout, lead = _SPECIAL[path]
        return Mapping(key, layout, 1, lead, original, _INTERNLM2.get(path, original), None, _VOCAB_AXIS.get(path))
    module, _, leaf = path.rpartition("/")
    if module not in _MODULES or leaf not in _LEAVES:
        raise KeyError(f"no checkpoint key for parameter {path!r}")
    suffix, layout = _LEAVES[leaf]
    hf, original = (f"{k}.{suffix}" for k in _MODULES[module])
    internlm2 = f"{_INTERNLM2[module]}.{suffix}" if module in _INTERNLM2 else original
    return Mapping(hf, layout, 2 if module in _TWO_INPUT_DIMS else 1, 0, original, internlm2, _FUSED.get(module))


def split_fused(kind: str, tensor: np.ndarray, part: int, groups: int = 1, head_dim: int = 1) -> np.ndarray:
    """Part 0/1/2 (q/k/v) of a fused original tensor, as the -hf q/k/v tensor (weight rows or bias).

    kind 'qkv': rows [Q; K; V] in equal thirds (InternViT). kind 'wqkv': InternLM2's rows, grouped per KV
    head: for each of the KV heads, `groups` query heads then one key head then one value head, each
    `head_dim` rows; the -hf q_proj is all query heads in order, k/v_proj the key/value heads in order.
    """
    rows = tensor.shape[0]
    if kind == "qkv":
        if rows % 3:
            raise ValueError(f"fused qkv has {rows} rows, not a multiple of 3")
        n = rows // 3
        return tensor[part * n:(part + 1) * n]
    if kind != "wqkv":
        raise ValueError(f"unknown fused kind {kind!r}")
    if rows % ((groups + 2) * head_dim):
        raise ValueError(f"wqkv has {rows} rows, not a multiple of (groups {groups} + 2) x head_dim {head_dim}")
    grouped = tensor.reshape(-1, groups + 2, head_dim, *tensor.shape[1:])
    picked = grouped[:, :groups] if part == 0 else grouped[:, groups + part - 1]
    return picked.reshape(-1, *tensor.shape[1:])


def padded_rows(m: Mapping, rows: int, shape: tuple[int, ...]) -> int | None:
    """How many rows to read torch tensor of `rows` rows into, for our parameter of `shape`, so that it arrives
    with our vocabulary padding (the vocabulary is axis 0 of the torch embedding and lm_head); None: as is."""
    if m.vocab_axis is None:
        return None
    target = shape[m.vocab_axis]
    return target if rows < target < rows + VOCAB_MULTIPLE else None


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
    ax = m.vocab_axis
    if ax is not None and out.ndim == len(shape) and out.shape[ax] < shape[ax] < out.shape[ax] + VOCAB_MULTIPLE:
        widths = [(0, 0)] * out.ndim
        widths[ax] = (0, shape[ax] - out.shape[ax])
        out = np.pad(out, widths)
    if out.size != math.prod(shape) or (m.layout != "flat" and m.layout != "linear" and out.shape != shape):
        raise ValueError(f"shape {tensor.shape} does not fit our {shape}")
    if m.layout == "linear":
        n_in = m.n_in
        if out.shape != (math.prod(shape[:n_in]), math.prod(shape[n_in:])):
            raise ValueError(f"shape {tensor.shape} does not fit our {shape}")
    return np.ascontiguousarray(out.reshape(shape))


def to_torch(m: Mapping, array: np.ndarray, vocab_size: int | None = None) -> np.ndarray:
    """Inverse of `to_ours` for one (unstacked) array; `vocab_size` cuts the vocabulary padding off."""
    if m.vocab_axis is not None and vocab_size is not None:
        array = np.take(array, np.arange(vocab_size), axis=m.vocab_axis)
    if m.layout == "linear":
        return np.ascontiguousarray(array.reshape(math.prod(array.shape[: m.n_in]), -1).T)
    if m.layout == "conv":
        return np.ascontiguousarray(array.transpose(3, 0, 1, 2))
    if m.layout == "flat":
        # Leading 1s before our shape (CLS token [d] -> [1, 1, d], positions [n, d] -> [1, n, d]); else flat.
        return array.reshape((1,) * m.lead + (array.shape if m.lead else (array.size,)))
    return array


def padding_numel(config: InternVLConfig) -> int:
    """Parameters we hold beyond the checkpoint's: the zero rows/columns of the padded vocabulary."""
    t = config.text
    return (t.padded_vocab - t.vocab_size) * t.hidden_size * (1 if config.tie_word_embeddings else 2)


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
