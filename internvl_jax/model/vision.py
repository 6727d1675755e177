"""InternViT: the vision encoder (300M and 6B variants share this code).

Dimension names in einsum strings: n tiles, s patches (+CLS), d width, h heads, k head_dim, f MLP width,
c channels, p/q pixels inside a patch, y/x patch grid.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import VisionConfig
from internvl_jax.model.attention import full_attention
from internvl_jax.model.layers import HIDDEN, Dense, LayerNorm, RMSNorm, activation, norm, weight
from internvl_jax.rules import constrain


@functools.lru_cache(maxsize=32)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bicubic resize (align_corners=False, A=-0.75, edge clamped taps).

    jax.image.resize uses Keys' A=-0.5 and antialiasing, which is not what transformers' position-embedding
    interpolation does; this reproduces torch.nn.functional.interpolate(mode="bicubic") exactly.
    """
    a = -0.75
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = scale * (i + 0.5) - 0.5
        lo = int(np.floor(src))
        t = src - lo
        taps = (
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        )
        for j, c in enumerate(taps):
            w[i, min(max(lo - 1 + j, 0), n_in - 1)] += c
    return w.astype(np.float32)


class VisionEmbeddings(nn.Module):
    cfg: VisionConfig
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.cfg
        n, ch, height, width = pixels.shape
        p, d = c.patch_size, c.hidden_size
        # A stride-p convolution with a p x p kernel is a matmul over non-overlapping patches.
        kernel = weight(self, "patch_kernel", (ch, p, p, d), (None, None, None, "vis_embed"), dtype=self.param_dtype)
        bias = weight(self, "patch_bias", (d,), ("vis_embed",), nn.initializers.zeros, self.param_dtype)
        cls = weight(self, "cls_token", (d,), ("vis_embed",), nn.initializers.zeros, self.param_dtype)
        pos = weight(self, "position_embedding", (c.grid * c.grid + 1, d), (None, "vis_embed"),
                     dtype=self.param_dtype)
        gy, gx = height // p, width // p
        patches = pixels.reshape(n, ch, gy, p, gx, p)
        x = jnp.einsum("ncypxq,cpqd->nyxd", patches, kernel.astype(pixels.dtype)) + bias.astype(pixels.dtype)
        x = x.reshape(n, gy * gx, d)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, d)), x], axis=1)
        return x + self.positions(pos, gy, gx).astype(x.dtype)

    def positions(self, pos: jax.Array, gy: int, gx: int) -> jax.Array:
        g = self.cfg.grid
        if (gy, gx) == (g, g):
            return pos
        # Other input sizes: bicubic resize of the patch grid, as transformers' interpolate_pos_encoding.
        grid = pos[1:].reshape(g, g, -1).astype(jnp.float32)
        wy, wx = jnp.asarray(bicubic_matrix(g, gy)), jnp.asarray(bicubic_matrix(g, gx))
        grid = jnp.einsum("Yy,yxd,Xx->YXd", wy, grid, wx, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([pos[:1], grid.reshape(gy * gx, -1).astype(pos.dtype)], axis=0)


class VisionLayer(nn.Module):
    cfg: VisionConfig
    param_dtype: jnp.dtype
    num_run: int  # layers whose output counts (vision_feature_layer); later ones leave x unchanged
    quant: str = ""  # weight-only quantization of the linear layers (`internvl_jax.quant`)

    @nn.compact
    def __call__(self, x: jax.Array, layer: jax.Array) -> tuple[jax.Array, None]:
        x_in = x
        c, pd, qz = self.cfg, self.param_dtype, self.quant
        h, k, d = c.num_heads, c.head_dim, c.hidden_size
        heads = ("vis_embed", "vis_heads", "head_dim")

        with jax.named_scope("attention"):
            y = norm(c.norm_type, c.layer_norm_eps, "vis_embed", pd, "norm1")(x)
            q = Dense((h, k), heads, c.attention_bias, param_dtype=pd, quant=qz, name="q")(y)
            kk = Dense((h, k), heads, c.attention_bias, param_dtype=pd, quant=qz, name="k")(y)
            v = Dense((h, k), heads, c.attention_bias, param_dtype=pd, quant=qz, name="v")(y)
            if c.use_qk_norm:  # RMSNorm over all heads jointly (width d), not per head.
                q = RMSNorm(c.layer_norm_eps, "vis_qk", pd, name="q_norm")(q.reshape(*q.shape[:2], d))
                kk = RMSNorm(c.layer_norm_eps, "vis_qk", pd, name="k_norm")(kk.reshape(*kk.shape[:2], d))
                q, kk = q.reshape(*q.shape[:2], h, k), kk.reshape(*kk.shape[:2], h, k)
            attn = full_attention(q, kk, v)
            attn = Dense((d,), ("vis_heads", "head_dim", "vis_embed"), True, n_in=2, param_dtype=pd, quant=qz,
                         name="o")(attn)
            # Layer scale multiplies the branch before the residual add.
            ls1 = weight(self, "ls1", (d,), ("vis_embed",), nn.initializers.constant(c.layer_scale_init_value), pd)
            x = x + ls1.astype(x.dtype) * attn

        with jax.named_scope("mlp"):
            y = norm(c.norm_type, c.layer_norm_eps, "vis_embed", pd, "norm2")(x)
            y = Dense((c.intermediate_size,), ("vis_embed", "vis_mlp"), True, param_dtype=pd, quant=qz,
                      name="fc1")(y)
            y = activation(c.hidden_act)(y)
            y = Dense((d,), ("vis_mlp", "vis_embed"), True, param_dtype=pd, quant=qz, name="fc2")(y)
            ls2 = weight(self, "ls2", (d,), ("vis_embed",), nn.initializers.constant(c.layer_scale_init_value), pd)
            x = x + ls2.astype(x.dtype) * y
        if self.num_run < c.num_layers:
            # Features from an earlier layer: a select keeps one scanned program; the skipped layers' compute
            # is wasted, which only happens off the default vision_feature_layer=-1.
            x = jnp.where(layer < self.num_run, x, x_in)
        x = constrain(x, ("tiles", "patches", "act_embed"))
        self.sow(HIDDEN, "hidden", x)  # a no-op unless the caller asks for the hidden states
        return x, None


class VisionTower(nn.Module):
    """Embeddings + encoder. Returns the hidden state after `num_run` layers ([n, 1 + patches, d])."""

    cfg: VisionConfig
    feature_layer: int  # transformers' vision_feature_layer: -1 = last, -2 = one before, k >= 0 = after k layers
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    quant: str = ""

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.cfg
        x = VisionEmbeddings(c, self.param_dtype, name="embeddings")(pixels.astype(self.dtype))
        x = constrain(x, ("tiles", "patches", "act_embed"))
        self.sow(HIDDEN, "embedded", x)
        # One compiled layer body, scanned over stacked weights: compile time does not grow with depth.
        num_run = self.feature_layer % (c.num_layers + 1)
        layers = nn.scan(
            VisionLayer,
            variable_axes={"params": 0, HIDDEN: 0},
            split_rngs={"params": True},
            in_axes=0,
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.param_dtype, num_run, self.quant, name="layers")
        x, _ = layers(x, jnp.arange(c.num_layers))
        if not c.use_mean_pooling:
            # The checkpoint has this norm whatever the feature layer; transformers applies it only to the last.
            normed = LayerNorm(c.layer_norm_eps, "vis_embed", self.param_dtype, name="final_norm")(x)
            x = normed if self.feature_layer == -1 else x
        return x

