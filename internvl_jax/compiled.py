"""Compiled plans: XLA's own numbers for a config on a TPU topology or a set of GPUs, compiled on this machine
(nothing runs).

libtpu compiles for a named topology ("v5e:2x4") without the chips (`jax.experimental.topologies`), and the jax
CUDA plugin for GPUs described by a target configuration (`targets.GPU_SPECS`), on abstract weights and caches that
carry their shardings, so nothing is allocated. From the compiled programs come the
per-chip argument, output and temporary bytes (`memory_analysis`) and flops and bytes accessed (`cost_analysis`).

XLA:TPU's cost analysis counts a while loop's body once, whatever its trip count (a scan over 24 layers reads as
one layer; docs/tpu.md), so its "bytes accessed" of a decode step is not the step's HBM traffic. What shows a
copied cache or copied weights is the program itself: its temporary bytes (a copied cache lives there) and its
`copy` instructions, which `decode_bytes` reports next to the raw count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from internvl_jax.config import InternVLConfig
from internvl_jax.engine.generate import _prefill_fn, bucket, prompt_bucket
from internvl_jax.engine.step import step_mask
from internvl_jax.model.decoder import Decoder, KVCache
from internvl_jax.model.internvl import InternVLModule
from internvl_jax.model.params import abstract_params, as_dtype, module_for
from internvl_jax.quant import SCALE, check_scheme
from internvl_jax.quant import nbytes as quant_nbytes
from internvl_jax.sharding import MESH_AXES, batch_sharding, cache_shardings, param_shardings
from internvl_jax.targets import GPU_SPECS, GiB, Target
from internvl_jax.weights import flatten_paths, unflatten_paths

Params = dict[str, Any]
TPU_EXTRA = "pip install -e '.[tpu]'"
GPU_EXTRA = "pip install -e '.[gpu-plan]'"


class TargetError(ValueError):
    """A target, topology or mesh that cannot be compiled for (the CLI prints it as one line, exit 2)."""


def _quiet_libtpu() -> None:
    """libtpu looks for TPU hosts and logs at length when there are none: it only compiles here (the package's
    import sets the same where no TPU is attached)."""
    from internvl_jax import _quiet_libtpu_without_tpus

    _quiet_libtpu_without_tpus()


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """libtpu's start-up writes warnings to file descriptor 2 from C++ (no TPU hosts here: it only compiles);
    our own error message says what went wrong."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def tpu_devices(topology: str) -> list[jax.Device]:
    """Compile-only devices of a TPU topology such as "v5e:2x4" or "v5p:2x2x2"."""
    if not has_libtpu():
        raise TargetError(f"target tpu:{topology} needs libtpu: {TPU_EXTRA}")
    _quiet_libtpu()
    from jax.experimental import topologies

    try:
        with _stderr_to_devnull():
            topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu's message is long; the name is what the user got wrong
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TargetError(f"TPU topology {topology!r} is not known to libtpu ({first[:160]}); "
                          "e.g. v5e:2x4, v4:2x2x1, v5p:2x2x2, v6e:2x4") from None
    return list(topo.devices)


def has_cuda_plugin() -> bool:
    import importlib.util

    try:  # the plugins live in the `jax_plugins` namespace package, absent when none is installed
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))
    except ModuleNotFoundError:
        return False


def gpu_target_config(target: Target) -> str:
    """The `GpuTargetConfigProto` (text format) XLA's GPU compiler takes in place of a device it can query."""
    assert target.chip is not None
    spec = GPU_SPECS[target.chip.name]
    major, minor = spec.compute_capability
    info = {"threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 * 1024,
            "shared_memory_per_block_optin": spec.shared_per_sm - 1024, "shared_memory_per_core": spec.shared_per_sm,
            "threads_per_core_limit": 2048, "core_count": spec.sm_count, "fpus_per_core": 128,
            "block_dim_limit_x": 2**31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
            "memory_bandwidth": int(target.chip.bandwidth), "l2_cache_size": spec.l2_bytes,
            "clock_rate_ghz": spec.clock_ghz, "device_memory_size": target.chip.hbm,
            "registers_per_core_limit": 65536, "registers_per_block_limit": 65536}
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
            f'platform_name: "CUDA"\ndevice_description_str: "{spec.description}"\n')


def gpu_devices(target: Target) -> list[jax.Device]:
    """Compile-only devices of `target.chips` GPUs of one kind, 8 to a host (NVLink within it)."""
    if not has_cuda_plugin():
        raise TargetError(f"target {target.label} needs the jax CUDA plugin (compile only, no GPU): {GPU_EXTRA}")
    from jax.experimental import topologies

    # Without a GPU to autotune on, XLA's Triton matmuls found no tile sizes for some of our dots ("Couldn't find
    # output tile sizes"); cuBLAS needs none. Read by XLA when it first compiles for the GPU, which is after this.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()
    n = target.chips
    hosts, per_host = (n // 8, 8) if n > 8 and n % 8 == 0 else (1, n)
    try:
        with _stderr_to_devnull():
            topo = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                                target_config=gpu_target_config(target))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TargetError(f"target {target.label}: the CUDA plugin refused it ({first[:160]})") from None
    return list(topo.devices)


def target_devices(target: Target) -> list[jax.Device]:
    assert target.topology is not None
    return tpu_devices(target.topology) if target.kind == "tpu" else gpu_devices(target)


def target_mesh(devices: list[jax.Device], sizes: Mapping[str, int], target: str) -> Mesh:
    """The mesh over all of a topology's chips; its axis sizes must multiply to their number."""
    sizes = dict(sizes)
    rest = [a for a, n in sizes.items() if n == -1]
    known = math.prod(n for n in sizes.values() if n != -1)
    if rest and len(devices) % known == 0:
        sizes[rest[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        mesh = ",".join(f"{a}={n}" for a, n in sizes.items() if n != 1) or "1 device"
        raise TargetError(f"--mesh {mesh} has {total} devices but target {target} has {len(devices)} chips")
    return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def _on(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_params_on(config: InternVLConfig, mesh: Mesh, dtype: str, quant: str | None = None) -> Params:
    """The parameter tree as ShapeDtypeStructs carrying their shardings on `mesh` (`quant`: stored quantized)."""
    flat = flatten_paths(abstract_params(config, dtype, quant=quant))
    shard = param_shardings(config, mesh, dtype, quant)
    return unflatten_paths({p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shard[p]) for p, s in flat.items()})


def abstract_cache_on(config: InternVLConfig, mesh: Mesh, batch: int, slots: int, dtype: str) -> KVCache:
    cache = KVCache.abstract(config.text, batch, slots, as_dtype(dtype))
    return _on(cache, cache_shardings(config, mesh, batch, slots))


def _rows(mesh: Mesh, shape: tuple[int, ...], dt: Any) -> jax.ShapeDtypeStruct:
    """An abstract input split by rows over the data axis, as the engine feeds it."""
    return jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding(mesh, shape))


def per_chip_bytes(a: jax.ShapeDtypeStruct) -> int:
    """Bytes one chip holds of an abstract array with a NamedSharding."""
    return quant_nbytes(a.sharding.shard_shape(a.shape), a.dtype)


def bytes_of(tree: Any) -> int:
    """Per-chip bytes of a tree of abstract arrays with shardings."""
    return sum(per_chip_bytes(a) for a in jax.tree.leaves(tree))


def decode_step(config: InternVLConfig, mesh: Mesh, batch: int, slots: int, dtype: str, quant: str | None = None
                ) -> jax.stages.Lowered:
    """One decode step of the language model (embed, every layer, the head) for `batch` rows and a cache of
    `slots`, compiled for `mesh`; the cache is donated, as in the decode loop. `quant`: quantized weights."""
    d = as_dtype(dtype)
    dec = Decoder(config.text, config.tie_word_embeddings, d, d, check_scheme(quant))
    text = abstract_params_on(config, mesh, dtype, quant)["text"]
    cache = abstract_cache_on(config, mesh, batch, slots, dtype)
    arg = functools.partial(_rows, mesh)

    def step(p: Params, tok: jax.Array, pos: jax.Array, kv_mask: jax.Array, cache: KVCache):
        mask = step_mask(cache.slot, kv_mask)
        x = dec.apply({"params": p}, tok, method=Decoder.embed)
        hidden, cache = dec.apply({"params": p}, x, pos, mask, cache)
        return dec.apply({"params": p}, hidden, method=Decoder.logits), cache

    args = (text, arg((batch, 1), jnp.int32), arg((batch, 1), jnp.int32), arg((batch, slots), bool), cache)
    return jax.jit(step, donate_argnums=(4,)).lower(*args)


def cost(compiled: jax.stages.Compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()  # None from the CUDA plugin without a GPU
    return dict(ca[0] if isinstance(ca, list) else ca or {})


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program's figures per chip, from XLA."""

    name: str
    compile_s: float
    arguments: int
    outputs: int
    temp: int
    flops: float  # XLA's count: each layer loop's body once
    accessed: float  # same
    fits_alone: bool = True  # False: XLA refused to compile it, its temporaries alone exceed the chip's HBM

    @classmethod
    def compile(cls, name: str, lower: Callable[[], jax.stages.Lowered]
                ) -> tuple[Program, jax.stages.Compiled | None]:
        """Lower and compile (the time of both is the compile time), and read XLA's figures."""
        t = time.perf_counter()
        try:
            c = lower().compile()
        except jax.errors.JaxRuntimeError as e:
            need = _OUT_OF_HBM.search(str(e))
            if need is None:
                raise
            # XLA:TPU refuses a program whose temporaries exceed the chip's HBM: that is the answer, not an error.
            return cls(name, time.perf_counter() - t, 0, 0, int(float(need.group(1)) * GiB), 0.0, 0.0,
                       fits_alone=False), None
        seconds = time.perf_counter() - t
        m, k = c.memory_analysis(), cost(c)
        return cls(name, seconds, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                   int(m.temp_size_in_bytes), float(k.get("flops", 0.0)), float(k.get("bytes accessed", 0.0))), c


_OUT_OF_HBM = re.compile(r"memory required for HLO temporaries \(([\d.]+)G\)")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
               "s64": 8}
_COPY = re.compile(r"= (\w+)\[([\d,]*)\]\S* copy(?:-start)?\(")


def copied_bytes(hlo: str) -> list[int]:
    """Sizes of the arrays the optimized HLO copies (`copy`, `copy-start`), largest first."""
    sizes = [math.prod(int(d) for d in dims.split(",") if d) * _ITEM_BYTES.get(dt, 4)
             for dt, dims in _COPY.findall(hlo)]
    return sorted(sizes, reverse=True)


@dataclasses.dataclass(frozen=True)
class DecodeBytes:
    """One decode step per chip: what XLA reports against what the step must read."""

    accessed: float  # XLA's bytes accessed (the layer loop's body counted once: see the module's docstring)
    weights: int  # weights the step reads per chip (every layer and the head; not the embedding table)
    cache: int  # KV cache per chip (keys and values)
    layer_cache: int  # one layer's keys (or values): the smallest cache copy that matters
    temp: int  # XLA's temporary bytes per chip: a copied cache shows here
    copies: tuple[int, ...]  # sizes of the copies in the program, largest first
    program: Program

    @property
    def ratio(self) -> float:
        """XLA's bytes accessed / (weights + cache): not the step's traffic while the loop counts once."""
        return self.accessed / (self.weights + self.cache)

    @property
    def cache_copies(self) -> int:
        """Copies of at least one layer's keys or values: none when the cache is read where it lies."""
        return sum(c >= self.layer_cache for c in self.copies)


def decode_bytes(config: InternVLConfig, mesh: Mesh, batch: int, slots: int, dtype: str = "bfloat16",
                 quant: str | None = None) -> DecodeBytes:
    """Compile one decode step for `mesh` and report its bytes per chip."""
    program, step = Program.compile("decode step", lambda: decode_step(config, mesh, batch, slots, dtype, quant))
    if step is None:
        raise TargetError(f"the decode step alone needs {program.temp / GiB:.1f} GiB of temporaries per chip: it does "
                          "not fit; lower the batch or the context, or use more chips")
    text = flatten_paths(abstract_params_on(config, mesh, dtype, quant)["text"])
    # only `batch` rows of it are read
    table = set() if config.tie_word_embeddings else {"text/embedding", "text/embedding" + SCALE}
    cache = abstract_cache_on(config, mesh, batch, slots, dtype)
    cache_bytes = per_chip_bytes(cache.k) + per_chip_bytes(cache.v)
    return DecodeBytes(accessed=program.accessed,
                       weights=sum(per_chip_bytes(a) for p, a in text.items() if p not in table),
                       cache=cache_bytes, layer_cache=per_chip_bytes(cache.k) // config.text.num_layers,
                       temp=program.temp, copies=tuple(copied_bytes(step.as_text())), program=program)


# ----- the user-facing forward on a mesh (issue 13, item 7) -----
def forward_program(config: InternVLConfig, mesh: Mesh, batch: int, length: int, tiles: int, dtype: str = "float32"
                    ) -> tuple[Program, jax.stages.Compiled | None]:
    """`InternVL.__call__` (every position's logits) on `batch` rows of `length` tokens and `tiles` images, compiled
    as it runs on `mesh`: its own jitted function, inputs split over the data axis, traced under the mesh."""
    from internvl_jax.modeling import _logits_fn

    v, d = config.vision, as_dtype(dtype)
    params = abstract_params_on(config, mesh, dtype)
    rows = functools.partial(_rows, mesh)
    pixels = rows((tiles, v.num_channels, v.image_size, v.image_size), d) if tiles else None
    args = (params, rows((batch, length), jnp.int32), pixels, rows((batch, length), jnp.int32),
            rows((batch, length), jnp.int32))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as `InternVL._run` traces it
        return Program.compile("forward", lambda: _logits_fn(module_for(config, dtype), 0).lower(*args))


_GATHER = re.compile(r"= \(?(\w+)\[([\d,]*)\][^=]*? all-gather(?:-start)?\(")


def gathered_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of the all-gathers in an optimized HLO module."""
    return [tuple(int(x) for x in dims.split(",") if x) for _, dims in _GATHER.findall(hlo)]


# ----- the compiled plan (`internvl-jax plan --target tpu:...`) -----
def vision_program(config: InternVLConfig, mesh: Mesh, tiles: int, dtype: str, quant: str | None = None) -> Program:
    """The vision tower and projector on `tiles` tiles (split over the data axis)."""
    module, v = module_for(config, dtype, quant), config.vision
    params = abstract_params_on(config, mesh, dtype, quant)
    pixels = _rows(mesh, (tiles, v.num_channels, v.image_size, v.image_size), as_dtype(dtype))
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method=InternVLModule.image_features))
    return Program.compile("vision", lambda: fn.lower(params, pixels))[0]


def prefill_program(config: InternVLConfig, mesh: Mesh, batch: int, length: int, slots: int, dtype: str,
                    quant: str | None = None) -> Program:
    """The engine's own prefill program (`_prefill_fn`) on `batch` prompts of `length` tokens (text only)."""
    module = module_for(config, dtype, quant)
    params = abstract_params_on(config, mesh, dtype, quant)
    cache = abstract_cache_on(config, mesh, batch, slots, dtype)
    ids, pos = (_rows(mesh, (batch, length), jnp.int32) for _ in range(2))
    args = (params, ids, None, pos, _rows(mesh, (batch, slots), bool), cache, _rows(mesh, (batch, length), jnp.int32))
    return Program.compile("prefill", lambda: _prefill_fn(module).lower(*args))[0]


def analytic_flops(config: InternVLConfig, batch: int, length: int, tiles: int) -> dict[str, float]:
    """Matmul flops of the prefill (`length` tokens, every key slot) and of the vision tower, whole model."""
    flat = flatten_paths(abstract_params(config, "bfloat16"))

    def params(prefix: str, skip: tuple[str, ...] = ()) -> int:
        return sum(math.prod(a.shape) for p, a in flat.items() if p.startswith(prefix) and p not in skip)

    t, v = config.text, config.vision
    text = (2 * params("text/layers") * batch * length + 2 * batch * t.hidden_size * t.vocab_size  # last logits
            + 4 * batch * length * length * t.num_heads * t.head_dim * t.num_layers)
    patches = v.grid * v.grid + 1
    vision = (2 * params("vision") * tiles * patches + 4 * tiles * patches**2 * v.hidden_size * v.num_layers
              + 2 * params("projector") * tiles * config.image_seq_length)
    return {"prefill": float(text), "vision": float(vision)}


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
    target: Target
    mesh: dict[str, int]
    batch: int
    context: int
    tiles: int
    dtype: str
    weights: int  # per chip
    cache: int  # per chip
    decode_reads: int  # weights one decode step reads (not the embedding table) + the cache, per chip
    programs: tuple[Program, ...]
    flops: dict[str, float]  # analytic, whole model

    @property
    def temp(self) -> int:
        return max(p.temp for p in self.programs)

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.temp

    @property
    def headroom(self) -> int:
        assert self.target.chip is not None
        return self.target.chip.hbm - self.total

    def roofline(self) -> dict[str, float]:
        """Seconds: a decode step from the bytes it must read, prefill and vision from their flops."""
        chip, chips = self.target.chip, math.prod(self.mesh.values())
        assert chip is not None
        out = {"decode_step": self.decode_reads / chip.bandwidth}
        out.update({k: f / chips / chip.bf16_flops for k, f in self.flops.items() if f})
        return out

    def as_dict(self) -> dict[str, Any]:
        chip = self.target.chip
        assert chip is not None
        return {"target": self.target.label, "chip": dataclasses.asdict(chip), "mesh": self.mesh,
                "batch": self.batch, "context": self.context, "tiles": self.tiles, "dtype": self.dtype,
                "per_chip_bytes": {"weights": self.weights, "kv_cache": self.cache, "xla_temp": self.temp,
                                   "total": self.total},
                "fits": self.headroom >= 0, "headroom_bytes": self.headroom,
                "programs": [dataclasses.asdict(p) for p in self.programs],
                "analytic_flops": self.flops, "roofline_seconds": self.roofline()}

    def report(self) -> str:
        chip = self.target.chip
        assert chip is not None
        lines = [f"{'weights':<12}{self.weights / GiB:10.2f} GiB per chip",
                 f"{'KV cache':<12}{self.cache / GiB:10.2f} GiB per chip",
                 f"{'XLA temp':<12}{self.temp / GiB:10.2f} GiB per chip (largest of the programs below)",
                 f"{'total':<12}{self.total / GiB:10.2f} GiB per chip of {chip.hbm / GiB:.1f} GiB ({chip.name})",
                 ("fits" if self.headroom >= 0 else "does NOT fit")
                 + f": {abs(self.headroom) / GiB:.2f} GiB {'to spare' if self.headroom >= 0 else 'short'}"]
        for p in self.programs:
            refused = "" if p.fits_alone else " (XLA refused it: more than the chip's HBM)"
            lines.append(f"{p.name:<12}compiled in {p.compile_s:6.1f} s; temp {p.temp / GiB:.2f} GiB, arguments "
                         f"{p.arguments / GiB:.2f} GiB{refused}")
        roof = self.roofline()
        lines.append(f"roofline    decode step {roof['decode_step'] * 1e3:.2f} ms (weights + cache / "
                     f"{chip.bandwidth / 1e9:.0f} GB/s), {self.batch / roof['decode_step']:.0f} tokens/s")
        for k in ("prefill", "vision"):
            if k in roof:
                lines.append(f"{'':<12}{k} {roof[k] * 1e3:.1f} ms (flops / {chip.bf16_flops / 1e12:.0f} TFLOPS)")
        return "\n".join(lines)


def compiled_plan(config: InternVLConfig, target: Target, mesh_sizes: Mapping[str, int], batch: int, context: int,
                  tiles: int, dtype: str = "bfloat16", quant: str | None = None) -> CompiledPlan:
    """Compile the vision tower (when `tiles`), the bucketed prefill and one decode step for a TPU or GPU target;
    `quant`: with the weights stored quantized."""
    mesh = target_mesh(target_devices(target), mesh_sizes, target.label)
    slots = bucket(context, 64)
    length = prompt_bucket(context)
    programs = []
    if tiles:
        programs.append(vision_program(config, mesh, tiles, dtype, quant))
    programs.append(prefill_program(config, mesh, batch, length, slots, dtype, quant))
    step = decode_bytes(config, mesh, batch, slots, dtype, quant)
    programs.append(step.program)
    return CompiledPlan(target, {a: n for a, n in mesh.shape.items()}, batch, context, tiles, dtype,
                        weights=bytes_of(abstract_params_on(config, mesh, dtype, quant)), cache=step.cache,
                        decode_reads=step.weights + step.cache, programs=tuple(programs),
                        flops=analytic_flops(config, batch, length, tiles))
