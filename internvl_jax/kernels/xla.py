"""`jax.nn.dot_product_attention`: XLA's fused form everywhere, cuDNN's flash attention on NVIDIA GPUs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later with cuDNN 9; every InternVL3 head is 64 or 128


def cudnn_fits(dtype: jnp.dtype, head_dim: int, backend: str) -> bool:
    """Whether cuDNN's flash attention takes the call (jax's check_is_flash_attention, the part known before
    tracing): an NVIDIA GPU, 16-bit inputs, head_dim a multiple of 8 and at most 128."""
    if backend != "gpu" or jnp.dtype(dtype) not in CUDNN_DTYPES:
        return False
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return False
    if jax.default_backend() != "gpu":
        return True  # choosing for a GPU from elsewhere (a plan): an NVIDIA one, the only GPUs with chip facts here
    return "cuda" in jax.devices()[0].client.platform_version.lower()  # not ROCm


def attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array | None, implementation: str) -> jax.Array:
    """q [b,t,n,h], k, v [b,s,kv,h] (n a multiple of kv: grouped heads), visible [b,t,s] bool or None (every key)
    -> [b,t,n,h]. Logits and softmax in float32 whatever the inputs' dtype."""
    mask = None if visible is None else visible[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
