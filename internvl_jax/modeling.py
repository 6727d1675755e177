"""`InternVL`: the model with its parameters, loaded from a checkpoint, called like transformers' model.

The user-facing class only: it calls the layers below it (`model/`, `source`, `checkpoint`, `sharding`,
`engine/`), and none of them calls back up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import checkpoint, weights
from internvl_jax.config import InternVLConfig
from internvl_jax.engine import generate as engine
from internvl_jax.engine.sampling import SamplingConfig
from internvl_jax.engine.vision import image_features
from internvl_jax.hub import resolve
from internvl_jax.inputs import check_inputs, check_pixels
from internvl_jax.model.attention import KeyMask
from internvl_jax.model.internvl import InternVLModule
from internvl_jax.model.layers import HIDDEN
from internvl_jax.model.params import DTypeLike, Params, abstract_params, as_dtype, module_for, random_params
from internvl_jax.quant import check_scheme
from internvl_jax.rules import constrain, spec_for
from internvl_jax.sharding import batch_sharding, param_shardings
from internvl_jax.source import Source, load_params


class InternVL:
    """InternVL3 in JAX. `model(input_ids, pixel_values, attention_mask)` returns logits [b, t, vocab].

    `dtype` of weights and activations: None is the backend's default (`params.default_dtype`: bfloat16 on GPU and
    TPU, float32 on CPU)."""

    def __init__(self, config: InternVLConfig, params: Params, dtype: DTypeLike | None = None,
                 quantize: str | None = None, kv_cache_dtype: str | None = None):
        """`params` as `abstract_params(config, dtype, quant=quantize)` lays them out; `kv_cache_dtype="int8"`:
        generation keeps keys and values in int8 (one scale per token and KV head)."""
        self.config = config
        self.dtype = as_dtype(dtype)
        self.module = module_for(config, self.dtype, quantize, kv_cache_dtype)
        self.params = params
        self.generation_config = SamplingConfig()
        self.mesh: jax.sharding.Mesh | None = None  # set when the parameters are laid out on a mesh

    # ----- construction -----
    @staticmethod
    def abstract_params(config: InternVLConfig, dtype: DTypeLike | None = None, boxed: bool = False) -> Params:
        """Parameter tree of ShapeDtypeStructs (no allocation). `boxed` keeps the logical-axis metadata."""
        return abstract_params(config, dtype, boxed)

    @classmethod
    def from_config(cls, config: InternVLConfig, dtype: DTypeLike | None = None, seed: int = 0,
                    quantize: str | None = None, kv_cache_dtype: str | None = None) -> InternVL:
        """Random weights of the configured shape (tests, benchmarks, family presets); `quantize`: the same
        weights quantized."""
        dtype = as_dtype(dtype)
        return cls(config, random_params(config, dtype, seed, quantize), dtype, quantize, kv_cache_dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: DTypeLike | None = None, mesh: jax.sharding.Mesh | None = None,
                        quantize: str | None = None, kv_cache_dtype: str | None = None) -> InternVL:
        """Load a checkpoint directory (or a hub id, downloaded when online): `-hf` safetensors, the original
        OpenGVLab layout, or a directory written by the converter (`python -m convert`); each parameter is read
        straight into its sharding on `mesh`. `quantize="int8"|"int4"`: each weight is quantized as it is read
        (`internvl_jax.quant`); a checkpoint converted with `--quantize` loads quantized as it was written.
        `kv_cache_dtype="int8"`: an int8 KV cache in generation."""
        directory = resolve(path)
        dtype = as_dtype(dtype)
        config = InternVLConfig.from_pretrained(directory)
        source = None if checkpoint.is_converted(directory) else Source(directory, config)
        if source is not None:
            config = source.config  # its own lm_head, when the checkpoint has one
        else:
            quantize = checkpoint.converted_quantization(directory, quantize)
        quantize = check_scheme(quantize)
        abstract = weights.flatten_paths(abstract_params(config, dtype, quant=quantize))
        shardings = param_shardings(config, mesh, dtype, quantize) if mesh is not None else None
        if source is None:
            params = checkpoint.restore_params(directory, abstract, shardings)
        else:
            params = load_params(source, abstract, shardings)
        model = cls(config, weights.unflatten_paths(params), dtype, quantize, kv_cache_dtype)
        model.generation_config = SamplingConfig.from_checkpoint(directory)
        model.mesh = mesh
        return model

    # ----- forward passes -----
    def __call__(self, input_ids: Any, pixel_values: Any = None, attention_mask: Any = None,
                 logits_to_keep: int = 0, position_ids: Any = None, return_hidden_states: bool = False
                 ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Logits [b, t, vocab] (float32), for the same inputs transformers' forward takes.

        Without `position_ids` every row counts positions from its first slot (padding included), exactly
        as transformers' forward does; generation uses per-row positions instead (see the engine).
        On a mesh (`from_pretrained(..., mesh=)`) the inputs are split over its data axis and the logits come back
        split over data and vocabulary; where the tensor axis does not divide the vocabulary (InternVL3's 151674 on
        4 or 8 chips) they keep the padded columns (`config.text.padded_vocab`, at the float32 minimum: see
        `split_logits`); `logits[..., :config.text.vocab_size]` is the exact width.
        `return_hidden_states=True` returns `(logits, states)`, every stage's output by name, in data-path order:
        `vision.embeddings`, `vision.layers.{i}` ([tiles, 1 + patches, vision width]; layers past
        `vision_feature_layer` are not run and repeat its state), `projector` ([tiles, tokens, width]),
        `text.embeddings` (after the image features are merged in), `text.layers.{i}`, `text.final_norm`
        ([b, t, width]). transformers' `output_hidden_states` holds the same tensors (its last text entry is
        after the final norm).
        """
        x = check_inputs(self.config, input_ids, pixel_values, attention_mask, self.dtype)
        positions = _positions(x.ids, position_ids)
        if return_hidden_states:
            logits, states = self._run(_hidden_fn(self.module), x.ids, x.pixels, positions, x.mask)
            return logits, {name: states[name] for name in stage_names(self.config, x.pixels is not None)}
        return self._run(_logits_fn(self.module, int(logits_to_keep)), x.ids, x.pixels, positions, x.mask)

    def get_image_features(self, pixel_values: Any) -> jax.Array:
        """[tiles, 3, H, W] -> [tiles, image tokens, text hidden] (vision tower, pixel shuffle, projector)."""
        return self._run(_image_fn(self.module), check_pixels(self.config, pixel_values, self.dtype))

    def loss(self, input_ids: Any, labels: Any, pixel_values: Any = None, attention_mask: Any = None,
             params: Params | None = None) -> jax.Array:
        """Mean next-token cross entropy over labels != -100 (transformers' shift), differentiable in `params`.

        `jax.grad(lambda p: model.loss(ids, labels, pixels, params=p))(model.params)` gives the gradients.
        A label right after left padding is predicted from a padding slot (no real key to attend to: we, like
        transformers' eager attention, average all slots; its SDPA path differs): set such labels to -100.
        """
        x = check_inputs(self.config, input_ids, pixel_values, attention_mask, self.dtype)
        lab = np.asarray(labels)
        if lab.shape != x.ids.shape:
            raise ValueError(f"labels shape {lab.shape} differs from input_ids shape {x.ids.shape}")
        return self._run(_loss_fn(self.module), x.ids, x.pixels, _positions(x.ids, None), x.mask, lab.astype(np.int32),
                         params=params)

    def _run(self, fn: Callable, *inputs: Any, params: Params | None = None) -> Any:
        """`fn(params, *inputs)`. On a mesh the inputs are split by rows (and tiles) over the data axis and `fn` is
        traced under the mesh, so activations and outputs are laid out as the rules table says (`rules.constrain`):
        host inputs passed as they are went whole onto every device, and so did everything XLA derived from them."""
        params = self.params if params is None else params
        if self.mesh is None:
            return fn(params, *inputs)
        placed = [None if x is None else jax.device_put(x, batch_sharding(self.mesh, np.shape(x))) for x in inputs]
        # The abstract mesh, not `jax.set_mesh`: that refuses to be entered under a trace (`jax.grad` of `loss`).
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return fn(params, *placed)

    def generate(self, input_ids: Any, pixel_values: Any = None, attention_mask: Any = None,
                 streamer: Any = None, **generation_kwargs: Any) -> np.ndarray:
        """Token ids [b, prompt + new], like transformers' generate (rows padded with pad_token_id after they
        end). Keyword arguments: max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
        eos_token_id (int or list), pad_token_id, seed; defaults from the checkpoint's generation_config.json."""
        sampling = self.generation_config.update(**generation_kwargs)
        inputs = check_inputs(self.config, input_ids, pixel_values, attention_mask, self.dtype)
        return engine.generate(self.module, self.params, inputs, sampling, self.mesh, streamer=streamer)

    def generate_many(self, prompts: Sequence[Mapping[str, Any]], slots: int = 16, cache_len: int | None = None,
                      **generation_kwargs: Any) -> list[np.ndarray]:
        """Many prompts through the slot engine (continuous batching): each `{"input_ids": [t] or [1, t],
        "pixel_values": optional}` -> its ids [t + new], in input order. Each prompt's tokens equal `generate`
        for it alone (greedy, or sampled with the same seed); a prompt the engine refuses raises ValueError
        naming its index. `cache_len` defaults to the longest prompt + max_new_tokens."""
        from internvl_jax.engine.slots import Request, SlotEngine

        sampling = self.generation_config.update(**generation_kwargs)
        requests = []
        for i, p in enumerate(prompts):
            ids = np.asarray(p["input_ids"])
            requests.append(Request(id=i, ids=ids.reshape(-1) if ids.ndim == 2 and ids.shape[0] == 1 else ids,
                                    pixels=p.get("pixel_values"), sampling=sampling))
        need = max((len(np.asarray(r.ids).reshape(-1)) for r in requests), default=0) + sampling.max_new_tokens
        engine = SlotEngine(self.module, self.params, slots=slots, cache_len=cache_len or need, mesh=self.mesh)
        out: dict[int, np.ndarray] = {}
        for c in engine.run(requests):
            if c.error is not None:
                raise ValueError(f"prompt {c.id}: {c.error}")
            out[c.id] = np.concatenate([requests[c.id].ids, np.asarray(c.tokens, np.int64)]).astype(np.int64)
        return [out[i] for i in range(len(requests))]

    def stream(self, input_ids: Any, pixel_values: Any = None, attention_mask: Any = None, chunk: int = 8,
               **generation_kwargs: Any) -> Iterator[np.ndarray]:
        """Iterator of new token ids [b, n], a few at a time, as the on-device loop produces them."""
        sampling = self.generation_config.update(**generation_kwargs)
        inputs = check_inputs(self.config, input_ids, pixel_values, attention_mask, self.dtype)
        return engine.stream(self.module, self.params, inputs, sampling, self.mesh, chunk=chunk)

    def num_params(self) -> int:
        """Parameter count as the checkpoint has it (without our vocabulary padding)."""
        return sum(x.size for x in jax.tree.leaves(self.params)) - weights.padding_numel(self.config)


def _positions(ids: np.ndarray, position_ids: Any) -> np.ndarray:
    if position_ids is None:
        return np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    pos = np.asarray(position_ids, np.int32)
    if pos.ndim == 1:
        pos = pos[None]
    return np.broadcast_to(pos, ids.shape)


# Jitted entry points, one per module (the module is hashable: its config is a frozen dataclass).
@functools.lru_cache(maxsize=16)
def _logits_fn(module: InternVLModule, logits_to_keep: int) -> Callable:
    @jax.jit
    def run(params, ids, pixels, positions, mask):
        logits = _forward(module, params, ids, pixels, positions, mask, logits_to_keep=logits_to_keep)
        return split_logits(logits, module.cfg.text.padded_vocab)
    return run


def _forward(module: InternVLModule, params: Params, ids: jax.Array, pixels: jax.Array | None,
             positions: jax.Array, mask: jax.Array, **kwargs: Any) -> jax.Array:
    """The module's logits, its image features computed a group of tiles at a time (engine/vision.py): in one pass,
    8 rows of 12 tiles held 96 tiles' attention scores at once (6.4 GB a layer at the 1B shape). On a mesh the
    tiles are already split over data and run in one pass (a group would gather them onto one chip)."""
    features = None
    if pixels is not None and jax.sharding.get_abstract_mesh().empty:
        features, pixels = image_features(module, params, pixels), None
    return module.apply({"params": params}, ids, pixels, positions, KeyMask.uncached(mask), features=features,
                        **kwargs)[0]


def split_logits(logits: jax.Array, padded_vocab: int) -> jax.Array:
    """The forward's logits laid out by the rules table under the program's mesh: rows over data, the vocabulary
    over tensor. A tensor axis that divides the padded vocabulary but not the real one (InternVL3's 151674 =
    2 x 75837 on 4 or 8 chips: JAX cannot split it) gets the padded columns back, at the float32 minimum, so
    softmax, argmax, top-k and log-probabilities are unchanged. Cut to the real width, each chip held all the
    logits of its rows: 4x the output on a (data=2, tensor=4) mesh, and 4 x 1043 tokens took 24 GB (issue 13)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and (pad := padded_vocab - logits.shape[-1]):
        sizes = dict(mesh.shape)
        if spec_for((padded_vocab,), ("vocab",), sizes)[0] and not spec_for(logits.shape[-1:], ("vocab",), sizes)[0]:
            logits = jnp.pad(logits, ((0, 0), (0, 0), (0, pad)), constant_values=jnp.finfo(logits.dtype).min)
    return constrain(logits, ("batch", "length", "vocab"))


@functools.lru_cache(maxsize=16)
def _hidden_fn(module: InternVLModule) -> Callable:
    @jax.jit
    def run(params, ids, pixels, positions, mask):
        (logits, _), sown = module.apply({"params": params}, ids, pixels, positions, KeyMask.uncached(mask),
                                         mutable=[HIDDEN])
        return split_logits(logits, module.cfg.text.padded_vocab), stage_outputs(sown[HIDDEN])
    return run


def stage_names(config: InternVLConfig, with_images: bool) -> list[str]:
    """The stages `__call__(..., return_hidden_states=True)` returns, in data-path order."""
    vision = ["vision.embeddings", *(f"vision.layers.{i}" for i in range(config.vision.num_layers)), "projector"]
    text = ["text.embeddings", *(f"text.layers.{i}" for i in range(config.text.num_layers)), "text.final_norm"]
    return (vision if with_images else []) + text


def stage_outputs(sown: dict) -> dict[str, jax.Array]:
    """The modules' sown states (`model.layers.HIDDEN`) as {stage name: array}, in data-path order."""
    out: dict[str, jax.Array] = {}
    vision, text = sown.get("vision", {}), sown["text"]
    if vision:
        out["vision.embeddings"] = vision["embedded"][0]
        out |= {f"vision.layers.{i}": h for i, h in enumerate(vision["layers"]["hidden"][0])}
        out["projector"] = sown["projected"][0]
    out["text.embeddings"] = text["input"][0]
    out |= {f"text.layers.{i}": h for i, h in enumerate(text["layers"]["hidden"][0])}
    out["text.final_norm"] = text["normed"][0]
    return out


@functools.lru_cache(maxsize=16)
def _image_fn(module: InternVLModule) -> Callable:
    # A few tiles at a time (engine/vision.py): memory follows the group, not the number of tiles.
    return jax.jit(lambda params, pixels: image_features(module, params, pixels))


@functools.lru_cache(maxsize=16)
def _loss_fn(module: InternVLModule) -> Callable:
    @jax.jit
    def run(params, ids, pixels, positions, mask, labels):
        logits = split_logits(_forward(module, params, ids, pixels, positions, mask),
                              module.cfg.text.padded_vocab)  # no gather of the vocabulary on a mesh
        target = labels[:, 1:]
        valid = target != -100
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    return run
