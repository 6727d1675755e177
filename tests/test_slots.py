"""The slot engine (continuous batching): each request's tokens equal `generate` for it alone, whatever shares
the slots; chunked prefill; per-request sampling, stops and errors; no compilation after warm-up."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from internvl_jax import InternVL
from internvl_jax.engine.sampling import SamplingConfig
from internvl_jax.engine.slots import Request, SlotEngine
from tests import tiny_models as tm


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = tm.make(tmp_path_factory.mktemp("slots"), tm.hf_config(), seed=7)
    return InternVL.from_pretrained(path)


def requests(seed: int, n: int, **sampling) -> list[Request]:
    """Text prompts, one- and three-tile images and a four-frame 'video', 5-90 text tokens, 3-19 new tokens."""
    rng = np.random.default_rng(seed)
    per = tm.tokens_per_tile(tm.hf_config())
    out = []
    for i in range(n):
        images = [[], [1], [3], [], [1, 1, 1, 1], []][i % 6]
        ids = tm.prompt(rng, int(rng.integers(5, 90)), images, per)
        px = rng.standard_normal((sum(images), 3, 56, 56)).astype(np.float32) if images else None
        cfg = SamplingConfig(max_new_tokens=int(rng.integers(3, 20)), **sampling)
        out.append(Request(id=f"r{i}", ids=np.array(ids), pixels=px, sampling=cfg))
    return out


_ALONE: dict = {}


def alone(model: InternVL, r: Request) -> list[int]:
    """`generate` for the request by itself (cached: several tests ask for the same requests)."""
    key = (id(model), r.ids.tobytes(), None if r.pixels is None else r.pixels.tobytes(), r.sampling)
    if key not in _ALONE:
        _ALONE[key] = _alone(model, r)
    return _ALONE[key]


def _alone(model: InternVL, r: Request) -> list[int]:
    s = r.sampling
    out = model.generate(r.ids[None], r.pixels, max_new_tokens=s.max_new_tokens, do_sample=s.do_sample,
                         temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                         repetition_penalty=s.repetition_penalty, eos_token_id=list(s.eos_token_id) or None)
    tokens = [int(t) for t in out[0, len(r.ids):]]
    end = next((i for i, t in enumerate(tokens) if t in s.eos_token_id), None)
    return tokens if end is None else tokens[: end + 1]


def engine(model: InternVL, on_device: bool = False, **kw) -> SlotEngine:
    kw = {"slots": 3, "cache_len": 256, "chunk": 32} | kw
    eng = SlotEngine(model.module, model.params, **kw)
    if on_device:
        eng.host_layers = None  # the lax.while_loop program every backend but one CPU device runs
    return eng


@pytest.mark.parametrize("on_device", [False, True])
def test_greedy_tokens_equal_generate_alone(model, on_device):
    """7 requests through 3 slots (refilled as they end), prompts longer than the 32-token chunk."""
    reqs = requests(0, 7)
    reqs[0] = Request(id="r0", ids=reqs[0].ids, pixels=reqs[0].pixels, sampling=SamplingConfig(max_new_tokens=40))
    done = list(engine(model, on_device).run(reqs))
    assert sorted(c.id for c in done) == sorted(r.id for r in reqs)
    by_id = {c.id: c for c in done}
    for r in reqs:
        c = by_id[r.id]
        assert c.error is None and c.finish_reason == "length"
        assert list(c.tokens) == alone(model, r), r.id
    # Results come in completion order: the first request, 40 tokens long, ends after the second (<= 19).
    order = [c.id for c in done]
    assert order.index("r0") > order.index("r1"), order


def test_sampling_is_the_requests_own(model):
    """Each request samples with its own settings and seed: the same tokens as generate for it alone, and the
    same in another mix of neighbours."""
    settings = [dict(top_k=0, top_p=1.0), dict(top_k=50, top_p=0.9, repetition_penalty=1.3), dict(top_p=0.7)]
    reqs = [Request(id=r.id, ids=r.ids, pixels=r.pixels,
                    sampling=SamplingConfig(max_new_tokens=10, do_sample=True, temperature=0.8, seed=i,
                                            **settings[i % 3]))
            for i, r in enumerate(requests(1, 4))]  # each setting, one twice with another seed
    first = {c.id: c.tokens for c in engine(model).run(reqs)}
    greedy = [Request(id=f"g{i}", ids=r.ids, pixels=r.pixels, sampling=SamplingConfig(max_new_tokens=12))
              for i, r in enumerate(requests(2, 3))]
    # The same engine shape (no new programs to compile), other neighbours in other slots.
    mixed = {c.id: c.tokens for c in engine(model).run([greedy[0], *reqs[::-1], *greedy[1:]])}
    for r in reqs:
        assert list(first[r.id]) == alone(model, r), r.id
        assert mixed[r.id] == first[r.id], r.id


def test_stop_ids_and_bad_requests(model):
    """A request stops at its own EOS ids; bad requests fail alone with their id and a reason."""
    good = requests(3, 3)
    eos = alone(model, good[0])[2]
    stopping = Request(id="stops", ids=good[0].ids, sampling=SamplingConfig(max_new_tokens=19, eos_token_id=(eos,)),
                       pixels=good[0].pixels)
    long = Request(id="long", ids=np.zeros(256, np.int32), sampling=SamplingConfig(max_new_tokens=10))
    # A prompt that fits with less room than max_new_tokens: its answer ends where the cache row does.
    tight = Request(id="tight", ids=np.arange(250) % 1000, sampling=SamplingConfig(max_new_tokens=10))
    tiles = Request(id="tiles", ids=np.array(tm.prompt(np.random.default_rng(0), 5, [9], 4)),
                    pixels=np.zeros((9, 3, 56, 56), np.float32))
    bad_setting = Request(id="temp", ids=np.arange(5), sampling=SamplingConfig(do_sample=True, temperature=-1.0))
    no_pixels = Request(id="px", ids=np.array(tm.prompt(np.random.default_rng(0), 5, [1], 4)))
    done = {c.id: c for c in engine(model, max_tiles=8).run([long, *good, tiles, stopping, bad_setting, no_pixels,
                                                              tight])}
    assert "prompt of 256 tokens does not fit the 256 slots" in done["long"].error
    assert done["tight"].finish_reason == "cache" and list(done["tight"].tokens) == alone(model, tight)[:6]
    assert "9 tiles exceed the engine's limit of 8" in done["tiles"].error
    assert "temperature must be > 0" in done["temp"].error
    assert "no pixel values" in done["px"].error
    assert done["stops"].finish_reason == "eos" and done["stops"].tokens[-1] == eos
    assert list(done["stops"].tokens) == alone(model, good[0])[:3]
    for r in good:
        assert done[r.id].error is None and list(done[r.id].tokens) == alone(model, r)


def test_no_compilation_after_warm_up(model):
    compiles: list[str] = []

    def listener(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    eng = engine(model)
    list(eng.run(requests(4, 6)))
    warm = len(compiles)
    second = list(eng.run(requests(5, 6)))  # other prompts and lengths, the same kinds of work
    assert len(compiles) == warm, f"{len(compiles) - warm} compilations after warm-up"
    assert eng.stats.slot_steps == sum(len(c.tokens) for c in second), eng.stats  # the second run's alone


MESH_REQUESTS = (0, 5)  # requests(seed, n) of test_on_a_mesh


def test_on_a_mesh(model, tmp_path):
    """Slots split over `data` on 8 virtual CPU devices: the same tokens as generate on one device (computed
    here, where the other tests computed most of them already: the worker only runs the engine)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out, expected = tmp_path / "report.json", tmp_path / "alone.json"
    expected.write_text(json.dumps({r.id: alone(model, r) for r in requests(*MESH_REQUESTS)}))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "tests.slots_mesh_worker", str(out), str(expected)], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == [] and all(report["same"].values()), report
    assert report["cache_spec"] == "P(None, 'data')", report  # [layers, rows, ...]: rows over data


def test_prefill_pieces_pad_less_than_one_bucket(model):
    """A prompt shorter than the chunk is prefilled in row-length pieces that pad less than the one bucket above
    it (300 tokens: 256 + 44 in a 64-token row, 20 padded, not 212), and the pieces cover it exactly."""
    eng = engine(model, chunk=512)
    assert eng.lengths == [64, 128, 256, 512]
    for n in range(1, 512):
        pieces, left = [], n
        while left:
            take, length = eng._piece(left)
            assert take <= length and length in eng.lengths
            pieces.append((take, length))
            left -= take
        padded = sum(length for _, length in pieces)
        one = next(L for L in eng.lengths if L >= n)
        assert padded <= one and (padded < one or len(pieces) == 1), (n, pieces)
        if n == 300:
            assert pieces == [(256, 256), (44, 64)]


def test_a_long_prompt_alternates_with_decode_calls(model):
    """A prompt of 12 chunks is prefilled `ADMIT_UNITS` chunks between two decode calls: the request decoding
    beside it finishes its 16 tokens before the long one's first token; the counts add up."""
    from internvl_jax.engine.slots import ADMIT_UNITS

    rng = np.random.default_rng(3)
    short = Request(id="short", ids=np.array(tm.prompt(rng, 10, [], 0)), sampling=SamplingConfig(max_new_tokens=16))
    long = Request(id="long", ids=np.array(tm.prompt(rng, 12 * 32, [], 0)), sampling=SamplingConfig(max_new_tokens=4))
    eng = engine(model, cache_len=512, decode_steps=8)
    done = {c.id: c for c in eng.run([short, long])}
    assert done["short"].seconds < done["long"].first_token_s, done
    assert list(done["long"].tokens) == alone(model, long)
    st = eng.stats
    assert st.prefill_calls >= 12 // ADMIT_UNITS and st.slot_steps == 16 + 4, st
