"""The blockwise attention (`model.attention`) against the plain einsum + softmax, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax.model import attention as attention_module
from internvl_jax.model.attention import CachedKeys, KeyMask, attention, loops_over_heads, reference


@pytest.fixture
def head_loop_from(request, monkeypatch):
    """The two forms of a key block's update on the CPU backend: one head at a time from `request.param` queries a
    tile on (1: always) and all heads at once (10**9: never one head at a time)."""
    monkeypatch.setattr(attention_module, "HEAD_LOOP_QUERIES", request.param)
    assert loops_over_heads(1) == (request.param == 1)
    return request.param


def arrays(rng, b, t, s, kh=2, g=3, h=8):
    q = rng.standard_normal((b, t, kh, g, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, t, kh, h)).astype(np.float32) for _ in range(2))
    ck, cv = (rng.standard_normal((2, b + 1, s, kh, h)).astype(np.float32) for _ in range(2))
    return q, k, v, ck, cv


@pytest.mark.parametrize("t, block", [(1, 16), (37, 16), (64, 16), (1025, 128)])
def test_uncached_matches_reference_with_left_padding(t, block):
    # t=1025 with 128-query tiles runs one head at a time on the CPU backend, the others all heads at once
    """Causal + padding over the call's own keys, t not a multiple of the block (1025: a vision-length run)."""
    rng = np.random.default_rng(t)
    q, k, v, _, _ = arrays(rng, 3, t, 16)
    valid = np.ones((3, t), bool)
    valid[1, : t // 3] = False  # left padding
    valid[2, : t - 1] = False  # only the last token is real
    with jax.default_matmul_precision("highest"):
        ours = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), KeyMask.uncached(jnp.asarray(valid)),
                         block=block)
        visible = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
        theirs = reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(visible))
    real = valid  # padded queries see nothing; their output is unused (only required to be finite)
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(theirs)[real], atol=1e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(ours)).all()


@pytest.mark.parametrize("rows", [None, [2, 0]])
@pytest.mark.parametrize("head_loop_from", [1, 10**9], indirect=True, ids=["head-by-head", "all-heads"])
def test_cached_rows_with_their_own_lengths(rows, head_loop_from):
    """Each row reads its own cache row below its own start (a prefill chunk or a decode step of the slot
    engine), plus its new keys causally; blocks past the longest start are never read: they hold NaN here,
    which would poison every output they touched."""
    rng = np.random.default_rng(1)
    b, t, s, block = 2, 5, 64, 16
    q, k, v, ck, cv = arrays(rng, b, t, s)
    start = np.array([21, 3], np.int32)
    cached = np.arange(s)[None] < start[:, None]
    cached[0, :4] = False  # left padding in the cache (generate's layout)
    src = np.arange(b) if rows is None else np.array(rows)
    for a in (ck, cv):
        a[:, :, -(-start.max() // block) * block:] = np.nan
    layer = 1
    mask = KeyMask(jnp.asarray(start), jnp.asarray(cached), jnp.ones((b, t), bool))
    with jax.default_matmul_precision("highest"):
        ours = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask,
                         CachedKeys(jnp.asarray(ck), jnp.asarray(cv), jnp.int32(layer),
                                    None if rows is None else jnp.asarray(src)), block=block)
        keys = np.concatenate([np.nan_to_num(ck[layer, src]), k], axis=1)
        values = np.concatenate([np.nan_to_num(cv[layer, src]), v], axis=1)
        visible = np.concatenate([np.broadcast_to(cached[:, None], (b, t, s)),
                                  np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))], axis=2)
        theirs = reference(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values), jnp.asarray(visible))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_loop_from", [1, 10**9], indirect=True, ids=["head-by-head", "all-heads"])
def test_gradients_match_reference(head_loop_from):
    """The forward without a cache stays differentiable (model.loss): same gradients as the einsum form."""
    rng = np.random.default_rng(2)
    t = 40
    q, k, v, _, _ = arrays(rng, 1, t, 16)
    valid = np.ones((1, t), bool)
    visible = jnp.asarray(np.tril(np.ones((t, t), bool))[None])

    def ours(q, k, v):
        return jnp.sum(jnp.sin(attention(q, k, v, KeyMask.uncached(jnp.asarray(valid)), block=16)))

    def theirs(q, k, v):
        return jnp.sum(jnp.sin(reference(q, k, v, visible)))

    with jax.default_matmul_precision("highest"):
        got = jax.grad(ours, argnums=(0, 1, 2))(*map(jnp.asarray, (q, k, v)))
        want = jax.grad(theirs, argnums=(0, 1, 2))(*map(jnp.asarray, (q, k, v)))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
