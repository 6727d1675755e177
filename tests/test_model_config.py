"""Config parsing, family presets (parameter counts against transformers) and refusals of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from internvl_jax import InternVL, InternVLConfig
from internvl_jax.config import ConfigError
from internvl_jax.presets import PRESETS, preset
from internvl_jax.safetensors_io import CheckpointError
from internvl_jax.weights import padding_numel
from tests import tiny_models as tm


def transformers_param_count(cfg: InternVLConfig) -> int:
    from transformers import InternVLConfig as HFConfig
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(HFConfig(**cfg.to_hf_dict()))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_matches_transformers(name):
    cfg = preset(name)
    ours = sum(x.size for x in __import__("jax").tree.leaves(InternVL.abstract_params(cfg, "bfloat16")))
    assert ours - padding_numel(cfg) == transformers_param_count(cfg)
    # The preset's hf dict parses back to itself.
    assert InternVLConfig.from_dict(cfg.to_hf_dict()) == cfg


def test_preset_sizes_are_plausible():
    billions = {n: sum(x.size for x in __import__("jax").tree.leaves(InternVL.abstract_params(c))) / 1e9
                for n, c in PRESETS.items() if n.startswith("InternVL3-")}
    assert 0.8 < billions["InternVL3-1B"] < 1.1
    assert 7.5 < billions["InternVL3-8B"] < 8.5
    assert 74 < billions["InternVL3-78B"] < 80
    assert preset("1B") is PRESETS["InternVL3-1B"]
    with pytest.raises(KeyError, match="unknown preset"):
        preset("3B")


def test_original_format_config():
    raw = {
        "architectures": ["InternVLChatModel"], "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2",
        "force_image_size": 448,
        "vision_config": {"hidden_size": 3200, "num_hidden_layers": 45, "num_attention_heads": 25,
                          "intermediate_size": 12800, "norm_type": "rms_norm", "qkv_bias": False,
                          "qk_normalization": True, "patch_size": 14, "image_size": 448},
        "llm_config": {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 8192,
                       "vocab_size": 92553, "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0},
                       "rms_norm_eps": 1e-5, "bias": False},
    }
    cfg = InternVLConfig.from_dict(raw)
    assert cfg.vision.use_qk_norm and not cfg.vision.attention_bias and cfg.vision.norm_type == "rms_norm"
    assert cfg.text.arch == "llama" and cfg.text.rope_type == "dynamic" and cfg.text.rope_factor == 2.0
    assert cfg.text.num_kv_heads == 8 and not cfg.tie_word_embeddings
    with pytest.raises(ConfigError, match="ps_version"):
        InternVLConfig.from_dict(raw | {"ps_version": "v1"})


@pytest.mark.parametrize("change, field", [
    ({"vision_feature_layer": [-1, -2]}, "vision_feature_layer"),
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
    ({"text_config": dict(tm.TEXT, use_sliding_window=True)}, "use_sliding_window"),
    ({"text_config": dict(tm.TEXT, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})},
     "rope_scaling"),
    ({"text_config": dict(tm.TEXT, model_type="mistral")}, "model_type"),
    ({"vision_config": dict(tm.VISION, norm_type="batch_norm")}, "norm_type"),
    ({"projector_hidden_act": "swish"}, "projector_hidden_act"),
])
def test_unsupported_config_fields_are_refused(change, field):
    with pytest.raises(ConfigError, match=field):
        InternVLConfig.from_dict(tm.hf_config() | change)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, ref = tm.make(tmp_path_factory.mktemp("bad"))
    return path, InternVL.from_pretrained(path)


def test_bad_inputs(tiny):
    _, model = tiny
    per = 4
    px = np.zeros((2, 3, 56, 56), np.float32)
    ids = np.array([[1] * 3 + [tm.IMAGE_TOKEN] * (2 * per - 1) + [2]])
    with pytest.raises(ValueError, match="7 image tokens.*2 tiles x 4 tokens = 8"):
        model(ids, px)
    with pytest.raises(ValueError, match="image tokens.*no pixel_values"):
        model(ids)
    with pytest.raises(ValueError, match=r"pixel_values must be \[tiles, 3, S, S\].*\(3, 56, 56\)"):
        model(np.array([[1, 2]]), px[0])
    with pytest.raises(ValueError, match="multiple of 28"):
        model(np.array([[1, 2]]), np.zeros((1, 3, 50, 50), np.float32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(np.array([[1, 2]]), None, np.ones((1, 3)))
    with pytest.raises(ValueError, match="outside"):
        model(np.array([[1, 10**7]]))
    with pytest.raises(ValueError, match="empty"):
        model(np.zeros((1, 0), np.int64))


def _rewrite(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_extra_and_misshapen_weights(tiny, tmp_path):
    src, _ = tiny
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    missing = _rewrite(src, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"lacks 1 tensor.*{key}"):
        InternVL.from_pretrained(missing)
    extra_weight = {"vision_tower.extra.weight": np.zeros(3, np.float32)}
    extra = _rewrite(src, tmp_path / "extra", lambda t: t.update(extra_weight))
    with pytest.raises(CheckpointError, match="does not use.*vision_tower.extra.weight"):
        InternVL.from_pretrained(extra)
    wrong = _rewrite(src, tmp_path / "wrong", lambda t: t.update({key: np.zeros((128, 63), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"{key}.*\(128, 63\).*\(64, 128\)"):
        InternVL.from_pretrained(wrong)


def test_pickle_checkpoint_refused_and_missing_dir(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tm.hf_config()))
    (d / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="pickle.*pytorch_model.bin.*arbitrary code"):
        InternVL.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        InternVL.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="local checkpoint directory"):
        InternVL.from_pretrained("OpenGVLab/surely-not-a-repo-xyz")


def test_vocabulary_padding_is_read_in_place(tmp_path):
    """The embedding arrives with its padding rows from the read itself (no padded copy of 0.5 GB)."""
    from internvl_jax import weights
    from internvl_jax.safetensors_io import SafetensorsFile

    table = np.arange(15, dtype=np.float32).reshape(5, 3) + 1
    save_file({"embed": table}, str(tmp_path / "m.safetensors"))
    f = SafetensorsFile(tmp_path / "m.safetensors")
    padded = f.get("embed", rows=8)
    assert padded.shape == (8, 3)
    np.testing.assert_array_equal(padded[:5], table)
    assert not padded[5:].any()
    np.testing.assert_array_equal(f.get("embed"), table)
    np.testing.assert_array_equal(f.get("embed", rows=4), table)  # never cut
    m = weights.mapping("text/embedding")
    assert weights.padded_rows(m, 151674, (151680, 896)) == 151680
    assert weights.padded_rows(m, 151680, (151680, 896)) is None  # already a multiple of 128
    assert weights.padded_rows(m, 1000, (151680, 896)) is None  # not padding: a wrong size, left to the shape check
    assert weights.padded_rows(weights.mapping("text/lm_head"), 151674, (896, 151680)) == 151680
    assert weights.padded_rows(weights.mapping("text/final_norm/scale"), 896, (896,)) is None


@pytest.mark.parametrize("name", ["gelu", "gelu_pytorch_tanh", "silu"])
def test_activations_match_torch(name):
    """Each activation a config may name against transformers' ACT2FN, float32, over the range where GELU's two
    formulas differ (the negative tail, where erf's 1 + erf(x) cancels)."""
    from transformers.activations import ACT2FN

    from internvl_jax.model.layers import ACTIVATIONS

    x = np.concatenate([np.linspace(-12, 12, 20001), np.random.default_rng(0).standard_normal(10000) * 3])
    x = x.astype(np.float32)
    want = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ACTIVATIONS[name](x)), want, rtol=0, atol=2e-6)
