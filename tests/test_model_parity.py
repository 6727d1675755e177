"""Logit, feature, loss and gradient parity with transformers' InternVLForConditionalGeneration (float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from internvl_jax import InternVL
from internvl_jax import weights as W
from tests import tiny_models as tm


def close(ours, ref, mask=None) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if mask is not None:
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol, f"max abs diff {err:.3g} > {tol:.3g}"


def pixels(rng, tiles, size=56):
    return rng.standard_normal((tiles, 3, size, size)).astype(np.float32)


CASES = {
    "vit300m_qwen2_untied": tm.hf_config(),
    "vit6b_style_rms_qknorm_nobias": tm.hf_config(tm.VISION_6B_STYLE),
    "tied_lm_head": tm.hf_config(tie_word_embeddings=True),
    "llama_decoder_biases_headdim": tm.hf_config(text=tm.TEXT_LLAMA),
    "feature_layer_minus2": tm.hf_config(vision_feature_layer=-2),
    "feature_layer_0_no_mean_pooling": tm.hf_config(dict(tm.VISION, use_mean_pooling=False), vision_feature_layer=1),
    "final_norm_no_mean_pooling": tm.hf_config(dict(tm.VISION, use_mean_pooling=False)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_features(tmp_path, name):
    cfg = CASES[name]
    path, ref = tm.make(tmp_path, cfg)
    model = InternVL.from_pretrained(path)
    rng = np.random.default_rng(1)
    px = pixels(rng, 3)
    ids = np.array([tm.prompt(rng, 40, [3], tm.tokens_per_tile(cfg))])
    close(model(ids, px), tm.torch_logits(ref, ids, px))
    with torch.no_grad():
        feats = ref.model.get_image_features(pixel_values=torch.tensor(px)).pooler_output.numpy()
        vision = ref.model.vision_tower(pixel_values=torch.tensor(px)).last_hidden_state.numpy()
    close(model.get_image_features(px), feats)
    if cfg.get("vision_feature_layer", -1) == -1:
        # The tower alone (before pixel shuffle) and the projector alone.
        from internvl_jax.model.internvl import InternVLModule
        from internvl_jax.model.projector import tokens_from_patches

        ours_vision = model.module.apply({"params": model.params}, px, method=lambda m, p: m.vision(p))
        close(ours_vision, vision)
        shuffled = tokens_from_patches(ours_vision, model.config)
        ours_proj = model.module.apply({"params": model.params}, shuffled, method=lambda m, x: m.projector(x))
        with torch.no_grad():
            ref_shuffled = ref.model.pixel_shuffle(torch.tensor(vision)[:, 1:].reshape(3, 4, 4, -1))
            ref_proj = ref.model.multi_modal_projector(ref_shuffled.reshape(3, 4, -1)).numpy()
        close(shuffled, ref_shuffled.reshape(3, 4, -1).numpy())
        close(ours_proj, ref_proj)
        assert InternVLModule  # imported for the method lambdas' module type


def test_batch_left_padding_mixed_images(tmp_path):
    """3 rows: two images of 2 and 1 tiles / one image of 3 tiles / no image; left padded."""
    cfg = tm.hf_config()
    path, ref = tm.make(tmp_path, cfg)
    model = InternVL.from_pretrained(path)
    rng = np.random.default_rng(2)
    per = tm.tokens_per_tile(cfg)
    rows = [tm.prompt(rng, 30, [2, 1], per), tm.prompt(rng, 25, [3], per), tm.prompt(rng, 12, [], per)]
    ids, mask = tm.left_pad(rows)
    px = pixels(rng, 6)  # tiles of all images in prompt order: row 0 (2 + 1), row 1 (3)
    ours = model(ids, px, mask)
    close(ours, tm.torch_logits(ref, ids, px, mask), mask)
    # Each row alone gives the same logits at its real tokens (padding changes nothing).
    alone = model(np.array([rows[2]]))
    close(np.asarray(ours)[2, -len(rows[2]):], np.asarray(alone)[0])


def test_long_prompt_dynamic_rope(tmp_path):
    """650 tokens with dynamic NTK scaling past max_position_embeddings=256: RoPE bugs show only here."""
    text = dict(tm.TEXT, max_position_embeddings=256,
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    cfg = tm.hf_config(text=text)
    path, ref = tm.make(tmp_path, cfg)
    model = InternVL.from_pretrained(path)
    rng = np.random.default_rng(3)
    ids = np.array([tm.prompt(rng, 640, [2], tm.tokens_per_tile(cfg))])
    assert ids.shape[1] >= 600
    px = pixels(rng, 2)
    close(model(ids, px), tm.torch_logits(ref, ids, px))
    close(model(ids, px, logits_to_keep=5), tm.torch_logits(ref, ids, px)[:, -5:])


def test_long_prompt_default_rope(tmp_path):
    cfg = tm.hf_config()
    path, ref = tm.make(tmp_path, cfg)
    model = InternVL.from_pretrained(path)
    rng = np.random.default_rng(4)
    ids = np.array([tm.prompt(rng, 700, [], 4)])
    close(model(ids), tm.torch_logits(ref, ids))


def test_other_image_size_interpolates_positions(tmp_path):
    cfg = tm.hf_config()
    path, ref = tm.make(tmp_path, cfg)
    model = InternVL.from_pretrained(path)
    rng = np.random.default_rng(5)
    px = pixels(rng, 2, size=84)  # config says 56: 6x6 patches instead of 4x4
    ids = np.array([tm.prompt(rng, 20, [2], tm.tokens_per_tile(cfg, 84))])
    close(model(ids, px), tm.torch_logits(ref, ids, px))


@pytest.mark.parametrize("layout", ["legacy", "new", "sharded"])
def test_key_layouts_and_sharded_files(tmp_path, layout):
    cfg = tm.hf_config()
    ref = tm.torch_model(cfg)
    if layout == "sharded":
        path = tm.save(ref, tmp_path / "s", "legacy", shard_size="2MB")
        assert (path / "model.safetensors.index.json").is_file()
    else:
        path = tm.save(ref, tmp_path / layout, layout)
    model = InternVL.from_pretrained(path)
    ids = np.array([[1, 2, 3, 4, 5]])
    close(model(ids), tm.torch_logits(ref, ids))


def test_loss_and_gradients(tmp_path):
    import jax

    cfg = tm.hf_config()
    path, ref = tm.make(tmp_path, cfg)
    model = InternVL.from_pretrained(path)
    rng = np.random.default_rng(6)
    per = tm.tokens_per_tile(cfg)
    rows = [tm.prompt(rng, 20, [1], per), tm.prompt(rng, 14, [], per)]
    ids, mask = tm.left_pad(rows)
    # A token whose predecessor is padding is predicted from a padding slot, where transformers' own eager
    # and SDPA attention disagree (fully masked query): such labels are -100, as a data collator sets them.
    prev_real = np.pad(mask, ((0, 0), (1, 0)))[:, :-1] == 1
    labels = np.where((mask == 1) & prev_real & (ids != tm.IMAGE_TOKEN), ids, -100)
    px = pixels(rng, 1)

    ref.train(False)
    out = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), attention_mask=torch.tensor(mask),
              labels=torch.tensor(labels))
    out.loss.backward()
    loss = model.loss(ids, labels, px, mask)
    assert abs(float(loss) - out.loss.item()) <= 1e-5 * max(1.0, out.loss.item())

    grads = jax.grad(lambda p: model.loss(ids, labels, px, mask, params=p))(model.params)
    named = dict(ref.named_parameters())
    checks = {  # our path, layer -> torch parameter (module-tree names)
        ("text/layers/q/kernel", 1): "model.language_model.layers.1.self_attn.q_proj.weight",
        ("text/layers/o/kernel", 0): "model.language_model.layers.0.self_attn.o_proj.weight",
        ("vision/layers/fc1/kernel", 0): "model.vision_tower.encoder.layer.0.mlp.fc1.weight",
        ("vision/layers/ls1", 1): "model.vision_tower.encoder.layer.1.lambda_1",
        ("projector/fc1/kernel", None): "model.multi_modal_projector.linear_1.weight",
        ("text/embedding", None): "model.language_model.embed_tokens.weight",
    }
    flat = W.flatten_paths(grads)
    for (path_, layer), tname in checks.items():
        ours = np.asarray(flat[path_])
        if layer is not None:
            ours = ours[layer]
        theirs = W.to_ours(W.mapping(path_), named[tname].grad.numpy(), ours.shape)
        scale = max(1e-3, float(np.abs(theirs).max()))
        assert np.abs(ours - theirs).max() <= 1e-4 * scale, path_
