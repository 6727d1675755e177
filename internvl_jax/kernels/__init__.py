"""Which attention kernel runs: one choice per call, by backend, with one override.

`model.attention` is the only caller: it asks `choose` and dispatches to
- "reference": the pure-JAX paths in `model.attention` (blockwise online softmax for the decoder, one einsum +
  softmax for the unmasked vision tower): every backend, and the fastest on XLA:CPU;
- "xla": `jax.nn.dot_product_attention(implementation="xla")` (`kernels.xla`);
- "cudnn": the same call with implementation="cudnn", cuDNN's flash attention, where cuDNN takes the call
  (`xla.cudnn_fits`), else "xla";
- "pallas": the Pallas TPU kernels (`kernels.pallas_tpu`): flash attention for calls without a cache and the
  vision tower, our decode kernel for one token against the cache; a prefill chunk into a cache runs the
  blockwise path. Off TPU they run in Pallas's interpret mode, which is for checking only (slow).

Defaults: CPU "reference", GPU "cudnn", TPU "pallas" on one chip ("reference" on several: XLA refuses to
partition a Pallas call, which would have to run under shard_map; not done yet). A decode step (one new token
against the cache) runs the Pallas decode kernel on one TPU chip and "reference" elsewhere: both read only the
cache blocks a row has filled, where the xla/cudnn forms would read every slot of the cache (docs/kernels.md).

Override: the environment variable INTERNVL_JAX_ATTENTION=reference|xla|cudnn|pallas (read when a program is
traced, its first call: set it before that), or `with kernels.use("xla"):` (part of jit's cache key: a program
traced under another choice is traced again).
`kernels.use(backend="tpu")` chooses for another backend than jax's default, for programs compiled here for a
TPU topology (`compiled.py`): the Pallas kernels then lower for TPU, not in interpret mode.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax._src import config as jax_config  # private, but the only way into jit's cache key (see below)

IMPLS = ("reference", "xla", "cudnn", "pallas")
ENV = "INTERNVL_JAX_ATTENTION"
DEFAULTS = {"cpu": "reference", "gpu": "cudnn", "tpu": "pallas"}


def _keyed_state(make, *args):
    try:
        return make(*args, include_in_jit_key=True, include_in_trace_context=True)
    except TypeError:  # a jax without these arguments: the choice then holds for programs traced after it is made
        return make(*args)


# jax config states rather than plain context variables: they are part of jit's cache key, so a program traced
# under one choice is not reused under another (modeling's and the engine's jitted functions are cached per model).
# jax sets a state's initial value from the environment variable of its upper-cased name: INTERNVL_JAX_ATTENTION
# (a string state, so that a bad value reaches `requested` and its message).
_impl = _keyed_state(jax_config.string_or_object_state, "internvl_jax_attention", None,
                     "attention implementation override")
_backend = _keyed_state(jax_config.optional_enum_state, "internvl_jax_attention_backend", tuple(DEFAULTS), None,
                        "backend the attention is chosen for")


def _checked(impl: str, where: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{where}={impl!r}: the attention implementation is one of {', '.join(IMPLS)}")
    return impl


@contextlib.contextmanager
def use(impl: str | None = None, backend: str | None = None) -> Iterator[None]:
    """Run every attention traced inside the block with `impl` (one of IMPLS; None: as outside) and choose as
    for `backend` (cpu, gpu, tpu; None: as outside)."""
    if backend is not None and backend not in DEFAULTS:
        raise ValueError(f"kernels.use backend={backend!r}: one of {', '.join(DEFAULTS)}")
    with _impl(_impl.value if impl is None else _checked(impl, "kernels.use")), \
            _backend(backend or _backend.value):
        yield


def backend() -> str:
    """The backend the attention is chosen (and the Pallas kernels lowered) for."""
    return _backend.value or jax.default_backend()


def requested() -> str | None:
    """The override in force (the context manager, else the environment), or None."""
    if (impl := _impl.value) is not None:
        return _checked(impl, ENV)  # kernels.use checks its own: a bad value here came from the environment
    env = os.environ.get(ENV, "").strip()  # set after jax read it (not part of jit's key: set it before tracing)
    return _checked(env, ENV) if env else None


def choose(dtype: jnp.dtype, head_dim: int, decode: bool = False) -> str:
    """The implementation one attention call runs: the override or the backend's default, then cuDNN's limits."""
    from internvl_jax.kernels.xla import cudnn_fits

    impl = requested()
    if impl is None:
        impl = DEFAULTS.get(backend(), "reference")
        if impl == "pallas" and jax.device_count() > 1:
            impl = "reference"  # XLA cannot split a Pallas call over a mesh ("wrap the call in a shard_map")
        if decode and impl != "pallas":
            impl = "reference"  # reads only the filled cache blocks; xla/cudnn would read every slot
    if impl == "cudnn" and not cudnn_fits(dtype, head_dim, backend()):
        impl = "xla"
    return impl
