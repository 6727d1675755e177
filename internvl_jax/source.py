"""The one reader of safetensors checkpoints: any key layout, seen through the weight table.

Every path that reads a torch checkpoint goes through `Source`: `InternVL.from_pretrained`, the converter
(`python -m convert`) and so the parity tests. It
- detects the layout from the tensor names: `-hf` (transformers' module tree, or the older key layout that
  `InternVLForConditionalGeneration.save_pretrained` writes), or the original OpenGVLab one (Qwen2/Llama/
  InternLM3 LLM, or InternLM2 with its own names);
- gives the -hf tensor of any of our parameters (`tensor`), whatever the layout: keys come from
  `weights.mapping`, fused original q/k/v are cut with `weights.split_fused`;
- checks from the file headers alone, before anything is read, that every tensor the config needs is
  there with the right number of values and that nothing is left unused (`check_keys`);
- builds each parameter straight into its target sharding, one device block at a time (`read_param`).
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import quant, weights
from internvl_jax.config import InternVLConfig
from internvl_jax.safetensors_io import CheckpointError, SafetensorsDir, itemsize

log = logging.getLogger(__name__)

Index = tuple[slice, ...]

# Buffers some exported checkpoints carry that are not parameters (recomputed from the config).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def detect_layout(reader: SafetensorsDir) -> str:
    """'hf', 'original' or 'original-internlm2' (one of `weights.LAYOUTS`), from the tensor names."""
    keys = reader.keys()
    hf = any(k.startswith(("model.vision_tower.", "vision_tower.")) for k in keys)
    original = any(k.startswith("vision_model.") for k in keys)
    if hf == original:
        sample = ", ".join(sorted(keys)[:4])
        what = "both -hf (vision_tower.*) and original (vision_model.*)" if hf else "neither -hf (vision_tower.*) " \
            "nor original (vision_model.*)"
        raise CheckpointError(f"{_where(reader)}: cannot tell the checkpoint layout: it has {what} vision tensors "
                              f"(first keys: {sample})")
    if hf:
        return "hf"
    return "original-internlm2" if any(".attention.wqkv." in k for k in keys) else "original"


def _where(reader: SafetensorsDir) -> Path:
    return next(iter(reader.files.values())).path.parent


def _legacy_key(key: str) -> str:
    """-hf key in the older layout (`vision_tower.*`, `language_model.model.*`, `language_model.lm_head.*`)."""
    for new, old in weights.LEGACY_PREFIXES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


class Source:
    """Tensors of one checkpoint directory, addressed by our parameter path."""

    def __init__(self, directory: str | Path, config: InternVLConfig, layout: str = "auto"):
        reader = SafetensorsDir(directory)
        detected = detect_layout(reader)
        if layout == "original" and detected == "original-internlm2":
            layout = detected  # the InternLM2 flavour of the original layout is a detail of its LLM
        if layout not in ("auto", detected):
            raise CheckpointError(f"{_where(reader)}: --layout {layout} was asked for, but the tensor names are "
                                  f"those of the {detected!r} layout")
        self.reader = reader
        self.layout = detected
        self.directory = _where(reader)
        self.legacy = detected == "hf" and any(k.startswith(("vision_tower.", "language_model.model."))
                                               for k in reader.keys())
        self.config = config
        self.config = self._untied()

    # ----- keys -----
    def key(self, path: str, layer: int | None = None) -> str:
        """The key in this checkpoint that holds (a part of) parameter `path` (for `layer`)."""
        key = weights.mapping(path).source_key(self.layout)
        if layer is not None:
            key = key.format(i=layer)
        return _legacy_key(key) if self.legacy else key

    def __contains__(self, path: str) -> bool:
        return self.key(path, 0 if weights.mapping(path).stacked else None) in self.reader

    def _needed_sizes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, list[str]]]:
        """Checkpoint key -> (number of values the config needs from it, our parameters it feeds)."""
        out: dict[str, tuple[int, list[str]]] = {}
        for path, shape in shapes.items():
            m = weights.mapping(path)
            size = math.prod(_layer_shape(path, shape))
            if m.vocab_axis is not None:  # our vocabulary is padded (TextConfig.padded_vocab); the file's is not
                size = size // self.config.text.padded_vocab * self.config.text.vocab_size
            for i in range(shape[0]) if m.stacked else [None]:
                key = self.key(path, i)
                n, users = out.get(key, (0, []))
                out[key] = (n + size, [*users, path])  # fused q/k/v add up to the fused tensor's size
        return out

    def check_keys(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every tensor the config needs is present with the right number of values and no tensor is left unused;
        checked from the file headers alone, before anything is read."""
        needed = self._needed_sizes(shapes)
        missing = sorted(set(needed) - set(self.reader.keys()))
        # A tied checkpoint may still carry its lm_head (equal to the embeddings): not an error.
        ignorable = {self.key("text/lm_head")}
        extra = sorted(k for k in self.reader.keys() if k not in needed and k not in ignorable
                       and not k.endswith(_IGNORED_SUFFIXES))
        where = f"checkpoint {self.directory} ({self.layout} layout)"
        if missing:
            raise CheckpointError(f"{where} lacks {len(missing)} tensor(s) the config needs: {missing[:5]}")
        if extra:
            raise CheckpointError(f"{where} has {len(extra)} tensor(s) the config does not use: {extra[:5]}")
        for key, (size, users) in needed.items():
            shape = self.reader.shape(key)
            if math.prod(shape) != size:
                ours = " + ".join(f"{u} {_layer_shape(u, shapes[u])}" for u in users)
                raise CheckpointError(f"{where}: tensor {key!r} has shape {shape} ({math.prod(shape)} values), but "
                                      f"the config needs {size} values from it: {ours}")

    # ----- sizes -----
    def nbytes(self, path: str, shape: tuple[int, ...]) -> int:
        """Bytes read from the checkpoint for parameter `path` of our (stacked) `shape`."""
        key = self.key(path, 0 if weights.mapping(path).stacked else None)
        return math.prod(shape) * itemsize(self.reader.where[key].entries[key]["dtype"])

    def source_dtype(self) -> str:
        """The floating dtype most of the checkpoint's bytes are in ('BF16', 'F32', 'F16', ...)."""
        sizes: dict[str, int] = {}
        for f in self.reader.files.values():
            for e in f.entries.values():
                sizes[e["dtype"]] = sizes.get(e["dtype"], 0) + e["data_offsets"][1] - e["data_offsets"][0]
        return max(sizes, key=sizes.get)

    # ----- tensors -----
    def tensor(self, path: str, layer: int | None = None, rows: int | None = None) -> np.ndarray:
        """The -hf tensor of parameter `path` (of `layer` when stacked), in the checkpoint's dtype; `rows`: read
        into that many rows, the extra ones zero (`weights.padded_rows`). Read with pread into a fresh buffer
        (`SafetensorsFile.get`), so only the bytes asked for are read and none stay mapped."""
        m = weights.mapping(path)
        key = self.key(path, layer)
        if key not in self.reader:
            raise CheckpointError(f"{self.directory}: checkpoint has no tensor {key!r}")
        tensor = self.reader.get(key, rows)
        kind = m.fused(self.layout)
        if kind is None:
            return tensor
        t = self.config.text
        groups, head_dim = (t.groups, t.head_dim) if kind == "wqkv" else (1, 1)
        try:
            return weights.split_fused(kind, tensor, m.part, groups, head_dim)
        except ValueError as e:
            raise CheckpointError(f"{self.directory}: fused tensor {key!r} of shape {tuple(tensor.shape)} does not "
                                  f"fit the config ({e})") from e

    def ours(self, path: str, layer: int | None, shape: tuple[int, ...], dtype: np.dtype,
             on_read: Callable[[int], None] | None = None) -> np.ndarray:
        """Parameter `path` (one `layer` of it when stacked) in our layout of `shape` and `dtype`."""
        key = self.key(path, layer)
        stored = self.reader.shape(key) if key in self.reader else None
        rows = weights.padded_rows(weights.mapping(path), stored[0], shape) if stored else None
        tensor = self.tensor(path, layer, rows)
        if not jnp.issubdtype(tensor.dtype, jnp.floating):
            raise CheckpointError(f"{self.directory}: tensor {key!r} is {tensor.dtype}, but parameter {path!r} "
                                  "holds floating-point weights")
        if on_read is not None:
            on_read(math.prod(stored or tensor.shape) * tensor.dtype.itemsize)  # the bytes read, not the padding
        if dtype.itemsize < tensor.dtype.itemsize:
            tensor = tensor.astype(dtype)  # narrow first, so the layout copy below is the smaller one
        try:
            out = weights.to_ours(weights.mapping(path), tensor, tuple(shape))
        except ValueError as e:
            raise CheckpointError(f"{self.directory}: tensor {key!r} has shape {tuple(tensor.shape)}, which does "
                                  f"not fit the config's {tuple(shape)} for parameter {path!r} ({e})") from e
        out = out.astype(dtype, copy=False)
        bad = _non_finite(out)  # a NaN weight would otherwise surface as a stream of token 0
        if bad:
            raise CheckpointError(f"{self.directory}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) "
                                  f"in {np.dtype(dtype).name}")
        return out

    def host_block(self, path: str, shape: tuple[int, ...], dtype: np.dtype, index: Index,
                   on_read: Callable[[int], None] | None = None) -> np.ndarray:
        """The block `index` of parameter `path` (our layout, `dtype`), read layer by layer."""
        if not weights.mapping(path).stacked:
            return self.ours(path, None, shape, dtype, on_read)[index]
        layers = range(*index[0].indices(shape[0]))
        rest = index[1:]
        out = np.empty((len(layers), *(len(range(*s.indices(n))) for s, n in zip(rest, shape[1:], strict=True))),
                       dtype)
        for j, i in enumerate(layers):
            # The whole layer is converted, then cut: the transposes need it, and a layer is small next to a model.
            out[j] = self.ours(path, i, shape[1:], dtype, on_read)[rest]
        return out

    def read_param(self, path: str, spec: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding,
                   on_read: Callable[[int], None] | None = None) -> jax.Array:
        """Parameter `path` as a jax.Array of `spec` placed with `sharding`, one distinct device block at a time:
        the host holds one block plus one layer's tensor (the whole tensor for an unstacked parameter such as
        the embedding), never the model."""
        shape = tuple(spec.shape)
        index_map = sharding.addressable_devices_indices_map(shape)
        # Devices holding the same block (replicas) share one host read.
        groups: dict[tuple, list[jax.Device]] = {}
        indices: dict[tuple, Index] = {}
        for device, index in index_map.items():
            key = tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
            groups.setdefault(key, []).append(device)
            indices[key] = index
        placed: dict[jax.Device, jax.Array] = {}
        for n, (key, devices) in enumerate(groups.items()):
            # `on_read` counts the first block's reads only: layers are never split across devices, so it sees
            # every byte of the parameter once; other blocks re-read the same tensors.
            block = self.host_block(path, shape, np.dtype(spec.dtype), indices[key], on_read if n == 0 else None)
            for device in devices:
                placed[device] = jax.device_put(block, device)  # one CPU device: no copy, the array keeps `block`
            # Free the host block before the next one is read: wait for the asynchronous copies, then collect the
            # youngest generation, since jax (0.10, CPU) still holds the source through a fresh reference cycle
            # after the copy; without this a host copy of the parameter outlives its transfer. (Generation 0
            # only: a full collection costs ~0.3 s with torch loaded.)
            jax.block_until_ready([placed[d] for d in devices])
            del block
            gc.collect(0)
        return jax.make_array_from_single_device_arrays(shape, sharding, [placed[d] for d in index_map])

    # ----- config -----
    def _untied(self) -> InternVLConfig:
        """A checkpoint's own lm_head is used when present and different, even if the config says tied."""
        config = self.config
        if not config.tie_word_embeddings or "text/lm_head" not in self:
            return config
        if np.array_equal(self.tensor("text/lm_head"), self.tensor("text/embedding")):
            return config
        log.warning("%s: config ties lm_head to the embeddings but the checkpoint has its own lm_head: using it",
                    self.directory)
        return config.replace(tie_word_embeddings=False)


def _non_finite(array: np.ndarray, chunk: int = 1 << 22) -> int:
    """How many values are NaN or inf, checked a few MB at a time (a mask of the whole embedding would add
    a quarter of its size to the loader's peak memory)."""
    flat = array.reshape(-1)
    if all(np.isfinite(flat[i:i + chunk]).all() for i in range(0, flat.size, chunk)):  # the common case, cheaply
        return 0
    return sum(int(flat[i:i + chunk].size - np.isfinite(flat[i:i + chunk]).sum()) for i in range(0, flat.size, chunk))


def _layer_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[1:] if weights.mapping(path).stacked else shape


def load_params(source: Source, abstract: dict[str, jax.ShapeDtypeStruct],
                shardings: dict[str, jax.sharding.Sharding] | None = None) -> dict[str, jax.Array]:
    """Every parameter of the flat `abstract` tree, checked against the headers first, then read one at a time
    into its sharding (default: this process's first device). A quantized `abstract` (`quant`): each weight is
    quantized as soon as it is read, so the float model is never whole in memory."""
    floats = quant.float_specs(abstract)
    source.check_keys({p: tuple(s.shape) for p, s in floats.items()})
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own
    out: dict[str, jax.Array] = {}
    for p, s in floats.items():
        out.update(quant.quantize_param(p, source.read_param(p, s, shardings[p] if shardings else default), abstract,
                                        shardings))
    return out
