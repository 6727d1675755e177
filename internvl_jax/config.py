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

from internvl_jax.model.layers import ACTIVATIONS


class ConfigError(ValueError):
    """A config field holds a value this implementation does not support (the message names the field)."""


VOCAB_MULTIPLE = 128  # embedding rows / lm_head columns are padded to a multiple of this (TextConfig.padded_vocab)

# The image context token `<IMG_CONTEXT>` of the two tokenizer families, for original checkpoints whose
# tokenizer files are absent (transformers' conversion script uses the same two ids).
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_TOKEN_IDS = {"qwen2": 151667, "llama": 92546}  # Qwen2.5 tokenizer; InternLM2/3 tokenizer


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
        image_token_id = token_id_in_files(file.parent, IMAGE_CONTEXT_TOKEN) if "llm_config" in raw else None
        return cls.from_dict(raw, image_token_id)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], image_token_id: int | None = None) -> InternVLConfig:
        """`image_token_id`: the `<IMG_CONTEXT>` id from the checkpoint's tokenizer, for the original format
        (its config.json does not carry it); the -hf format has its own `image_token_id` field."""
        if "llm_config" in raw:
            return _from_original(raw, image_token_id)
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
    for name, act in (("vision_config.hidden_act", cfg.vision.hidden_act),
                      ("projector_hidden_act", cfg.projector_hidden_act), ("text hidden_act", cfg.text.hidden_act)):
        if act not in ACTIVATIONS:
            raise ConfigError(f"{where}: {name}={act!r} is not supported ({sorted(ACTIVATIONS)})")
    if cfg.vision.norm_type not in ("layer_norm", "rms_norm"):
        raise ConfigError(f"{where}: vision norm_type={cfg.vision.norm_type!r} (layer_norm or rms_norm)")
    if cfg.text.num_heads % cfg.text.num_kv_heads:
        raise ConfigError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.vision.hidden_size % cfg.vision.num_heads:
        raise ConfigError(f"{where}: vision hidden_size must be a multiple of num_attention_heads")
    return cfg


# Defaults of a field missing from config.json are our dataclasses' own (they are transformers' defaults too,
# except where a line below says otherwise).
_V, _T, _C = VisionConfig(), TextConfig(), InternVLConfig()


def _from_hf(raw: dict[str, Any]) -> InternVLConfig:
    if raw.get("model_type", "internvl") != "internvl":
        raise ConfigError(f"config.json: model_type={raw['model_type']!r} is not an InternVL model ('internvl')")
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
    heads = int(t.get("num_attention_heads", _T.num_heads))
    hidden = int(t.get("hidden_size", _T.hidden_size))
    theta, kind, factor = _rope(t, "text_config")
    qwen = arch == "qwen2"
    text = TextConfig(
        arch=arch,
        hidden_size=hidden,
        num_layers=int(t.get("num_hidden_layers", _T.num_layers)),
        num_heads=heads,
        num_kv_heads=int(t.get("num_key_value_heads") or heads),
        head_dim=int(t.get("head_dim") or hidden // heads),
        intermediate_size=int(t.get("intermediate_size", _T.intermediate_size)),
        vocab_size=int(t.get("vocab_size", _T.vocab_size)),
        rope_theta=theta,
        rope_type=kind,
        rope_factor=factor,
        max_position_embeddings=int(t.get("max_position_embeddings", _T.max_position_embeddings)),
        rms_norm_eps=float(t.get("rms_norm_eps", _T.rms_norm_eps)),
        # Qwen2 always has q/k/v bias and never an o bias; Llama's attention_bias covers all four.
        qkv_bias=True if qwen else bool(t.get("attention_bias", False)),
        o_bias=False if qwen else bool(t.get("attention_bias", False)),
        mlp_bias=False if qwen else bool(t.get("mlp_bias", False)),
        hidden_act=t.get("hidden_act", _T.hidden_act),
    )
    vision = VisionConfig(
        hidden_size=int(v.get("hidden_size", _V.hidden_size)),
        num_layers=int(v.get("num_hidden_layers", _V.num_layers)),
        num_heads=int(v.get("num_attention_heads", _V.num_heads)),
        intermediate_size=int(v.get("intermediate_size", _V.intermediate_size)),
        norm_type=v.get("norm_type", _V.norm_type),
        layer_norm_eps=float(v.get("layer_norm_eps", _V.layer_norm_eps)),
        use_qk_norm=bool(v.get("use_qk_norm", _V.use_qk_norm)),
        attention_bias=bool(v.get("attention_bias", False)),  # transformers' default; the original's is true
        layer_scale_init_value=float(v.get("layer_scale_init_value", _V.layer_scale_init_value)),
        image_size=_square(v.get("image_size", _V.image_size), "vision_config.image_size"),
        patch_size=_square(v.get("patch_size", _V.patch_size), "vision_config.patch_size"),
        num_channels=int(v.get("num_channels", _V.num_channels)),
        hidden_act=v.get("hidden_act", _V.hidden_act),
        use_mean_pooling=bool(v.get("use_mean_pooling", _V.use_mean_pooling)),
    )
    cfg = InternVLConfig(
        vision=vision,
        text=text,
        image_token_id=int(raw.get("image_token_id", _C.image_token_id)),
        downsample_ratio=float(raw.get("downsample_ratio", _C.downsample_ratio)),
        projector_hidden_act=raw.get("projector_hidden_act", _C.projector_hidden_act),
        vision_feature_layer=raw.get("vision_feature_layer", _C.vision_feature_layer),
        vision_feature_select_strategy=raw.get("vision_feature_select_strategy", _C.vision_feature_select_strategy),
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


def token_id_in_files(directory: Path, token: str) -> int | None:
    """The id of an added token as a checkpoint's tokenizer files declare it (added_tokens.json,
    tokenizer_config.json's added_tokens_decoder, tokenizer.json's added_tokens), or None."""
    def read(name: str) -> Any:
        try:
            return json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    added = read("added_tokens.json")
    if isinstance(added, dict) and isinstance(added.get(token), int):
        return added[token]
    decoder = (read("tokenizer_config.json") or {}).get("added_tokens_decoder") or {}
    for key, entry in decoder.items():
        if isinstance(entry, dict) and entry.get("content") == token and str(key).isdigit():
            return int(key)
    for entry in (read("tokenizer.json") or {}).get("added_tokens") or []:
        if isinstance(entry, dict) and entry.get("content") == token and isinstance(entry.get("id"), int):
            return entry["id"]
    return None


def _from_original(raw: dict[str, Any], tokenizer_image_id: int | None = None) -> InternVLConfig:
    if raw.get("model_type", "internvl_chat") != "internvl_chat":
        raise ConfigError(f"config.json: model_type={raw['model_type']!r} is not an original InternVL model "
                          "('internvl_chat')")
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
        max_position_embeddings=int(t.get("max_position_embeddings", _T.max_position_embeddings)),
        rms_norm_eps=float(t.get("rms_norm_eps", _T.rms_norm_eps)),
        qkv_bias=True if qwen else bias,
        o_bias=False if qwen else bias,
        mlp_bias=False,
        hidden_act=t.get("hidden_act", _T.hidden_act),
    )
    size = int(raw.get("force_image_size") or v.get("image_size", _V.image_size))
    vision = VisionConfig(
        hidden_size=int(v["hidden_size"]),
        num_layers=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        intermediate_size=int(v["intermediate_size"]),
        norm_type=v.get("norm_type", _V.norm_type),
        layer_norm_eps=float(v.get("layer_norm_eps", _V.layer_norm_eps)),
        use_qk_norm=bool(v.get("qk_normalization", _V.use_qk_norm)),
        attention_bias=bool(v.get("qkv_bias", _V.attention_bias)),
        layer_scale_init_value=float(v.get("initializer_factor", _V.layer_scale_init_value)),
        image_size=size,
        patch_size=int(v.get("patch_size", _V.patch_size)),
        hidden_act=v.get("hidden_act", _V.hidden_act),
    )
    # The original model looks `<IMG_CONTEXT>` up in its tokenizer; without tokenizer files, the id of the LLM's
    # tokenizer family (a Qwen2 id in an InternLM2 model would match no token: the model would see no image).
    image_token_id = raw.get("img_context_token_id") or tokenizer_image_id or IMAGE_TOKEN_IDS[arch]
    cfg = InternVLConfig(
        vision=vision,
        text=text,
        image_token_id=int(image_token_id),
        downsample_ratio=float(raw.get("downsample_ratio", _C.downsample_ratio)),
        projector_hidden_act="gelu",
        vision_feature_layer=int(raw.get("select_layer", _C.vision_feature_layer)),
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
    )
    return _check_top(cfg, "config.json (original format)")
