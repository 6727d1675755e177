"""Converter: both checkpoint layouts -> orbax -> -hf safetensors, against transformers (float32).

Original-layout (OpenGVLab `InternVLChatModel`) checkpoints are built here from a random transformers model by
inverting transformers' own conversion script (`convert_internvl_weights_to_hf.py`): renames, the fused vision
`attn.qkv` ([Q; K; V]) and InternLM2's `wqkv` (per KV head: the group's query heads, then key, then value).
That inversion is written with torch, independently of the converter's numpy splitting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from convert import convert
from convert.cli import convert_main, export_main
from internvl_jax import InternVL, checkpoint
from internvl_jax import weights as W
from internvl_jax.config import InternVLConfig
from internvl_jax.export import export_converted, export_model
from internvl_jax.safetensors_io import CheckpointError, SafetensorsDir
from tests import tiny_models as tm
from tests.test_model_parity import close

REPO = Path(__file__).resolve().parent.parent

# InternLM2 as the -hf world sees it: a Llama decoder whose attention has biases on q/k/v/o (InternLM2's `bias`),
# no MLP bias, head_dim = hidden / heads; 8 heads over 2 KV heads so a KV group holds 4 query heads.
TEXT_INTERNLM2 = dict(tm.TEXT, model_type="llama", attention_bias=True, mlp_bias=False, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=8)
TEXT_LLAMA_PLAIN = dict(tm.TEXT, model_type="llama", attention_bias=False, mlp_bias=False, head_dim=16)

CASES = {
    "vit300m_qwen2": (tm.hf_config(), "Qwen2ForCausalLM"),
    "vit6b_style_internlm2": (tm.hf_config(tm.VISION_6B_STYLE, TEXT_INTERNLM2), "InternLM2ForCausalLM"),
    "vit300m_internlm3_llama": (tm.hf_config(text=TEXT_LLAMA_PLAIN), "InternLM3ForCausalLM"),
}


# ----- building original-layout checkpoints -----
_VISION_RENAMES = [  # -hf name piece -> original, applied in order (as the transformers script's regexes)
    ("model.vision_tower.", "vision_model."), (".encoder.layer.", ".encoder.layers."),
    ("embeddings.cls_token", "embeddings.class_embedding"), ("embeddings.position_embeddings",
                                                             "embeddings.position_embedding"),
    ("embeddings.patch_embeddings.projection", "embeddings.patch_embedding"), (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"), ("attention.projection_layer", "attn.proj"), (".attention.", ".attn."),
    ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
]
_PROJECTOR_RENAMES = [("model.multi_modal_projector.layer_norm", "mlp1.0"),
                      ("model.multi_modal_projector.linear_1", "mlp1.1"),
                      ("model.multi_modal_projector.linear_2", "mlp1.3")]
_INTERNLM2_RENAMES = [("embed_tokens", "tok_embeddings"), ("self_attn.o_proj", "attention.wo"),
                      ("mlp.gate_proj", "feed_forward.w1"), ("mlp.down_proj", "feed_forward.w2"),
                      ("mlp.up_proj", "feed_forward.w3"), ("input_layernorm", "attention_norm"),
                      ("post_attention_layernorm", "ffn_norm")]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for a, b in pairs:
        key = key.replace(a, b)
    return key


def original_state(model, internlm2: bool) -> dict[str, torch.Tensor]:
    """The original OpenGVLab state dict of a transformers InternVLForConditionalGeneration."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t = model.config.text_config
    kv, groups = t.num_key_value_heads, t.num_attention_heads // t.num_key_value_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    out: dict[str, torch.Tensor] = {}
    for key in list(sd):
        if key not in sd:
            continue  # consumed by a fused tensor
        value = sd[key]
        if key.startswith("model.vision_tower."):
            if ".attention.q_proj." in key:
                kk, vk = key.replace("q_proj", "k_proj"), key.replace("q_proj", "v_proj")
                value = torch.cat([value, sd.pop(kk), sd.pop(vk)], 0)
                key = key.replace("q_proj", "qkv")
            elif ".attention.k_proj." in key or ".attention.v_proj." in key:
                continue
            out[_rename(key, _VISION_RENAMES)] = value
        elif key.startswith("model.multi_modal_projector."):
            out[_rename(key, _PROJECTOR_RENAMES)] = value
        elif key.startswith("model.language_model.") or key == "lm_head.weight":
            if key == "lm_head.weight":
                new = "language_model.output.weight" if internlm2 else "language_model.lm_head.weight"
                if not model.config.tie_word_embeddings:
                    out[new] = value
                continue
            new = "language_model.model." + key[len("model.language_model."):]
            if internlm2 and ".self_attn.q_proj." in key:
                q = value
                k = sd.pop(key.replace("q_proj", "k_proj"))
                v = sd.pop(key.replace("q_proj", "v_proj"))
                rest = q.shape[1:]
                q = q.reshape(kv, groups, head_dim, *rest)
                k = k.reshape(kv, 1, head_dim, *rest)
                v = v.reshape(kv, 1, head_dim, *rest)
                value = torch.cat([q, k, v], 1).reshape(-1, *rest)
                new = new.replace("self_attn.q_proj", "attention.wqkv")
            elif internlm2 and (".self_attn.k_proj." in key or ".self_attn.v_proj." in key):
                continue
            elif internlm2:
                new = _rename(new, _INTERNLM2_RENAMES)
            out[new] = value
        else:
            raise AssertionError(f"unexpected key {key}")
    return {k: v.contiguous() for k, v in out.items()}


def original_config(hf: dict, llm_arch: str) -> dict:
    """The original config.json (InternVLChatModel) describing the same model as the -hf config `hf`."""
    v, t = hf["vision_config"], hf["text_config"]
    llm = {"architectures": [llm_arch], "hidden_size": t["hidden_size"], "num_hidden_layers": t["num_hidden_layers"],
           "num_attention_heads": t["num_attention_heads"], "num_key_value_heads": t["num_key_value_heads"],
           "intermediate_size": t["intermediate_size"], "vocab_size": t["vocab_size"], "rope_theta": 10000.0,
           "max_position_embeddings": t["max_position_embeddings"], "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "tie_word_embeddings": hf.get("tie_word_embeddings", False)}
    if llm_arch == "InternLM2ForCausalLM":
        llm["bias"] = t["attention_bias"]
    elif llm_arch != "Qwen2ForCausalLM":
        llm |= {"attention_bias": t["attention_bias"], "head_dim": t["head_dim"]}
    vision = {"architectures": ["InternVisionModel"], "hidden_size": v["hidden_size"],
              "num_hidden_layers": v["num_hidden_layers"], "num_attention_heads": v["num_attention_heads"],
              "intermediate_size": v["intermediate_size"], "norm_type": v["norm_type"], "layer_norm_eps": 1e-6,
              "qk_normalization": v["use_qk_norm"], "qkv_bias": v["attention_bias"], "image_size": v["image_size"],
              "patch_size": v["patch_size"], "hidden_act": "gelu", "initializer_factor": 0.1}
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
            "ps_version": "v2", "select_layer": -1, "force_image_size": v["image_size"], "template": "internvl2_5",
            "vision_config": vision, "llm_config": llm}


def save_original(model, cfg: dict, llm_arch: str, directory: Path, shard_bytes: int | None = None,
                  tokenizer: bool = True) -> Path:
    """`tokenizer`: also write the tokenizer's added tokens, as an original checkpoint ships them: the original
    model looks its image context token up there (its config.json does not say it)."""
    directory.mkdir(parents=True)
    if tokenizer:
        image_token = cfg.get("image_token_id", tm.IMAGE_TOKEN)
        (directory / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": image_token}))
    state = original_state(model, llm_arch == "InternLM2ForCausalLM")
    if shard_bytes is None:
        save_file(state, str(directory / "model.safetensors"))
    else:  # several files plus an index, as the hub's large checkpoints come
        files: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in state.items():
            if files[-1] and size + v.numel() * v.element_size() > shard_bytes:
                files.append({})
                size = 0
            files[-1][k] = v
            size += v.numel() * v.element_size()
        weight_map = {}
        for n, part in enumerate(files):
            name = f"model-{n + 1:05d}-of-{len(files):05d}.safetensors"
            save_file(part, str(directory / name))
            weight_map |= dict.fromkeys(part, name)
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(original_config(cfg, llm_arch)))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645], "do_sample": False}))
    return directory


# ----- helpers -----
def flat_params(directory: Path) -> dict[str, np.ndarray]:
    model = InternVL.from_pretrained(directory)
    return {k: np.asarray(v) for k, v in W.flatten_paths(model.params).items()}


def canonical(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """-hf tensors under the module-tree keys, whichever -hf key style the file used."""
    out = {}
    for key, value in state.items():
        for new, old in W.LEGACY_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def read_dir(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors directory (single or sharded), under the canonical -hf keys."""
    reader = SafetensorsDir(directory)
    return canonical({k: np.array(reader.get(k)) for k in reader.keys()})


def inputs(cfg: dict, seed: int = 1):
    rng = np.random.default_rng(seed)
    px = rng.standard_normal((2, 3, 56, 56)).astype(np.float32)
    ids = np.array([tm.prompt(rng, 24, [2], tm.tokens_per_tile(cfg))])
    return ids, px


# ----- tests -----
@pytest.mark.parametrize("name", list(CASES))
def test_both_layouts_convert_to_identical_params_and_match_transformers(tmp_path, name):
    cfg, llm_arch = CASES[name]
    ref = tm.torch_model(cfg, seed=7)
    hf_dir = tm.save(ref, tmp_path / "hf", "legacy")
    orig_dir = save_original(ref, cfg, llm_arch, tmp_path / "orig")

    convert(hf_dir, tmp_path / "from_hf", dtype="float32", progress=False)
    convert(orig_dir, tmp_path / "from_orig", dtype="float32", progress=False)
    for out, layout in ((tmp_path / "from_hf", "hf"), (tmp_path / "from_orig", "original" if llm_arch !=
                                                       "InternLM2ForCausalLM" else "original-internlm2")):
        assert checkpoint.read_manifest(out)["source"]["layout"] == layout

    assert InternVLConfig.from_pretrained(tmp_path / "from_orig") == InternVLConfig.from_pretrained(hf_dir)
    a, b = flat_params(tmp_path / "from_hf"), flat_params(tmp_path / "from_orig")
    direct = {k: np.asarray(v) for k, v in W.flatten_paths(InternVL.from_pretrained(hf_dir).params).items()}
    assert a.keys() == b.keys() == direct.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
        assert np.array_equal(a[k], direct[k]), k  # the converter agrees with the direct -hf loader

    model = InternVL.from_pretrained(tmp_path / "from_orig")
    ids, px = inputs(cfg)
    close(model(ids, px), tm.torch_logits(ref, ids, px))


def test_original_layout_is_really_fused(tmp_path):
    """Guard on the test's own inversion: the original checkpoint holds fused q/k/v and InternLM2 names only."""
    cfg, arch = CASES["vit6b_style_internlm2"]
    keys = set(original_state(tm.torch_model(cfg), True))
    assert "language_model.model.layers.0.attention.wqkv.weight" in keys
    assert "language_model.model.layers.0.attention.wqkv.bias" in keys
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in keys
    assert "language_model.output.weight" in keys
    assert not any("q_proj" in k or "k_proj" in k or "self_attn" in k or "vision_tower" in k for k in keys)
    t = cfg["text_config"]
    rows = (t["num_attention_heads"] + 2 * t["num_key_value_heads"]) * t["head_dim"]
    assert original_state(tm.torch_model(cfg), True)["language_model.model.layers.0.attention.wqkv.weight"].shape[0] \
        == rows


@pytest.mark.parametrize("name", ["vit300m_qwen2", "vit6b_style_internlm2", "tied"])
def test_round_trip_is_bit_exact_and_export_loads_in_transformers(tmp_path, name):
    from transformers import InternVLForConditionalGeneration

    cfg, llm_arch = CASES[name] if name != "tied" else (tm.hf_config(tie_word_embeddings=True), None)
    ref = tm.torch_model(cfg, seed=3)
    hf_dir = tm.save(ref, tmp_path / "hf", "legacy")
    src = hf_dir if llm_arch is None else save_original(ref, cfg, llm_arch, tmp_path / "orig")
    convert(src, tmp_path / "ours", dtype="float32", progress=False)
    export_converted(tmp_path / "ours", tmp_path / "back", max_shard_size="1MB")
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()

    before, after = read_dir(hf_dir), read_dir(tmp_path / "back")
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype == np.float32, key
        assert np.array_equal(before[key], after[key]), key

    loaded = InternVLForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    ids, px = inputs(cfg)
    assert np.array_equal(tm.torch_logits(loaded, ids, px), tm.torch_logits(ref, ids, px))


def test_export_of_a_model_in_memory_after_an_update(tmp_path):
    """Weights changed in JAX (as fine-tuning would) come out in transformers with the change."""
    from transformers import InternVLForConditionalGeneration

    cfg = tm.hf_config()
    ref = tm.torch_model(cfg, seed=5)
    model = InternVL.from_pretrained(tm.save(ref, tmp_path / "hf", "legacy"))
    model.params = jax.tree.map(lambda x: x * 1.01, model.params)
    export_model(model, tmp_path / "tuned")
    tuned = InternVLForConditionalGeneration.from_pretrained(tmp_path / "tuned").eval()
    ids, px = inputs(cfg)
    ours, theirs = model(ids, px), tm.torch_logits(tuned, ids, px)
    close(ours, theirs)
    assert not np.allclose(theirs, tm.torch_logits(ref, ids, px), atol=1e-3)


def test_bfloat16_source_round_trip_and_float32_restore(tmp_path):
    cfg = tm.hf_config()
    ref = tm.torch_model(cfg, seed=2).to(torch.bfloat16)
    hf_dir = tm.save(ref, tmp_path / "hf", "legacy")
    convert(hf_dir, tmp_path / "ours", progress=False)  # dtype auto: stays bfloat16
    manifest = checkpoint.read_manifest(tmp_path / "ours")
    assert manifest["dtype"] == "bfloat16"
    assert {e["dtype"] for e in manifest["params"].values()} == {"bfloat16"}

    export_converted(tmp_path / "ours", tmp_path / "back")
    before, after = read_dir(hf_dir), read_dir(tmp_path / "back")
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == ml_dtypes.bfloat16
        assert np.array_equal(before[key].view(np.uint16), after[key].view(np.uint16)), key

    # Restored as float32: exactly the bfloat16 values, widened.
    model = InternVL.from_pretrained(tmp_path / "ours", dtype="float32")
    emb = np.asarray(model.params["text"]["embedding"])
    assert emb.dtype == np.float32
    table = before["model.language_model.embed_tokens.weight"].astype(np.float32)
    assert np.array_equal(emb[: table.shape[0]], table)
    assert not emb[table.shape[0]:].any()  # the vocabulary padding (TextConfig.padded_vocab) is zeros


def test_float32_to_bfloat16_conversion(tmp_path):
    cfg = tm.hf_config()
    ref = tm.torch_model(cfg, seed=4)
    hf_dir = tm.save(ref, tmp_path / "hf", "legacy")
    convert(hf_dir, tmp_path / "bf16", dtype="bfloat16", progress=False)
    model = InternVL.from_pretrained(tmp_path / "bf16", dtype="bfloat16")
    q = np.asarray(model.params["text"]["layers"]["q"]["kernel"])
    assert q.dtype == ml_dtypes.bfloat16
    src = read_dir(hf_dir)["model.language_model.layers.1.self_attn.q_proj.weight"]
    expected = W.to_ours(W.mapping("text/layers/q/kernel"), src, q.shape[1:]).astype(ml_dtypes.bfloat16)
    assert np.array_equal(q[1].view(np.uint16), expected.view(np.uint16))


def test_processor_and_generation_files_come_along(tmp_path):
    from internvl_jax import InternVLProcessor
    from tests import fixtures

    cfg = tm.hf_config()
    hf_dir = tm.save(tm.torch_model(cfg), tmp_path / "hf", "legacy")
    fixtures.write_processor_files(hf_dir)
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643], "top_k": 7}))
    convert(hf_dir, tmp_path / "ours", dtype="float32", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "video_preprocessor_config.json", "processor_config.json", "generation_config.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (hf_dir / name).read_bytes(), name
    a, b = InternVLProcessor.from_pretrained(hf_dir), InternVLProcessor.from_pretrained(tmp_path / "ours")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this, please."}]}]
    assert a.apply_chat_template(messages, add_generation_prompt=True) == \
        b.apply_chat_template(messages, add_generation_prompt=True)
    text = ["héllo wörld <IMG_CONTEXT>"]
    assert a.tokenizer.encode_batch(text) == b.tokenizer.encode_batch(text)
    model = InternVL.from_pretrained(tmp_path / "ours")
    assert model.generation_config.eos_token_id == (151645, 151643)
    assert model.generation_config.top_k == 7
    # ... and export carries them on.
    export_converted(tmp_path / "ours", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


# ----- errors and atomicity -----
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return tm.save(tm.torch_model(tm.hf_config()), tmp_path_factory.mktemp("tiny") / "hf", "legacy")


def test_existing_destination_needs_force(tmp_path, tiny_hf):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    for force in (False, True):  # not ours: kept, even with force (tests/test_destinations.py has the rest)
        with pytest.raises(FileExistsError, match=r"out holds keep.txt, which internvl_jax did not write"):
            convert(tiny_hf, dst, force=force, progress=False)
    assert (dst / "keep.txt").read_text() == "mine"
    (dst / "keep.txt").unlink()
    with pytest.raises(FileExistsError, match=r"out already exists; pass --force"):
        convert(tiny_hf, dst, progress=False)
    convert(tiny_hf, dst, dtype="float32", force=True, progress=False)
    assert checkpoint.is_converted(dst)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary siblings left behind


def test_refuses_to_overwrite_its_source(tmp_path, tiny_hf):
    with pytest.raises(CheckpointError, match="would overwrite the source"):
        convert(tiny_hf, tiny_hf, force=True, progress=False)
    with pytest.raises(CheckpointError, match="would overwrite the source"):
        convert(tiny_hf, tiny_hf.parent, force=True, progress=False)
    assert (tiny_hf / "model.safetensors").is_file()


def test_failure_half_way_leaves_nothing_at_destination(tmp_path, tiny_hf, monkeypatch):
    calls = []
    original = checkpoint.ParamWriter.save

    def failing(self, path, array):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        return original(self, path, array)

    monkeypatch.setattr(checkpoint.ParamWriter, "save", failing)
    with pytest.raises(OSError, match="simulated"):
        convert(tiny_hf, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


_KILL_SCRIPT = """
import os, signal, sys
from internvl_jax import checkpoint
from convert.cli import convert_main
saved = []
original = checkpoint.ParamWriter.save
def save(self, path, array):
    original(self, path, array)
    saved.append(path)
    if len(saved) == 6:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.ParamWriter.save = save
sys.exit(convert_main(sys.argv[1:]))
"""


def test_killed_conversion_leaves_no_complete_looking_destination(tmp_path, tiny_hf):
    dst = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tiny_hf), str(dst), "--quiet"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert not dst.exists()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.partial-")
    assert not checkpoint.is_converted(leftovers[0])  # the manifest is written last
    # A rerun is not confused by the leftover, and removes it (its process is gone).
    assert convert_main([str(tiny_hf), str(dst), "--quiet", "--dtype", "float32"]) == 0
    assert checkpoint.is_converted(dst) and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_layout_errors_name_the_problem(tmp_path, tiny_hf):
    state = load_file(str(tiny_hf / "model.safetensors"))
    config = (tiny_hf / "config.json").read_text()

    def ckpt(name: str, tensors: dict, cfg: str = config) -> Path:
        d = tmp_path / name
        d.mkdir()
        save_file_np(tensors, d / "model.safetensors")
        (d / "config.json").write_text(cfg)
        return d

    text_only = ckpt("text_only", {k: v for k, v in state.items() if k.startswith("language_model.")})
    with pytest.raises(CheckpointError, match=r"cannot tell the checkpoint layout.*neither"):
        convert(text_only, tmp_path / "o1", progress=False)

    with pytest.raises(CheckpointError, match=r"--layout original was asked for.*'hf' layout"):
        convert(tiny_hf, tmp_path / "o2", layout="original", progress=False)

    missing_key = "language_model.model.layers.1.mlp.up_proj.weight"
    missing = ckpt("missing", {k: v for k, v in state.items() if k != missing_key})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\).*layers\.1\.mlp\.up_proj\.weight"):
        convert(missing, tmp_path / "o3", progress=False)

    extra = ckpt("extra", state | {"vision_tower.encoder.layer.9.mlp.fc1.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"does not use.*layer\.9\.mlp\.fc1"):
        convert(extra, tmp_path / "o4", progress=False)

    bad = json.loads(config)
    bad["text_config"]["intermediate_size"] = 96
    wrong = ckpt("wrong_shape", state, json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.down_proj\.weight' has shape \(64, 128\) \(8192 "
                       r"values\), but the config needs 6144 values from it: text/layers/down/kernel \(96, 64\)"):
        convert(wrong, tmp_path / "o5", progress=False)

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text(config)
    (pickles / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pickle"):
        convert(pickles, tmp_path / "o6", progress=False)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("o", "."))]  # no output, no leftovers


def save_file_np(tensors: dict[str, np.ndarray], file: Path) -> None:
    from safetensors.numpy import save_file as save_np

    save_np(tensors, str(file))


def test_converted_directory_checks_shapes(tmp_path, tiny_hf):
    convert(tiny_hf, tmp_path / "ours", dtype="float32", progress=False)
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (tmp_path / "ours" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'text/layers/(down|gate|up)/kernel' has shape \(2, .*needs \(2, "):
        InternVL.from_pretrained(tmp_path / "ours")


def test_a_converted_directory_loads_by_a_relative_path(tmp_path, tiny_hf, monkeypatch):
    """orbax restores only absolute paths: `from_pretrained("out/model")` failed on every parameter."""
    convert(tiny_hf, tmp_path / "ours", dtype="float32", progress=False)
    monkeypatch.chdir(tmp_path)
    relative = InternVL.from_pretrained("ours")
    absolute = InternVL.from_pretrained(tmp_path / "ours")
    for p, a in W.flatten_paths(absolute.params).items():
        np.testing.assert_array_equal(np.asarray(W.flatten_paths(relative.params)[p]), np.asarray(a))


# ----- command line -----
def test_command_lines(tmp_path, tiny_hf, capsys):
    assert convert_main([str(tiny_hf), str(tmp_path / "ours"), "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "tensors 73/73" in err and "params" in err  # the progress bar counts tensors and bytes
    assert convert_main([str(tiny_hf), str(tmp_path / "ours")]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert export_main([str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert read_dir(tmp_path / "back").keys() == read_dir(tiny_hf).keys()
    assert export_main([str(tiny_hf), str(tmp_path / "back2")]) == 2  # not a converted directory
    assert "manifest" in capsys.readouterr().err


def test_main_module_is_importable_for_the_internvl_jax_cli():
    import convert.__main__ as main_module  # must not run (or exit) on import

    assert main_module.convert_main is convert_main and main_module.export_main is export_main


def test_python_dash_m_convert(tmp_path, tiny_hf):
    run = subprocess.run([sys.executable, "-m", "convert", str(tiny_hf), str(tmp_path / "ours"), "--dtype",
                          "bfloat16", "--layout", "hf"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "converting" in run.stderr and "100%" in run.stderr
    assert checkpoint.read_manifest(tmp_path / "ours")["dtype"] == "bfloat16"


# ----- original checkpoints loaded directly (one reader for every path) -----
@pytest.mark.parametrize("name", list(CASES))
def test_from_pretrained_loads_original_layouts_directly(tmp_path, name):
    """InternVL.from_pretrained reads an original OpenGVLab directory (fused q/k/v, InternLM2 names, index-sharded
    files) without a conversion: the same parameters as from the -hf copy, the same logits as transformers."""
    cfg, llm_arch = CASES[name]
    ref = tm.torch_model(cfg, seed=11)
    hf_dir = tm.save(ref, tmp_path / "hf", "module")
    orig_dir = save_original(ref, cfg, llm_arch, tmp_path / "orig", shard_bytes=200_000)
    assert (orig_dir / "model.safetensors.index.json").is_file()
    model = InternVL.from_pretrained(orig_dir)
    assert model.config == InternVL.from_pretrained(hf_dir).config
    ours = W.flatten_paths(model.params)
    for k, v in W.flatten_paths(InternVL.from_pretrained(hf_dir).params).items():
        assert np.array_equal(np.asarray(ours[k]), np.asarray(v)), k
    ids, px = inputs(cfg, seed=2)
    close(model(ids, px), tm.torch_logits(ref, ids, px))


def _internlm2_prompt(cfg: dict, image_token: int) -> tuple[np.ndarray, np.ndarray]:
    ids, px = inputs(cfg, seed=3)
    ids = np.where(ids == tm.IMAGE_TOKEN, image_token, ids)
    assert (ids == image_token).sum() == 2 * tm.tokens_per_tile(cfg)
    return ids, px


def test_internlm2_original_without_tokenizer_files_sees_its_images(tmp_path):
    """An InternLM2-type original checkpoint whose directory has no tokenizer files: the image context token is
    InternLM2's `<IMG_CONTEXT>` (92546, as transformers' conversion sets it), not Qwen2's 151667, or the model
    would see no image. Image prompt -> the same logits as transformers on the -hf copy, loaded directly, after
    conversion, and after export back to -hf."""
    from transformers import InternVLForConditionalGeneration

    cfg = tm.hf_config(tm.VISION_6B_STYLE, TEXT_INTERNLM2, image_token_id=92546)
    ref = tm.torch_model(cfg, seed=5)
    orig_dir = save_original(ref, cfg, "InternLM2ForCausalLM", tmp_path / "orig", tokenizer=False)
    assert not any(p.name.startswith(("tokenizer", "added_tokens")) for p in orig_dir.iterdir())
    assert InternVLConfig.from_pretrained(orig_dir).image_token_id == 92546
    ids, px = _internlm2_prompt(cfg, 92546)
    expected = tm.torch_logits(ref, ids, px)
    close(InternVL.from_pretrained(orig_dir)(ids, px), expected)

    convert(orig_dir, tmp_path / "ours", dtype="float32", progress=False)
    close(InternVL.from_pretrained(tmp_path / "ours")(ids, px), expected)
    export_converted(tmp_path / "ours", tmp_path / "back")
    back = InternVLForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    assert back.config.image_token_id == 92546
    close(tm.torch_logits(back, ids, px), expected)


def test_original_image_token_comes_from_the_tokenizer_files(tmp_path):
    """Each tokenizer file that can name `<IMG_CONTEXT>` is read; config.json's own field wins; without any,
    the LLM family's id."""
    raw = original_config(*CASES["vit6b_style_internlm2"])
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(raw))
    assert InternVLConfig.from_pretrained(d).image_token_id == 92546
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 7, "content": "<img>"},
                                                                    {"id": 9, "content": "<IMG_CONTEXT>"}]}))
    assert InternVLConfig.from_pretrained(d).image_token_id == 9
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "11": {"content": "<IMG_CONTEXT>", "special": True}}}))
    assert InternVLConfig.from_pretrained(d).image_token_id == 11
    (d / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": 13}))
    assert InternVLConfig.from_pretrained(d).image_token_id == 13
    (d / "config.json").write_text(json.dumps(raw | {"img_context_token_id": 15}))
    assert InternVLConfig.from_pretrained(d).image_token_id == 15
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps(original_config(*CASES["vit300m_qwen2"])))
    assert InternVLConfig.from_pretrained(qwen).image_token_id == 151667
