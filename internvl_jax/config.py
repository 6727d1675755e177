"""Model configuration: frozen dataclasses, parsed from either checkpoint format.

Two `config.json` formats exist in the wild:
- the transformers `-hf` one (`InternVLForConditionalGeneration`: `vision_config` + `text_config`);
- the original OpenGVLab one (`InternVLChatModel`: `vision_config` + `llm_config`, with `select_layer`,
  `ps_version`, `qkv_bias`, `qk_normalization`).
Both parse into the same `InternVLConfig`. Anything the model cannot honour exactly raises `ConfigError`
naming the field, rather than silently computing something else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config field holds a value this implementation does not support (the message names the field)."""


VOCAB_MULTIPLE = 128


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    norm_type: str = "layer_norm"  # layer_norm | rms_norm
    layer_norm_eps: float = 1e-6
    use_qk_norm: bool = False
    attention_bias: bool = True
    layer_scale_init_value: float = 0.1
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    use_mean_pooling: bool = True  # False adds a final LayerNorm, as transformers does

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side at the native image size."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    arch: str = "qwen2"  # qwen2 | llama (InternLM2/3 map to llama)
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 4864
    vocab_size: int = 151674
    rope_theta: float = 1_000_000.0
    rope_type: str = "default"  # default | dynamic
    rope_factor: float = 1.0
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"

    @property
    def padded_vocab(self) -> int:
        """Rows of our embedding / columns of our lm_head: the vocabulary rounded up to a multiple of
        VOCAB_MULTIPLE so a tensor axis (up to 128 devices) divides it (151674 = 2 x 75837 divides nothing
        useful). The extra rows are zeros and never reach the logits, which are cut back to vocab_size."""
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class InternVLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151667
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    tie_word_embeddings: bool = False

    @property
    def shuffle(self) -> int:
        """Pixel-shuffle factor: 2 for downsample_ratio 0.5 (4 patches fold into one token)."""
        return round(1 / self.downsample_ratio)

    @property
    def image_seq_length(self) -> int:
        """Tokens per 448px tile after pixel shuffle (256 for every InternVL3 checkpoint)."""
        return (self.vision.grid // self.shuffle) ** 2

    @property
    def projector_in(self) -> int:
        return self.vision.hidden_size * self.shuffle**2

    def replace(self, **changes: Any) -> InternVLConfig:
        return dataclasses.replace(self, **changes)

    # ----- parsing -----
    @classmethod
    def from_pretrained(cls, path: str | Path) -> InternVLConfig:
        file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {file}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> InternVLConfig:
        if "llm_config" in raw:
            return _from_original(raw)
        if "text_config" in raw:
            return _from_hf(raw)
        raise ConfigError("config.json has neither 'text_config' (-hf format) nor 'llm_config' (original format)")

    def to_hf_dict(self) -> dict[str, Any]:
        """The `-hf` config.json that transformers' InternVLForConditionalGeneration reads."""
        v, t = self.vision, self.text
        text: dict[str, Any] = {
            "model_type": t.arch,
            "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim,
            "intermediate_size": t.intermediate_size,
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "hidden_act": t.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {"rope_type": t.rope_type, "rope_theta": t.rope_theta}
            | ({"factor": t.rope_factor} if t.rope_type == "dynamic" else {}),
        }
        if t.arch == "llama":
            text |= {"attention_bias": t.qkv_bias, "mlp_bias": t.mlp_bias}
        return {
            "architectures": ["InternVLForConditionalGeneration"],
            "model_type": "internvl",
            "vision_config": {
                "model_type": "internvl_vision",
                "hidden_size": v.hidden_size,
                "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads,
                "intermediate_size": v.intermediate_size,
                "norm_type": v.norm_type,
                "layer_norm_eps": v.layer_norm_eps,
                "use_qk_norm": v.use_qk_norm,
                "attention_bias": v.attention_bias,
                "layer_scale_init_value": v.layer_scale_init_value,
                "image_size": [v.image_size, v.image_size],
                "patch_size": [v.patch_size, v.patch_size],
                "num_channels": v.num_channels,
                "hidden_act": v.hidden_act,
                "use_mean_pooling": v.use_mean_pooling,
            },
            "text_config": text,
            "image_token_id": self.image_token_id,
            "image_seq_length": self.image_seq_length,
            "downsample_ratio": self.downsample_ratio,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


# ----- helpers shared by both formats -----
def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{name}={value!r}: only square sizes are supported")
        return int(value[0])
    return int(value)


def _rope(t: dict[str, Any], where: str) -> tuple[float, str, float]:
    """(theta, type, factor) from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = t.get("rope_parameters") or {}
    scaling = t.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", t.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = float(params.get("factor", scaling.get("factor", 1.0)) or 1.0)
    if kind not in ("default", "dynamic"):
        raise ConfigError(f"{where}.rope_scaling type {kind!r} is not supported (default and dynamic are)")
    return theta, kind, factor


def _check_top(cfg: InternVLConfig, where: str) -> InternVLConfig:
    if isinstance(cfg.vision_feature_layer, (list, tuple)):
        raise ConfigError(
            f"{where}: vision_feature_layer={cfg.vision_feature_layer!r}: a list of layers is not supported "
            "(transformers and the original InternVL take one layer)"
        )
    if cfg.vision_feature_select_strategy != "default":
        raise ConfigError(
            f"{where}: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not supported: "
            "InternVL drops the CLS token ('default')"
        )
    n = cfg.vision.num_layers
    if not -n - 1 <= cfg.vision_feature_layer <= n:
        raise ConfigError(f"{where}: vision_feature_layer={cfg.vision_feature_layer} is outside 0..{n} / -{n + 1}..-1")
    if cfg.shuffle * cfg.downsample_ratio != 1 or cfg.vision.grid % cfg.shuffle:
        raise ConfigError(f"{where}: downsample_ratio={cfg.downsample_ratio} must be 1/k with k dividing the grid")
    for name, act in (("vision_config.hidden_act", cfg.vision.hidden_act), ("projector_hidden_act",
                                                                          cfg.projector_hidden_act)):
        if act not in _ACTS:
            raise ConfigError(f"{where}: {name}={act!r} is not supported ({sorted(_ACTS)})")
    if cfg.text.hidden_act not in _ACTS:
        raise ConfigError(f"{where}: text hidden_act={cfg.text.hidden_act!r} is not supported ({sorted(_ACTS)})")
    if cfg.vision.norm_type not in ("layer_norm", "rms_norm"):
        raise ConfigError(f"{where}: vision norm_type={cfg.vision.norm_type!r} (layer_norm or rms_norm)")
    if cfg.text.num_heads % cfg.text.num_kv_heads:
        raise ConfigError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.vision.hidden_size % cfg.vision.num_heads:
        raise ConfigError(f"{where}: vision hidden_size must be a multiple of num_attention_heads")
    return cfg


# Activation names as transformers spells them; "gelu" is the exact erf GELU.
_ACTS = ("gelu", "silu", "gelu_pytorch_tanh", "gelu_new", "relu")


def _from_hf(raw: dict[str, Any]) -> InternVLConfig:
    v, t = raw.get("vision_config") or {}, raw.get("text_config") or {}
    arch = t.get("model_type", "qwen2")
    if arch not in ("qwen2", "llama"):
        raise ConfigError(f"text_config.model_type={arch!r} is not supported (qwen2, llama)")
    if t.get("use_sliding_window"):
        raise ConfigError("text_config.use_sliding_window=true is not supported")
    if v.get("use_mask_token"):
        raise ConfigError("vision_config.use_mask_token=true is not supported (a pre-training feature)")
    if v.get("use_absolute_position_embeddings", True) is False:
        raise ConfigError("vision_config.use_absolute_position_embeddings=false is not supported")
    heads = int(t.get("num_attention_heads", 14))
    hidden = int(t.get("hidden_size", 896))
    theta, kind, factor = _rope(t, "text_config")
    qwen = arch == "qwen2"
    text = TextConfig(
        arch=arch,
        hidden_size=hidden,
        num_layers=int(t.get("num_hidden_layers", 24)),
        num_heads=heads,
        num_kv_heads=int(t.get("num_key_value_heads") or heads),
        head_dim=int(t.get("head_dim") or hidden // heads),
        intermediate_size=int(t.get("intermediate_size", 4864)),
        vocab_size=int(t.get("vocab_size", 151674)),
        rope_theta=theta,
        rope_type=kind,
        rope_factor=factor,
        max_position_embeddings=int(t.get("max_position_embeddings", 32768)),
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        # Qwen2 always has q/k/v bias and never an o bias; Llama's attention_bias covers all four.
        qkv_bias=True if qwen else bool(t.get("attention_bias", False)),
        o_bias=False if qwen else bool(t.get("attention_bias", False)),
        mlp_bias=False if qwen else bool(t.get("mlp_bias", False)),
        hidden_act=t.get("hidden_act", "silu"),
    )
    vision = VisionConfig(
        hidden_size=int(v.get("hidden_size", 1024)),
        num_layers=int(v.get("num_hidden_layers", 24)),
        num_heads=int(v.get("num_attention_heads", 16)),
        intermediate_size=int(v.get("intermediate_size", 4096)),
        norm_type=v.get("norm_type", "layer_norm"),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        use_qk_norm=bool(v.get("use_qk_norm", False)),
        attention_bias=bool(v.get("attention_bias", False)),
        layer_scale_init_value=float(v.get("layer_scale_init_value", 0.1)),
        image_size=_square(v.get("image_size", 448), "vision_config.image_size"),
        patch_size=_square(v.get("patch_size", 14), "vision_config.patch_size"),
        num_channels=int(v.get("num_channels", 3)),
        hidden_act=v.get("hidden_act", "gelu"),
        use_mean_pooling=bool(v.get("use_mean_pooling", True)),
    )
    cfg = InternVLConfig(
        vision=vision,
        text=text,
        image_token_id=int(raw.get("image_token_id", 151667)),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        projector_hidden_act=raw.get("projector_hidden_act", "gelu"),
        vision_feature_layer=raw.get("vision_feature_layer", -1),
        vision_feature_select_strategy=raw.get("vision_feature_select_strategy", "default"),
        # transformers ties lm_head by the top-level flag (default true), not text_config's.
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
    )
    return _check_top(cfg, "config.json")


# Original InternVL LLM architectures and the decoder type they map to.
_ORIGINAL_LLMS = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "llama",
    "InternLM3ForCausalLM": "llama",
}


def _from_original(raw: dict[str, Any]) -> InternVLConfig:
    v, t = raw.get("vision_config") or {}, raw.get("llm_config") or {}
    archs = t.get("architectures") or ["Qwen2ForCausalLM"]
    if archs[0] not in _ORIGINAL_LLMS:
        raise ConfigError(f"llm_config.architectures={archs!r} is not supported ({sorted(_ORIGINAL_LLMS)})")
    arch = _ORIGINAL_LLMS[archs[0]]
    if raw.get("ps_version", "v2") != "v2":
        raise ConfigError(f"ps_version={raw.get('ps_version')!r} is not supported: only the v2 pixel shuffle")
    if t.get("use_sliding_window"):
        raise ConfigError("llm_config.use_sliding_window=true is not supported")
    heads = int(t["num_attention_heads"])
    hidden = int(t["hidden_size"])
    theta, kind, factor = _rope(t, "llm_config")
    qwen = arch == "qwen2"
    # InternLM2 calls its attention bias `bias`; Llama/InternLM3 call it `attention_bias`.
    bias = bool(t.get("bias", t.get("attention_bias", False)))
    text = TextConfig(
        arch=arch,
        hidden_size=hidden,
        num_layers=int(t["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(t.get("num_key_value_heads") or heads),
        head_dim=int(t.get("head_dim") or hidden // heads),
        intermediate_size=int(t["intermediate_size"]),
        vocab_size=int(t["vocab_size"]),
        rope_theta=theta,
        rope_type=kind,
        rope_factor=factor,
        max_position_embeddings=int(t.get("max_position_embeddings", 32768)),
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        qkv_bias=True if qwen else bias,
        o_bias=False if qwen else bias,
        mlp_bias=False,
        hidden_act=t.get("hidden_act", "silu"),
    )
    size = int(raw.get("force_image_size") or v.get("image_size", 448))
    vision = VisionConfig(
        hidden_size=int(v["hidden_size"]),
        num_layers=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        intermediate_size=int(v["intermediate_size"]),
        norm_type=v.get("norm_type", "layer_norm"),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        use_qk_norm=bool(v.get("qk_normalization", False)),
        attention_bias=bool(v.get("qkv_bias", True)),
        layer_scale_init_value=float(v.get("initializer_factor", 0.1)),
        image_size=size,
        patch_size=int(v.get("patch_size", 14)),
        hidden_act=v.get("hidden_act", "gelu"),
    )
    cfg = InternVLConfig(
        vision=vision,
        text=text,
        image_token_id=int(raw.get("img_context_token_id") or 151667),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        projector_hidden_act="gelu",
        vision_feature_layer=int(raw.get("select_layer", -1)),
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
    )
    return _check_top(cfg, "config.json (original format)")
