"""Floating point: bfloat16 is the default on GPU and TPU, float32 on CPU, decided in one place; plan and bench say
which precision ran; a bfloat16 model still normalises and takes its softmax in float32."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax import cli, kernels
from internvl_jax.demo import demo_config
from internvl_jax.model.attention import KeyMask
from internvl_jax.model.params import abstract_params, as_dtype, default_dtype, module_for


def test_default_dtype_follows_the_backend(monkeypatch):
    assert default_dtype("cpu") == "float32"
    assert default_dtype("gpu") == default_dtype("tpu") == "bfloat16"
    config = demo_config(image_token_id=5, vocab_size=64)
    assert as_dtype(None) == jnp.float32 and module_for(config).dtype == jnp.float32  # this machine: CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert module_for(config).dtype == module_for(config).param_dtype == jnp.bfloat16
    assert as_dtype("float32") == jnp.float32  # asked for: kept


@pytest.mark.parametrize("target, dtype, attention", [("cpu", "float32", "reference"), ("h200", "bfloat16", "cudnn")])
def test_plan_says_which_precision(target, dtype, attention, capsys):
    assert cli.main(["plan", "--preset", "1B", "--target", target, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == dtype
    assert report["precision"] == {"weights": dtype, "activations": dtype, "softmax": "float32", "norms": "float32",
                                   "matmul_precision": "highest", "attention": attention}  # conftest: highest
    assert cli.main(["plan", "--preset", "1B", "--target", target]) == 0
    assert f"precision: weights {dtype}, activations {dtype}, softmax float32, norms float32" in capsys.readouterr().out


def _equations(jaxpr):
    yield from jaxpr.eqns
    for sub in jax.extend.core.subjaxprs(jaxpr):
        yield from _equations(sub)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_bfloat16_model_normalises_and_softmaxes_in_float32(impl):
    """Every reduction, exp and rsqrt of a bfloat16 forward (vision tower, decoder, both norm kinds, attention)
    runs on float32 values: norms and softmax are computed in float32 whatever the weights."""
    config = demo_config(image_token_id=5, vocab_size=64)
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=56))
    module = module_for(config, "bfloat16")
    params = abstract_params(config, "bfloat16")
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    ids = jax.ShapeDtypeStruct((1, 12), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, 3, 56, 56), jnp.bfloat16)
    mask = KeyMask.uncached(jnp.ones((1, 12), bool))

    def forward(p, ids, pixels):
        return module.apply({"params": p}, ids, pixels, jnp.arange(12)[None], mask)[0]

    with kernels.use(impl):
        jaxpr = jax.make_jaxpr(forward)(params, ids, pixels).jaxpr
    ops = [e for e in _equations(jaxpr) if e.primitive.name in ("reduce_sum", "reduce_max", "exp", "rsqrt")]
    kinds = {e.primitive.name for e in ops}
    assert kinds == {"reduce_sum", "reduce_max", "exp", "rsqrt"}, kinds
    low = [(e.primitive.name, str(e.invars[0].aval)) for e in ops if e.invars[0].aval.dtype != np.float32]
    assert not low, low


@pytest.mark.parametrize("backend, f32_result", [("cpu", True), ("gpu", False)])
def test_bfloat16_dots_ask_for_a_float32_result_on_cpu(backend, f32_result):
    """On XLA:CPU a bfloat16 dot runs on the CPU's bfloat16 units (AMX) only when asked for a float32 result
    (`model.dot.contract`); it is rounded once, to the product of the float32 values within bfloat16's rounding."""
    from internvl_jax.model.dot import contract

    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((4, 64, 96), (96, 3, 8)))
    with kernels.use(backend=backend):
        lowered = jax.jit(contract).lower(x, w).as_text()
    dots = [line for line in lowered.splitlines() if "dot_general" in line]
    assert len(dots) == 1 and ("-> tensor<4x64x3x8xf32>" in dots[0]) == f32_result, dots
    y = contract(x, w)
    assert y.dtype == jnp.bfloat16 and y.shape == (4, 64, 3, 8)
    exact = np.tensordot(np.asarray(x, np.float32), np.asarray(w, np.float32), 1)
    np.testing.assert_allclose(np.asarray(y, np.float32), exact, rtol=2**-8, atol=1e-6)
    f32 = contract(x.astype(jnp.float32), w)  # float32 in: the plain dot, float32 out
    assert f32.dtype == jnp.float32
