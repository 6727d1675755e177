"""Tiny random InternVL checkpoints made with transformers (the reference), saved as safetensors.

Every parameter is randomised (norm scales, biases, layer scales, CLS and position embeddings included):
transformers' own init leaves many of them at 0 or 1, which would hide layout bugs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import InternVLConfig as HFConfig
from transformers import InternVLForConditionalGeneration

IMAGE_TOKEN = 151667
VOCAB = 151674

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=14, attention_bias=True, norm_type="layer_norm", use_qk_norm=False)
VISION_6B_STYLE = dict(VISION, attention_bias=False, norm_type="rms_norm", use_qk_norm=True, num_hidden_layers=3)
TEXT = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
TEXT_LLAMA = dict(TEXT, model_type="llama", attention_bias=True, mlp_bias=True, head_dim=24)


def hf_config(vision: dict | None = None, text: dict | None = None, **top: Any) -> dict:
    top.setdefault("tie_word_embeddings", False)
    return {"vision_config": dict(vision or VISION), "text_config": dict(text or TEXT), **top}


def torch_model(cfg: dict, seed: int = 0) -> InternVLForConditionalGeneration:
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(HFConfig(**copy.deepcopy(cfg))).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm.weight" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "lambda" in name:
                p.copy_(0.5 * noise)
            elif name.endswith("bias") or "embeddings.position" in name or "cls_token" in name:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / max(1.0, p.shape[-1] ** 0.5))
    return model


def save(model: InternVLForConditionalGeneration, directory: Path, layout: str = "legacy",
         shard_size: str | None = None) -> Path:
    """layout 'legacy': what save_pretrained writes; 'new': the module-tree keys (model.vision_tower.*)."""
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "legacy":
        model.save_pretrained(directory, max_shard_size=shard_size or "5GB")
    else:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    return directory


def make(tmp: Path, cfg: dict | None = None, seed: int = 0, layout: str = "legacy"
         ) -> tuple[Path, InternVLForConditionalGeneration]:
    model = torch_model(cfg or hf_config(), seed)
    return save(model, tmp / f"ckpt_{layout}", layout), model


def tokens_per_tile(cfg: dict, size: int | None = None) -> int:
    v = cfg["vision_config"]
    size = size or v["image_size"]
    return (size // v["patch_size"] // 2) ** 2


def prompt(rng: np.random.Generator, length: int, images: list[int], per_tile: int) -> list[int]:
    """Random text ids with, for each image, a run of image tokens (tiles x per_tile) at random places."""
    ids = [int(x) for x in rng.integers(0, 1000, length)]
    for n, tiles in enumerate(images):
        at = 1 + (n + 1) * max(1, length // (len(images) + 1))
        ids[at:at] = [IMAGE_TOKEN] * (tiles * per_tile)
    return ids


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask (the runners' helper, used as a test fixture)."""
    from internvl_jax.runners.batch import left_pad as pad_rows

    return pad_rows([np.asarray(r) for r in rows], pad)


def torch_logits(model: InternVLForConditionalGeneration, ids: np.ndarray, pixels: np.ndarray | None = None,
                 mask: np.ndarray | None = None) -> np.ndarray:
    kwargs: dict[str, Any] = {"input_ids": torch.tensor(ids)}
    if pixels is not None:
        kwargs["pixel_values"] = torch.tensor(pixels)
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()
