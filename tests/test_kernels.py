"""The attention kernels behind `model.attention` against the reference paths, in float32 at full precision.

What can run here runs: `jax.nn.dot_product_attention(implementation="xla")` and the Pallas TPU flash attention in
interpret mode. Each TPU kernel is also compiled for a TPU topology (compile only; skipped without libtpu).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax import compiled, kernels
from internvl_jax.model.attention import CachedKeys, KeyMask, attention, einsum_softmax, full_attention, reference

TOL = dict(atol=1e-5, rtol=1e-5)


def decoder_arrays(rng, b, t, kh, g, h):
    q = rng.standard_normal((b, t, kh, g, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, t, kh, h)).astype(np.float32) for _ in range(2))
    return q, k, v


def left_padded(b, t):
    valid = np.ones((b, t), bool)
    if b > 1:
        valid[1, : t // 3] = False  # left padding
    if b > 2:
        valid[2, : t - 1] = False  # only the last token is real
    return valid


def uncached_case(impl, b, t, kh, g, h, seed=0):
    """Ours through `impl` and the einsum reference, on the real (not padded) queries."""
    q, k, v = decoder_arrays(np.random.default_rng(seed), b, t, kh, g, h)
    valid = left_padded(b, t)
    with jax.default_matmul_precision("highest"):
        with kernels.use(impl):
            ours = np.asarray(jax.jit(attention)(q, k, v, KeyMask.uncached(jnp.asarray(valid))))
        visible = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
        want = np.asarray(reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(visible)))
    assert np.isfinite(ours).all()
    return ours[valid], want[valid]


@pytest.mark.parametrize("b, t, kh, g, h", [(3, 37, 2, 3, 8), (1, 1025, 1, 2, 64)])
def test_xla_matches_reference_with_left_padding_and_groups(b, t, kh, g, h):
    np.testing.assert_allclose(*uncached_case("xla", b, t, kh, g, h), **TOL)


@pytest.mark.parametrize("b, t, kh, g, h", [(3, 37, 2, 3, 8), (1, 1025, 1, 2, 64)])
def test_pallas_flash_interpreted_matches_reference(b, t, kh, g, h):
    """37 tokens: padded to one 128-token block; 1025: to 9 blocks, the causal kernel skipping those above the
    diagonal."""
    np.testing.assert_allclose(*uncached_case("pallas", b, t, kh, g, h), **TOL)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_cached_prefix_and_decode_step(impl):
    """A decode step (t = 1: the Pallas decode kernel, 128-slot blocks) and a prefill chunk (t = 5: "pallas" runs
    the blockwise path) over each row's own cache row below its own start, with left padding in the cache and
    a padding query row. For "pallas" the blocks past the longest row hold NaN: never read (the xla form reads
    every slot, so it gets finite values there)."""
    rng = np.random.default_rng(3)
    b, s, kh, g, h = 3, 512, 2, 3, 8
    ck, cv = (rng.standard_normal((2, b + 1, s, kh, h)).astype(np.float32) for _ in range(2))
    start = np.array([300, 3, 0], np.int32)
    cached = np.arange(s)[None] < start[:, None]
    cached[0, :4] = False
    rows = np.array([2, 0, 3])
    clean = (ck.copy(), cv.copy())
    if impl == "pallas":
        for a in (ck, cv):
            a[:, :, 384:] = np.nan
    for t in (1, 5):
        q, k, v = decoder_arrays(rng, b, t, kh, g, h)
        new = np.ones((b, t), bool)
        new[2, 0] = False  # row 2: an empty cache and its first token padding (a finite, unused output)
        mask = KeyMask(jnp.asarray(start), jnp.asarray(cached), jnp.asarray(new))
        keys = CachedKeys(jnp.asarray(ck), jnp.asarray(cv), jnp.int32(1), jnp.asarray(rows))
        with jax.default_matmul_precision("highest"):
            with kernels.use(impl):
                ours = np.asarray(jax.jit(attention, static_argnames="block")(q, k, v, mask, keys, block=128))
            visible = np.concatenate([np.broadcast_to(cached[:, None], (b, t, s)),
                                      np.tril(np.ones((t, t), bool))[None] & new[:, None, :]], axis=2)
            want = reference(jnp.asarray(q), jnp.asarray(np.concatenate([clean[0][1, rows], k], axis=1)),
                             jnp.asarray(np.concatenate([clean[1][1, rows], v], axis=1)), jnp.asarray(visible))
        real = visible.any(axis=2)
        assert np.isfinite(ours).all()
        np.testing.assert_allclose(ours[real], np.asarray(want)[real], **TOL)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_an_int8_cache_is_read_scaled_whatever_the_kernel(impl):
    """An int8 KV cache (values + one scale per token and head, issue 15) gives the reference's output under any
    kernel choice: the kernels read keys as stored, so such a cache takes the blockwise path."""
    rng = np.random.default_rng(4)
    b, s, kh, g, h = 2, 256, 2, 2, 8
    ck, cv = (rng.integers(-127, 128, (2, b, s, kh, h)).astype(np.int8) for _ in range(2))
    sk, sv = (rng.uniform(0.01, 0.02, (2, b, s, kh, 1)).astype(np.float32) for _ in range(2))
    start = np.array([200, 17], np.int32)
    mask = KeyMask(jnp.asarray(start), jnp.asarray(np.arange(s)[None] < start[:, None]), jnp.ones((b, 1), bool))
    keys = CachedKeys(jnp.asarray(ck), jnp.asarray(cv), jnp.int32(1), None, jnp.asarray(sk), jnp.asarray(sv))
    q, k, v = decoder_arrays(rng, b, 1, kh, g, h)
    out = {}
    with jax.default_matmul_precision("highest"):
        for name in ("reference", impl):
            with kernels.use(name):
                out[name] = np.asarray(jax.jit(attention, static_argnames="block")(q, k, v, mask, keys, block=128))
    np.testing.assert_allclose(out[impl], out["reference"], **TOL)


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
@pytest.mark.parametrize("n, s, heads, h", [(2, 40, 25, 8), (1, 1025, 1, 64), (3, 1025, 4, 16)])
def test_vision_attention_matches_einsum_softmax(impl, n, s, heads, h):
    """The vision tower's unmasked form: the 6B tower's 25 heads (fewer tokens), and 1025 tokens (a 448px tile's
    1024 patches + CLS, not a multiple of 128). "reference" on this CPU is `head_by_head`, the loop over heads."""
    rng = np.random.default_rng(s)
    q, k, v = (rng.standard_normal((n, s, heads, h)).astype(np.float32) for _ in range(3))
    with jax.default_matmul_precision("highest"):
        with kernels.use(impl):
            ours = jax.jit(full_attention)(q, k, v)
        want = einsum_softmax(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(want), **TOL)


def test_dispatch_per_backend_and_override(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert kernels.choose(f32, 64) == "reference"  # this machine: CPU
    with kernels.use(backend="tpu"):
        assert kernels.choose(bf16, 64) == kernels.choose(bf16, 64, decode=True) == "pallas"
        with monkeypatch.context() as m:
            m.setattr(jax, "device_count", lambda: 8)
            assert kernels.choose(bf16, 64) == "reference"  # a Pallas call cannot be partitioned over a mesh
    with kernels.use(backend="gpu"):  # choosing for an NVIDIA GPU from here (a plan): cuDNN where it fits
        assert kernels.choose(bf16, 64) == kernels.choose(bf16, 128) == "cudnn"
        assert kernels.choose(bf16, 12) == "xla"  # not a multiple of 8
        assert kernels.choose(bf16, 256) == "xla"  # more than 128
        assert kernels.choose(f32, 64) == "xla"  # cuDNN's flash attention is 16-bit only
        assert kernels.choose(bf16, 64, decode=True) == "reference"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # on a GPU: its platform decides
    for platform, impl in (("cuda 12090", "cudnn"), ("rocm 60342", "xla")):
        monkeypatch.setattr("internvl_jax.kernels.xla.jax.devices", lambda p=platform: [_FakeGpu(p)])
        assert kernels.choose(bf16, 64) == impl
    monkeypatch.undo()
    monkeypatch.setenv(kernels.ENV, "xla")
    assert kernels.choose(f32, 64) == "xla"
    assert kernels.choose(f32, 64, decode=True) == "xla"  # an override holds for every call
    with kernels.use("pallas"):  # the context manager wins over the environment
        assert kernels.choose(f32, 64) == "pallas"
    monkeypatch.setenv(kernels.ENV, "flash")
    with pytest.raises(ValueError, match=f"{kernels.ENV}='flash'"):
        kernels.choose(f32, 64)


class _FakeGpu:
    def __init__(self, platform: str):
        self.client = type("Client", (), {"platform_version": f"PJRT C API\n{platform}"})()


def test_dispatch_reaches_the_kernel(monkeypatch):
    """The choice is what runs: the traced program of each implementation differs as it should."""
    q, k, v = (jnp.ones((1, 8, 2, 2, 8)), jnp.ones((1, 8, 2, 8)), jnp.ones((1, 8, 2, 8)))
    mask = KeyMask.uncached(jnp.ones((1, 8), bool))
    programs = {}
    for impl in ("reference", "xla", "pallas"):
        with kernels.use(impl):
            programs[impl] = str(jax.make_jaxpr(attention)(q, k, v, mask))
    assert "scan" in programs["reference"] and "pallas_call" not in programs["reference"]
    assert "dot_general" in programs["xla"] and "scan" not in programs["xla"]
    assert "pallas_call" in programs["pallas"]
    cache = jnp.ones((2, 1, 128, 2, 8))
    step = KeyMask(jnp.array([5]), jnp.ones((1, 128), bool), jnp.ones((1, 1), bool))
    with kernels.use("pallas"):  # a decode step: the decode kernel, not the blockwise loop
        program = str(jax.make_jaxpr(attention)(q[:, :1], k[:, :1], v[:, :1], step,
                                                CachedKeys(cache, cache, jnp.int32(1), None)))
    assert "pallas_call" in program and "while" not in program


needs_libtpu = pytest.mark.skipif(not compiled.has_libtpu(), reason=f"needs libtpu ({compiled.TPU_EXTRA})")


@needs_libtpu
@pytest.mark.parametrize("kh, g, h", [(2, 7, 64), (8, 4, 128)])
def test_pallas_decode_compiles_for_tpu(kh, g, h):
    """The decode kernel lowered by Mosaic for a v5e chip: InternVL3-1B's (2 KV heads x 7, head_dim 64) and 8B's
    (8 x 4, 128) heads, 8 rows of a 2048-slot bfloat16 cache, 4 layers; no temporary copy of the cache."""
    from jax.sharding import NamedSharding, PartitionSpec

    from internvl_jax.kernels.pallas_tpu import decode

    device = compiled.tpu_devices("v5e:2x2")[0]
    one = NamedSharding(jax.sharding.Mesh(np.array([device]), ("x",)), PartitionSpec())
    b, s, layers = 8, 2048, 4
    sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)  # noqa: E731
    args = [sd((b, kh, g, h), jnp.bfloat16), sd((b, kh, h), jnp.bfloat16), sd((b, kh, h), jnp.bfloat16),
            sd((b,), jnp.bool_), sd((layers, b, s, kh, h), jnp.bfloat16), sd((layers, b, s, kh, h), jnp.bfloat16),
            sd((), jnp.int32), sd((b,), jnp.int32), sd((b,), jnp.int32), sd((b, s), jnp.bool_)]
    with jax.default_matmul_precision("default"):
        program = jax.jit(functools.partial(decode, interpret=False)).lower(*args).compile()
    assert "tpu_custom_call" in program.as_text()
    cache = 2 * layers * b * s * kh * h * 2
    assert program.memory_analysis().temp_size_in_bytes < cache / 100, program.memory_analysis()


@needs_libtpu
@pytest.mark.parametrize("what", ["prefill", "vision"])
def test_pallas_flash_compiles_for_tpu(what):
    """The kernels lowered by Mosaic for a v5e chip (compile only): InternVL3-1B's prefill (14 heads, 2 KV heads,
    head_dim 64, left padding) and the 6B vision tower's 25 heads x 128 at 1025 tokens, bfloat16."""
    from jax.sharding import NamedSharding, PartitionSpec

    from internvl_jax.kernels.pallas_tpu import flash

    device = compiled.tpu_devices("v5e:2x2")[0]
    one = NamedSharding(jax.sharding.Mesh(np.array([device]), ("x",)), PartitionSpec())
    if what == "prefill":
        b, t, n, kv, h = 2, 1000, 14, 2, 64
        args = [jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16, sharding=one),
                *(jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16, sharding=one) for _ in range(2)),
                jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=one)]
        fn = lambda q, k, v, valid: flash(q, k, v, valid, causal=True, interpret=False)  # noqa: E731
    else:
        args = [jax.ShapeDtypeStruct((4, 1025, 25, 128), jnp.bfloat16, sharding=one) for _ in range(3)]
        fn = lambda q, k, v: flash(q, k, v, None, causal=False, interpret=False)  # noqa: E731
    with jax.default_matmul_precision("default"):  # conftest's "highest" asks Mosaic for fp32 passes on bf16
        program = jax.jit(fn).lower(*args).compile()
    assert "tpu_custom_call" in program.as_text()
    assert program.memory_analysis().output_size_in_bytes >= 2 * np.prod(args[0].shape)  # TPU tiles pad it


def tiny_model(scale: float = 0.2, offset: float = 0.1):
    from internvl_jax.demo import demo_config
    from internvl_jax.modeling import InternVL

    config = demo_config(image_token_id=5, vocab_size=64)
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=56))  # 4 tokens
    rng = np.random.default_rng(0)
    # numpy's random weights: random_params' jitted init takes ~15 s to compile here
    params = jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(np.float32) + offset,
                          InternVL.abstract_params(config))
    model = InternVL(config, params)
    ids = np.concatenate([rng.integers(10, 64, (2, 3)), np.full((2, 4), 5), rng.integers(10, 64, (2, 4))], 1)
    mask = np.ones(ids.shape, np.int32)
    mask[1, :2] = 0  # left padding
    pixels = rng.standard_normal((2, 3, 56, 56)).astype(np.float32)
    return model, ids, mask, pixels


def test_tiny_model_same_logits_through_xla():
    """End to end: the tiny model's forward (vision tower and decoder, left padding) through
    `jax.nn.dot_product_attention` against the reference paths. (The cache's path: test_cached_prefix_and_decode_step.)
    """
    model, ids, mask, pixels = tiny_model()
    out = {}
    for impl in ("reference", "xla"):
        with kernels.use(impl):
            out[impl] = np.asarray(model(ids, pixels, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(out["xla"][real], out["reference"][real], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # ~1 minute: generation compiled three times, Pallas interpreted
def test_tiny_model_generates_the_same_tokens_through_each_kernel():
    """Greedy tokens of `generate` (static batch, left padding; its cache is no multiple of 128 slots, so "pallas"
    decodes blockwise) and of the slot engine (512 slots: the Pallas decode kernel, seen traced) through "xla" and
    "pallas" equal the reference's."""
    model, ids, mask, pixels = tiny_model(0.3, 0.02)  # varied tokens (larger biases repeat one token)
    out = {}
    for impl in ("reference", "xla", "pallas"):
        with kernels.use(impl):
            out[impl] = (model.generate(ids, pixels, mask, max_new_tokens=6, do_sample=False),
                         model.generate_many([{"input_ids": ids[0], "pixel_values": pixels[:1]}], slots=2,
                                             cache_len=128, max_new_tokens=6, do_sample=False)[0])
    assert len(set(out["reference"][0][1, -6:].tolist())) > 1
    for impl in ("xla", "pallas"):
        np.testing.assert_array_equal(out[impl][0], out["reference"][0])
        np.testing.assert_array_equal(out[impl][1], out["reference"][1])


def test_bad_override_is_one_named_line(monkeypatch, capsys):
    from internvl_jax import cli

    monkeypatch.setenv(kernels.ENV, "flash")
    assert cli.main(["plan", "--preset", "1B"]) == 2  # plan says which attention would run: it asks
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{kernels.ENV}='flash'" in err[0] and "reference, xla, cudnn, pallas" in err[0], err
