"""Named configs of the real InternVL3 / InternVL2.5 shapes, for random-weight models without a download.

Values come from the checkpoints' config.json files and, where a copy was not available, from the parent
models they pair (InternViT-300M/6B, Qwen2.5, InternLM2.5/3); `docs/presets.md` lists the sources and what
was inferred. Only shapes matter to presets: real checkpoints always carry their own config.json.
"""

from __future__ import annotations

from internvl_jax.config import InternVLConfig, TextConfig, VisionConfig

VIT_300M = VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                        norm_type="layer_norm", use_qk_norm=False, attention_bias=True)
# InternViT-6B as InternVL uses it: the last 3 of its 48 layers are dropped.
VIT_6B = VisionConfig(hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800,
                      norm_type="rms_norm", use_qk_norm=True, attention_bias=False)


def _qwen(hidden: int, layers: int, heads: int, kv: int, mlp: int, dynamic: bool) -> TextConfig:
    return TextConfig(arch="qwen2", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                      head_dim=hidden // heads, intermediate_size=mlp, vocab_size=151674, rope_theta=1e6,
                      rope_type="dynamic" if dynamic else "default", rope_factor=2.0 if dynamic else 1.0,
                      rms_norm_eps=1e-6, qkv_bias=True)


def _internlm(hidden: int, layers: int, heads: int, kv: int, mlp: int, vocab: int, theta: float,
              factor: float, head_dim: int | None = None) -> TextConfig:
    # InternLM2/3 decoders load as the Llama type (no biases, RMSNorm eps 1e-5, dynamic NTK RoPE).
    return TextConfig(arch="llama", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                      head_dim=head_dim or hidden // heads, intermediate_size=mlp, vocab_size=vocab,
                      rope_theta=theta, rope_type="dynamic", rope_factor=factor, rms_norm_eps=1e-5,
                      qkv_bias=False, o_bias=False)


def _vl(vision: VisionConfig, text: TextConfig, image_token_id: int = 151667) -> InternVLConfig:
    return InternVLConfig(vision=vision, text=text, image_token_id=image_token_id, tie_word_embeddings=False)


PRESETS: dict[str, InternVLConfig] = {
    "InternVL3-1B": _vl(VIT_300M, _qwen(896, 24, 14, 2, 4864, True)),
    "InternVL3-2B": _vl(VIT_300M, _qwen(1536, 28, 12, 2, 8960, True)),
    "InternVL3-8B": _vl(VIT_300M, _qwen(3584, 28, 28, 4, 18944, True)),
    # InternLM3-8B shapes. Its image token id is not known here: the last vocabulary id stands in.
    "InternVL3-9B": _vl(VIT_300M, _internlm(4096, 48, 32, 2, 10240, 128512, 5e7, 6.0, 128), 128511),
    "InternVL3-14B": _vl(VIT_300M, _qwen(5120, 48, 40, 8, 13824, True)),
    "InternVL3-38B": _vl(VIT_6B, _qwen(5120, 64, 40, 8, 27648, True)),
    "InternVL3-78B": _vl(VIT_6B, _qwen(8192, 80, 64, 8, 29568, True)),
    "InternVL2.5-1B": _vl(VIT_300M, _qwen(896, 24, 14, 2, 4864, False)),
    "InternVL2.5-2B": _vl(VIT_300M, _internlm(2048, 24, 16, 8, 8192, 92553, 1e6, 2.0), 92546),
    "InternVL2.5-4B": _vl(VIT_300M, _qwen(2048, 36, 16, 2, 11008, False)),
    "InternVL2.5-8B": _vl(VIT_300M, _internlm(4096, 32, 32, 8, 14336, 92553, 1e6, 2.0), 92546),
    "InternVL2.5-26B": _vl(VIT_6B, _internlm(6144, 48, 48, 8, 16384, 92553, 1e6, 2.0), 92546),
    "InternVL2.5-38B": _vl(VIT_6B, _qwen(5120, 64, 40, 8, 27648, False)),
    "InternVL2.5-78B": _vl(VIT_6B, _qwen(8192, 80, 64, 8, 29568, False)),
}

# Short names: "1B" means InternVL3-1B.
ALIASES = {name.removeprefix("InternVL3-"): name for name in PRESETS if name.startswith("InternVL3-")}


class UnknownPreset(KeyError, ValueError):
    """A preset name that is not in PRESETS (KeyError for lookups, ValueError for the CLI's one-line errors)."""

    def __str__(self) -> str:
        return str(self.args[0])


def shape_of(name: str) -> InternVLConfig:
    """A preset name or size, or a checkpoint directory (its config.json: the shape only)."""
    from pathlib import Path

    return InternVLConfig.from_pretrained(name) if Path(name).is_dir() else preset(name)


def preset(name: str) -> InternVLConfig:
    """A preset by full name ("InternVL3-8B", "InternVL2.5-26B") or InternVL3 size ("8B")."""
    full = ALIASES.get(name, name)
    if full not in PRESETS:
        raise UnknownPreset(f"unknown preset {name!r}; known: {', '.join(PRESETS)} (or a size such as 8B)")
    return PRESETS[full]
