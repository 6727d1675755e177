"""The parameter tree of a config, without a checkpoint: abstract shapes (nothing allocated) or random values.

Everything that needs shapes, dtypes or logical axes of the parameters (the loader's checks, the shardings,
the memory planner, the converter, export, benchmarks) reads them from here, i.e. from the modules' own
declarations, never from a model object.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from internvl_jax import quant as quantization
from internvl_jax.config import InternVLConfig
from internvl_jax.model.internvl import InternVLModule

Params = dict[str, Any]
DTypeLike = str | jnp.dtype | type
PARAM_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_dtype(backend: str | None = None) -> str:
    """The dtype of weights and activations when none is asked for (the one place it is decided): bfloat16 on GPU
    and TPU, with softmax and norms in float32 (`model.layers`, `model.attention`); float32 on CPU, where XLA's
    bfloat16 matmuls run ~9x slower. `backend`: jax's default backend when None (plan: the target's)."""
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def precision(dtype: DTypeLike | None = None, backend: str | None = None) -> dict[str, str]:
    """What a program computes in, for reports (`plan`, `bench`): weights and activations in `dtype` (None: the
    backend's default), softmax and norms always float32, jax's matmul precision setting, the prefill attention."""
    from internvl_jax import kernels

    d = as_dtype(dtype if dtype is not None else default_dtype(backend))
    with kernels.use(backend=backend):
        attention = kernels.choose(d, 128)  # every InternVL3 text head_dim is 64 or 128: the same choice
    return {"weights": d.name, "activations": d.name, "softmax": "float32", "norms": "float32",
            "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"), "attention": attention}


def precision_line(p: dict[str, str]) -> str:
    return (f"precision: weights {p['weights']}, activations {p['activations']}, softmax {p['softmax']}, norms "
            f"{p['norms']}, matmul precision {p['matmul_precision']}, attention {p['attention']}")


def as_dtype(dtype: DTypeLike | None) -> jnp.dtype:
    """A parameter dtype, checked: float32, bfloat16 or float16; None: the backend's (`default_dtype`)."""
    if dtype is None:
        dtype = default_dtype()
    try:
        d = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype {dtype!r} is not a dtype name (float32, bfloat16, float16)") from e
    if d not in PARAM_DTYPES:
        # int8 / int4 weights are a storage choice, not a compute dtype: `quantize` keeps the compute in float.
        stored = d.name in quantization.SCHEMES
        hint = f"; for {d.name} weights pass quantize={d.name!r} (--quantize {d.name})" if stored else ""
        raise ValueError(f"dtype {dtype!r}: parameters must be float32, bfloat16 or float16{hint}")
    return d


def module_for(config: InternVLConfig, dtype: DTypeLike | None = None, quant: str | None = None,
               kv_cache: str | None = None) -> InternVLModule:
    """The linen module computing (and holding parameters) in `dtype`; `quant`: its weights stored "int8" or
    "int4" (`internvl_jax.quant`); `kv_cache`: "int8" for an int8 KV cache."""
    d = as_dtype(dtype)
    return InternVLModule(config, d, d, quantization.check_scheme(quant), check_kv_cache(kv_cache))


KV_CACHE_DTYPES = ("auto", "int8")


def check_kv_cache(kv_cache: str | None) -> str:
    """'' (the compute dtype) or 'int8'; anything else refused by name."""
    if kv_cache in (None, "", "auto"):
        return ""
    if kv_cache != "int8":
        raise ValueError(f"kv_cache_dtype {kv_cache!r}: one of {', '.join(KV_CACHE_DTYPES)}")
    return kv_cache


def _init(module: InternVLModule, key: jax.Array) -> Params:
    """Every parameter, boxed with its logical axes (smallest inputs that touch them all)."""
    v = module.cfg.vision
    ids = jnp.zeros((1, 4), jnp.int32)
    pixels = jnp.zeros((1, v.num_channels, v.image_size, v.image_size), module.param_dtype)
    positions = jnp.zeros((1, 4), jnp.int32)
    mask = jnp.ones((1, 4), bool)
    return module.init(key, ids, pixels, positions, mask, method=InternVLModule.init_all)["params"]


def abstract_params(config: InternVLConfig, dtype: DTypeLike | None = None, boxed: bool = False,
                    quant: str | None = None) -> Params:
    """Parameter tree of ShapeDtypeStructs (no allocation). `boxed` keeps the logical-axis metadata; `quant`: the
    tree of weights stored quantized (each quantized `p` with its scale at `p + quant.SCALE`)."""
    tree = jax.eval_shape(lambda: _init(module_for(config, dtype, quant), jax.random.PRNGKey(0)))
    return tree if boxed else nn.unbox(tree)


def random_params(config: InternVLConfig, dtype: DTypeLike | None = None, seed: int = 0, quant: str | None = None
                  ) -> Params:
    """Random weights of the configured shape (tests, benchmarks, family presets, the demo checkpoint); with
    `quant`, the same float weights quantized."""
    module = module_for(config, dtype)
    params = jax.jit(lambda key: nn.unbox(_init(module, key)))(jax.random.PRNGKey(seed))
    return quantize_params(config, params, dtype, quant) if quantization.check_scheme(quant) else params


def quantize_params(config: InternVLConfig, params: Params, dtype: DTypeLike, quant: str) -> Params:
    """Float parameters -> the quantized tree of `abstract_params(config, dtype, quant=quant)`."""
    from internvl_jax.weights import flatten_paths, unflatten_paths  # weights imports nothing of the model

    target = flatten_paths(abstract_params(config, dtype, quant=quant))
    return unflatten_paths(quantization.quantize_tree(flatten_paths(params), target))
