"""Next-token choice with transformers' names and meanings, all on device.

The order is transformers': repetition penalty, then (when sampling) temperature, top-k, top-p, then a
draw from the softmax; greedy is argmax after the penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from internvl_jax.processing.configs import settings_from_file


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off (transformers' default of 50 applies only through generation_config.json)
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int = 0

    @property
    def pad_id(self) -> int:
        """The id finished rows are padded with: pad_token_id, else the first EOS id, else 0 (transformers')."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else 0

    def check(self) -> SamplingConfig:
        for name in ("temperature", "top_p", "repetition_penalty"):
            # inf/nan pass the range checks below (or are ignored when greedy) and then poison every logit.
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self

    def update(self, **kwargs: Any) -> SamplingConfig:
        known = {f.name for f in fields(self)}
        unknown = sorted(k for k, v in kwargs.items() if k not in known and v is not None)
        if unknown:
            raise TypeError(f"unknown generation argument(s): {', '.join(unknown)}")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if "eos_token_id" in kwargs:
            kwargs["eos_token_id"] = _ids(kwargs["eos_token_id"])
        return replace(self, **kwargs).check()

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> SamplingConfig:
        """Defaults from generation_config.json when the checkpoint has one; a bad value there is a ValueError
        naming the file."""
        return settings_from_file(Path(directory) / "generation_config.json", cls._from_dict)

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> SamplingConfig:
        base = cls()
        pad = raw.get("pad_token_id")
        return replace(
            base,
            do_sample=bool(raw.get("do_sample", base.do_sample)),
            temperature=_number(raw, "temperature", float, base.temperature),
            top_k=_number(raw, "top_k", int, 0),
            top_p=_number(raw, "top_p", float, 1.0),
            repetition_penalty=_number(raw, "repetition_penalty", float, 1.0),
            eos_token_id=_ids(raw.get("eos_token_id")),
            pad_token_id=None if pad is None else _number(raw, "pad_token_id", int, 0),
            max_new_tokens=_number(raw, "max_new_tokens", int, base.max_new_tokens),
        ).check()


def _number(raw: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """`raw[key]` as `kind`; absent, null or 0 mean `default` (transformers writes 0/null for "unset")."""
    value = raw.get(key) or default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return kind(value)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float | jax.Array) -> jax.Array:
    """transformers: a seen token's logit is divided by the penalty if positive, multiplied if negative."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Drop the tokens whose ascending cumulative probability is <= 1 - p (the most likely always stays)."""
    ascending = jnp.sort(logits, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop = cum <= 1 - p
    drop = drop.at[..., -1].set(False)
    # The threshold is the smallest kept logit; ties with it are kept, as transformers' scatter does.
    threshold = jnp.min(jnp.where(drop, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def choose(logits: jax.Array, key: jax.Array, cfg: SamplingConfig, seen: jax.Array | None) -> jax.Array:
    """logits [b, v] float32 -> token ids [b]. `cfg` is static (part of the compiled program)."""
    if cfg.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RowSampling:
    """Each row's own settings as arrays: the slot engine's rows belong to different requests."""

    sample: jax.Array  # [R] bool: do_sample
    temperature: jax.Array  # [R] float32 (1 where greedy)
    top_k: jax.Array  # [R] int32, 0: off
    top_p: jax.Array  # [R] float32
    penalty: jax.Array  # [R] float32

    @staticmethod
    def values(cfg: SamplingConfig) -> tuple[bool, float, int, float, float]:
        """One row's entries, in field order."""
        return (cfg.do_sample, cfg.temperature if cfg.do_sample else 1.0, cfg.top_k, cfg.top_p,
                cfg.repetition_penalty)

    @classmethod
    def idle(cls, rows: int) -> RowSampling:
        return cls(jnp.zeros((rows,), bool), jnp.ones((rows,), jnp.float32), jnp.zeros((rows,), jnp.int32),
                   jnp.ones((rows,), jnp.float32), jnp.ones((rows,), jnp.float32))


def features_of(cfg: SamplingConfig) -> tuple[bool, bool, bool, bool]:
    """Which parts of `choose` a request needs: (sampling, top-k, top-p, repetition penalty). The slot engine
    compiles its step for the union over its busy rows, so greedy rows pay for no sort."""
    return cfg.do_sample, cfg.do_sample and cfg.top_k > 0, cfg.do_sample and cfg.top_p < 1.0, \
        cfg.repetition_penalty != 1.0


def choose_rows(logits: jax.Array, keys: jax.Array, rs: RowSampling, seen: jax.Array,
                features: tuple[bool, bool, bool, bool]) -> tuple[jax.Array, jax.Array]:
    """`choose` for rows with their own settings and keys: logits [R, v], raw keys [R, 2] -> (tokens [R], keys).

    Each row's key is split as `generate` splits its own, and its draw uses that row's key alone, so a request
    samples the same tokens whatever shares the batch (and as `generate` does for it alone)."""
    sample, with_top_k, with_top_p, with_penalty = features
    split = jax.vmap(jax.random.split)(keys)
    keys, sub = split[:, 0], split[:, 1]
    if with_penalty:
        logits = apply_repetition_penalty(logits, seen, rs.penalty[:, None])
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sample:
        return greedy, keys
    scaled = logits / rs.temperature[:, None]
    if with_top_k:
        descending = -jnp.sort(-scaled, axis=-1)
        kth = jnp.take_along_axis(descending, jnp.clip(rs.top_k - 1, 0, scaled.shape[-1] - 1)[:, None], axis=-1)
        scaled = jnp.where((rs.top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)
    if with_top_p:
        scaled = top_p_filter(scaled, rs.top_p[:, None])
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(sub, scaled)
    return jnp.where(rs.sample, drawn.astype(jnp.int32), greedy), keys
