"""Pixel shuffle and the MLP projector from vision width to text width."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from internvl_jax.config import InternVLConfig
from internvl_jax.model.layers import Dense, LayerNorm, activation


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """[n, g, g, c] -> [n, g/r, g/r, c*r*r], in transformers' (and InternVL's ps_version v2) channel order.

    transformers names the first grid axis "width" and the second "height"; what matters is the exact
    sequence of reshapes and transposes, which this reproduces.
    """
    n, a, b, c = x.shape
    x = x.reshape(n, a, b // r, c * r)
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(n, b // r, a // r, c * r * r)
    return x.transpose(0, 2, 1, 3)


class Projector(nn.Module):
    """LayerNorm (eps 1e-5, torch's default: the vision norms use 1e-6) -> Linear -> GELU -> Linear."""

    cfg: InternVLConfig
    param_dtype: jnp.dtype
    quant: str = ""

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        c, pd, qz = self.cfg, self.param_dtype, self.quant
        y = LayerNorm(1e-5, "proj_in", pd, name="norm")(features)
        y = Dense((c.text.hidden_size,), ("proj_in", "embed"), True, param_dtype=pd, quant=qz, name="fc1")(y)
        y = activation(c.projector_hidden_act)(y)
        return Dense((c.text.hidden_size,), ("proj_hidden", "embed"), True, param_dtype=pd, quant=qz,
                     name="fc2")(y)


def tokens_from_patches(hidden: jax.Array, cfg: InternVLConfig) -> jax.Array:
    """Vision hidden states [n, 1 + g*g, d] -> [n, (g/r)^2, d*r*r], dropping CLS ('default' strategy)."""
    n, s, d = hidden.shape
    g = round((s - 1) ** 0.5)
    grid = hidden[:, 1:].reshape(n, g, g, d)
    out = pixel_shuffle(grid, cfg.shuffle)
    return out.reshape(n, -1, out.shape[-1])
