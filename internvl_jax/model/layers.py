"""Small building blocks shared by the vision tower, the projector and the decoder.

Every parameter is declared here or in the modules through `weight()`, which attaches logical axis names
(`nn.with_logical_partitioning`). Shapes and axes therefore live in exactly one place, the module that uses
the weight; the checkpoint mapping (`internvl_jax.weights`) and the sharding rules (`internvl_jax.sharding`)
read them from the abstract parameter tree (`jax.eval_shape` of `init`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from internvl_jax import quant
from internvl_jax.model.dot import contract

Initializer = Callable[..., jax.Array]

# The variable collection the modules `sow` their stage outputs into (vision embeddings and layers, projector,
# decoder input, layers and final norm). Nothing is kept unless `apply(..., mutable=[HIDDEN])` asks for it.
HIDDEN = "intermediates"


def weight(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None],
           init: Initializer | None = None, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Declare a parameter with its shape and logical axes; random init is only for tests and presets."""
    assert len(shape) == len(axes), (name, shape, axes)
    init = init or nn.initializers.normal(0.02)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def quantized_weight(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None],
                     contract: Sequence[int], scheme: str, scale_dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """A weight stored quantized (`internvl_jax.quant`): its integer values under `name` and their scale, with the
    weight's logical axes, under `name + quant.SCALE`. `contract`: the axes a dot with it reduces over. Values are
    zeros at init: quantized weights come from float ones (`quant.quantize_tree`), never from a random init."""
    values = weight(module, name, shape, axes, nn.initializers.zeros, quant.storage_dtype(scheme))
    sshape = quant.scale_shape(shape, contract, scheme, f"{module.name}/{name}")
    return values, weight(module, name + quant.SCALE, sshape, axes, nn.initializers.ones, scale_dtype)


def gelu_erf(x: jax.Array) -> jax.Array:
    """The exact GELU as torch computes it, x/2 (1 + erf(x / sqrt 2)). jax.nn.gelu(approximate=False) goes through
    erfc, which XLA:CPU evaluates 2.5-4x slower (`benchmarks/cpu_micro.py`); both are within 1.5e-6 of torch's."""
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


# transformers' ACT2FN names that configs may use. Plain "gelu" is the exact erf form; "gelu_pytorch_tanh" and
# "gelu_new" the tanh one. The config parser refuses any other name.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """T5/Qwen2 RMSNorm: normalise in float32, cast back, then scale (the order torch uses)."""

    eps: float
    axis_name: str = "embed"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = weight(self, "scale", (x.shape[-1],), (self.axis_name,), nn.initializers.ones, self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * xf.astype(x.dtype)


class LayerNorm(nn.Module):
    eps: float
    axis_name: str = "embed"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = weight(self, "scale", (d,), (self.axis_name,), nn.initializers.ones, self.param_dtype)
        bias = weight(self, "bias", (d,), (self.axis_name,), nn.initializers.zeros, self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(x.dtype)


def norm(kind: str, eps: float, axis_name: str, param_dtype: jnp.dtype, name: str) -> nn.Module:
    if kind == "rms_norm":
        return RMSNorm(eps, axis_name, param_dtype, name=name)
    return LayerNorm(eps, axis_name, param_dtype, name=name)


class Dense(nn.Module):
    """x @ kernel (+ bias) with the kernel stored [in..., out...] and named axes on both sides."""

    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axes of the kernel: input axes then output axes
    use_bias: bool = True
    n_in: int = 1  # how many trailing dims of x are contracted
    param_dtype: jnp.dtype = jnp.float32
    quant: str = ""  # "int8" / "int4": the kernel is stored quantized (`quantized_weight`)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.n_in:]
        shape = (*in_shape, *self.out_shape)
        if self.quant:
            q, scale = quantized_weight(self, "kernel", shape, self.axes, range(self.n_in), self.quant,
                                        self.param_dtype)
            y = quant.dot(x, q, scale, self.n_in)
        else:
            kernel = weight(self, "kernel", shape, self.axes, dtype=self.param_dtype)
            y = contract(x, kernel, self.n_in)
        if self.use_bias:
            bias = weight(self, "bias", self.out_shape, self.axes[self.n_in:], nn.initializers.zeros,
                          self.param_dtype)
            y = y + bias.astype(x.dtype)
        return y
