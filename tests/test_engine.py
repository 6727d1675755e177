"""Generation: token parity with transformers' generate, batching, compile counts, sampling, EOS, limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from internvl_jax import InternVL
from internvl_jax.engine import generate as gen
from internvl_jax.engine import sampling
from internvl_jax.presets import preset
from tests import tiny_models as tm

NEW = 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = tm.hf_config()
    path, ref = tm.make(tmp_path_factory.mktemp("engine"), cfg, seed=7)
    return InternVL.from_pretrained(path), ref


def torch_generate(ref, ids, mask, px=None, **kw):
    args = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if px is not None:
        args["pixel_values"] = torch.tensor(px)
    kw.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return ref.generate(**args, do_sample=False, **kw).numpy()


def agree(ours: np.ndarray, theirs: np.ndarray, ref, ids_mask_px) -> None:
    """Token-identical, except after a position where torch's top-2 logit margin is below 1e-4 (a near tie
    between two tokens on a random model; none has been seen with these seeds, but float32 allows it)."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    if (ours == theirs).all():
        return
    row, col = np.argwhere(ours != theirs)[0]
    ids, mask, px = ids_mask_px
    # The row as it was asked alone: its own pixels (a list gives each row's) and no left padding.
    start = int(np.argmax(mask[row])) if mask is not None else 0
    prefix = theirs[row:row + 1, start:col]
    row_px = px[row] if isinstance(px, list) else px if row == 0 else None
    logits = tm.torch_logits(ref, prefix, row_px)[0, -1]
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] < 1e-4, f"row {row} differs at column {col} with a clear margin"


def rows_and_pixels(rng, per=4):
    rows = {
        "text_only": (tm.prompt(rng, 23, [], per), 0),
        "one_image": (tm.prompt(rng, 17, [2], per), 2),
        "multi_image": (tm.prompt(rng, 30, [1, 3], per), 4),
        # A video at the model's level: one tile per frame, each frame its own image-token run.
        "video_4_frames": (tm.prompt(rng, 20, [1, 1, 1, 1], per), 4),
    }
    pixels = {k: rng.standard_normal((n, 3, 56, 56)).astype(np.float32) if n else None for k, (_, n) in rows.items()}
    return rows, pixels


@pytest.mark.parametrize("kind", ["text_only", "one_image", "multi_image", "video_4_frames"])
def test_greedy_matches_transformers(pair, kind):
    model, ref = pair
    rows, pixels = rows_and_pixels(np.random.default_rng(11))
    ids, mask = tm.left_pad([rows[kind][0]])
    px = pixels[kind]
    ours = model.generate(ids, px, mask, max_new_tokens=NEW)
    theirs = torch_generate(ref, ids, mask, px, max_new_tokens=NEW)
    assert ours.shape[1] == ids.shape[1] + NEW
    agree(ours, theirs, ref, (ids, mask, px))


def test_mixed_batch_matches_transformers_and_each_row_alone(pair):
    model, ref = pair
    rows, pixels = rows_and_pixels(np.random.default_rng(11))
    order = ["multi_image", "text_only", "video_4_frames", "one_image"]
    ids, mask = tm.left_pad([rows[k][0] for k in order])
    px = np.concatenate([pixels[k] for k in order if pixels[k] is not None])
    ours = model.generate(ids, px, mask, max_new_tokens=NEW)
    agree(ours, torch_generate(ref, ids, mask, px, max_new_tokens=NEW), ref, (ids, mask, [pixels[k] for k in order]))
    for i, k in enumerate(order):
        one_ids, one_mask = tm.left_pad([rows[k][0]])
        alone = model.generate(one_ids, pixels[k], one_mask, max_new_tokens=NEW)
        # Other shapes, other roundings: identical up to a near tie, like the comparison with torch.
        batched = np.concatenate([alone[:, :-NEW], ours[i:i + 1, -NEW:]], axis=1)
        agree(batched, alone, ref, (one_ids, one_mask, pixels[k]))


def test_no_recompilation_within_a_bucket(pair):
    import jax

    model, _ = pair
    compiles: list[str] = []

    def listener(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    rng = np.random.default_rng(3)
    model.generate(np.array([rng.integers(0, 1000, 40)]), max_new_tokens=8)  # warm-up: prompt bucket 48
    warm = len(compiles)
    for length in range(33, 49):  # sixteen different lengths, all in the 48 bucket
        model.generate(np.array([rng.integers(0, 1000, length)]), max_new_tokens=8)
    assert len(compiles) == warm, f"{len(compiles) - warm} new compilations inside one bucket"
    model.generate(np.array([rng.integers(0, 1000, 49)]), max_new_tokens=8)  # bucket 64: prefill recompiles
    assert len(compiles) > warm


def test_prompt_buckets_pad_at_most_a_third():
    from internvl_jax.engine.generate import MIN_PROMPT_BUCKET, prompt_bucket

    sizes = sorted({prompt_bucket(n) for n in range(1, 10_000)})
    assert sizes[:6] == [16, 24, 32, 48, 64, 96] and 384 in sizes and 8192 in sizes
    for n in range(1, 10_000):
        p = prompt_bucket(n)
        assert p >= n and (p <= MIN_PROMPT_BUCKET or p - n < p / 3), (n, p)  # padding: under a third


def test_streaming_yields_the_same_tokens(pair):
    model, _ = pair
    ids = np.array([np.random.default_rng(5).integers(0, 1000, 19)])
    full = model.generate(ids, max_new_tokens=20)

    class Collect:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, t):
            self.parts.append(t)

        def end(self):
            self.ended = True

    streamer = Collect()
    again = model.generate(ids, max_new_tokens=20, streamer=streamer)
    np.testing.assert_array_equal(again, full)
    assert len(streamer.parts) == 3 and streamer.ended  # chunks of 8: 8 + 8 + 4
    chunks = list(model.stream(ids, max_new_tokens=20, chunk=5))
    assert [c.shape[1] for c in chunks] == [5, 5, 5, 5]
    np.testing.assert_array_equal(np.concatenate(chunks, 1)[0], full[0, -20:])


def test_eos_rows_stop_independently_and_loop_ends(pair):
    model, ref = pair
    rng = np.random.default_rng(9)
    ids, mask = tm.left_pad([list(rng.integers(0, 1000, 15)), list(rng.integers(0, 1000, 9))])
    free = model.generate(ids, None, mask, max_new_tokens=12)
    eos = int(free[0, ids.shape[1] + 3])  # row 0 emits this at step 4
    assert eos not in free[1, ids.shape[1]:ids.shape[1] + 4]
    out = model.generate(ids, None, mask, max_new_tokens=12, eos_token_id=[eos, 99999], pad_token_id=1)
    theirs = torch_generate(ref, ids, mask, max_new_tokens=12, eos_token_id=[eos, 99999], pad_token_id=1)
    np.testing.assert_array_equal(out, theirs)
    first = int(np.argmax(out[0, ids.shape[1]:] == eos))
    assert (out[0, ids.shape[1] + first + 1:] == 1).all()  # padded after its EOS
    # Every row's first token as EOS: the loop stops after one step.
    firsts = [int(free[0, ids.shape[1]]), int(free[1, ids.shape[1]])]
    short = model.generate(ids, None, mask, max_new_tokens=12, eos_token_id=firsts)
    assert short.shape[1] == ids.shape[1] + 1


def test_sampling_reproducible_and_degenerate_cases(pair):
    model, _ = pair
    ids = np.array([np.random.default_rng(2).integers(0, 1000, 21)])
    greedy = model.generate(ids, max_new_tokens=10)
    a = model.generate(ids, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.5, seed=4)
    b = model.generate(ids, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.5, seed=4)
    c = model.generate(ids, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.5, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not (a == c).all()
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(
        model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1e-4, seed=3), greedy)


def test_sampled_distribution_matches_softmax():
    import jax

    logits = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32))[None].repeat(4000, 0)
    rule = sampling.SamplingConfig(do_sample=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    draws = np.concatenate([np.asarray(sampling.choose(logits, k, rule, None)) for k in keys])
    counts = np.bincount(draws, minlength=5)
    expected = np.array([0.5, 0.25, 0.15, 0.07, 0.03]) * draws.size
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5  # 4 degrees of freedom: p = 0.001


def test_filters_match_transformers_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
    seen_ids = rng.integers(0, 50, (3, 7))
    t = torch.tensor(logits)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(seen_ids), t.clone())
    seen = np.zeros((3, 50), bool)
    np.put_along_axis(seen, seen_ids, True, axis=1)
    np.testing.assert_allclose(sampling.apply_repetition_penalty(logits, seen, 1.3), ref.numpy(), rtol=1e-6)
    ref = TopKLogitsWarper(7)(None, TemperatureLogitsWarper(0.7)(None, t.clone()))
    np.testing.assert_array_equal(np.isinf(sampling.top_k_filter(logits / 0.7, 7)), torch.isinf(ref).numpy())
    for p in (0.3, 0.8, 0.95):
        ref = TopPLogitsWarper(p)(None, t.clone())
        np.testing.assert_array_equal(np.isinf(sampling.top_p_filter(logits, p)), torch.isinf(ref).numpy())


def test_bad_generation_input(pair, monkeypatch):
    model, _ = pair
    ids = np.array([[5, 6, 7]])
    with pytest.raises(ValueError, match="maximum length 4096"):
        model.generate(ids, max_new_tokens=4095)
    with pytest.raises(ValueError, match="empty"):
        model.generate(np.zeros((1, 0), np.int64))
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of the prompt are empty"):
        model.generate(np.array([[5, 6], [0, 0]]), None, np.array([[1, 1], [0, 0]]))
    for bad, match in [({"temperature": 0.0, "do_sample": True}, "temperature"), ({"top_p": 1.5}, "top_p"),
                       ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"),
                       ({"repetition_penalty": 0}, "repetition_penalty"), ({"num_beams": 2}, "num_beams")]:
        with pytest.raises((ValueError, TypeError), match=match):
            model.generate(ids, **bad)
    # The cache size is checked against free memory before anything is allocated.
    with pytest.raises(MemoryError, match=r"needs .* GiB but only .* GiB is free"):
        gen.check_cache_fits(preset("InternVL3-78B"), 256, 32768, np.dtype("float32"))
    monkeypatch.setattr(gen, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match="KV cache for batch 1"):
        model.generate(ids, max_new_tokens=4)


def test_cpu_layer_loop_uses_the_stacked_weights_in_place(pair):
    """The layer loop's per-layer kernels are views of the stacked arrays (no second copy of the weights)."""
    from internvl_jax.engine import layer_loop

    model, _ = pair
    stacked = model.params["text"]["layers"]
    n = model.config.text.num_layers
    views = layer_loop.layer_views(stacked, n)
    assert views is not None and len(views) == n
    for i, view in enumerate(views):
        kernel, whole = view["gate"]["kernel"], stacked["gate"]["kernel"]
        assert kernel.unsafe_buffer_pointer() == whole.unsafe_buffer_pointer() + i * kernel.nbytes
        np.testing.assert_array_equal(np.asarray(kernel), np.asarray(whole[i]))
    assert layer_loop.layer_views({"w": np.zeros((n, 4, 4), np.float32)}, n) is None  # not a device array


@pytest.mark.parametrize("kwargs", [{}, {"repetition_penalty": 1.3}, {"do_sample": True, "top_k": 20, "seed": 1}])
def test_layer_loop_and_on_device_loop_give_the_same_tokens(pair, monkeypatch, kwargs):
    """On one CPU device generate steps through the layers from the host (engine/layer_loop.py); elsewhere
    the whole step loop runs on device. Both must produce the same tokens, EOS stops included."""
    from internvl_jax.engine import layer_loop

    model, ref = pair
    rng = np.random.default_rng(21)
    ids, mask = tm.left_pad([list(rng.integers(0, 1000, 26)), list(rng.integers(0, 1000, 11))])
    host = model.generate(ids, None, mask, max_new_tokens=12, **kwargs)
    eos = [int(host[0, ids.shape[1] + 5]), int(host[1, ids.shape[1] + 3])]  # both rows stop: the loop ends
    host_eos = model.generate(ids, None, mask, max_new_tokens=12, eos_token_id=eos, **kwargs)
    monkeypatch.setattr(layer_loop, "decoder", lambda *a: None)
    device = model.generate(ids, None, mask, max_new_tokens=12, **kwargs)
    device_eos = model.generate(ids, None, mask, max_new_tokens=12, eos_token_id=eos, **kwargs)
    if kwargs.get("do_sample"):  # a draw can only flip on a near tie: vanishingly rare
        np.testing.assert_array_equal(host, device)
        np.testing.assert_array_equal(host_eos, device_eos)
    else:
        agree(host, device, ref, (ids, mask, None))
        agree(host_eos, device_eos, ref, (ids, mask, None))
    assert host_eos.shape[1] <= ids.shape[1] + 6
