"""Continuous batching: a fixed number of decode slots in one static KV cache, refilled as requests finish.

The cache has `slots` rows of `cache_len` key slots each. A request goes through:
1. vision: its tiles through the tower, a group of up to `VISION_GROUP` tiles a unit of work;
2. prefill: its prompt in chunks of at most `chunk` tokens written straight into its slot's cache row (short
   prompts of several requests share one call), each chunk attending to the row's cache so far and itself;
3. decode: one program advances every busy slot by a token, each at its own position and with its own
   sampling settings and PRNG key; a slot whose request ends (an EOS id or max_new_tokens) is freed and the
   next request is admitted at once.
The host loop interleaves up to `ADMIT_UNITS` units of vision or prefill work with each decode call, so decoding
slots keep moving while a long prompt or a video is prefilled, and prefill memory follows the chunk, not the prompt.

Rows hold no padding: row r's tokens are at slots [0, length[r]) (`KVCache.slot` per row), its positions are
its slot indices, and attention reads each row's cache only up to the longest busy row (`model.attention`).
A request's greedy tokens equal `generate`'s for it alone (tests/test_slots.py).

Programs are compiled per shape, and the shapes are few: a prefill call has 1, 2, 4 or 8 rows of chunk/8,
chunk/4, chunk/2 or chunk tokens, at most `chunk` tokens in all (ten programs); vision per group size (1, 2, 4
tiles); decode per set of sampling features in use (greedy, top-k, ...). Nothing compiles after a warm-up (tests
count it).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from internvl_jax.engine import layer_loop
from internvl_jax.engine.generate import MIN_PROMPT_BUCKET, bucket, check_cache_fits, max_length
from internvl_jax.engine.sampling import RowSampling, SamplingConfig, choose_rows, features_of
from internvl_jax.engine.vision import VISION_GROUP
from internvl_jax.inputs import check_pixels, tokens_per_tile
from internvl_jax.model.attention import BLOCK, KeyMask
from internvl_jax.model.decoder import KVCache, rope_tables
from internvl_jax.model.internvl import InternVLModule, merge_image_features
from internvl_jax.sharding import cache_shardings

Params = dict[str, Any]

CHUNK = 512  # prompt tokens a prefill call writes: bounds prefill memory (scores, MLP activations)
EOS_WIDTH = 8  # EOS ids a request may give
# Units of admission work (a vision group or a prefill call) between two decode calls. One a call left 40% of
# the slots waiting (64 mixed requests, 16 slots: 9.6 busy a step on average), since a request needs two or three
# units; four keep them near full while a long prompt's chunks still alternate with decode steps.
ADMIT_UNITS = 4
# What one more prefill call costs, in padded tokens' worth (an estimate: a call reads every weight once and
# computes the head of each row, at the 1B shape on CPU about the time of 32 prompt tokens).
PIECE_COST = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """One prompt to answer: token ids [t], its tiles [n, 3, S, S] (or None) and its own generation settings."""

    id: Any
    ids: np.ndarray
    pixels: np.ndarray | None = None
    sampling: SamplingConfig = SamplingConfig()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Completion:
    """A finished request: its new tokens (ending with the EOS id when finish_reason is "eos"), or an error."""

    id: Any
    tokens: tuple[int, ...] = ()
    # "eos"; "length" (max_new_tokens); "cache" (the cache row filled first: --cache-len); None with an error
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    first_token_s: float | None = None  # from the start of the run to this request's first token
    seconds: float = 0.0  # from the start of the run to its end


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SlotState:
    """The decode slots' state on device, besides the cache (whose per-row `slot` is each row's length)."""

    logits: jax.Array  # [R, v] float32: scores of each row's next token
    keys: jax.Array  # [R, 2] uint32: each row's PRNG key
    count: jax.Array  # [R] int32: tokens generated
    limit: jax.Array  # [R] int32: max_new_tokens
    busy: jax.Array  # [R] bool: decoding
    eos: jax.Array  # [R, EOS_WIDTH] int32, -1 padded
    rows: RowSampling
    seen: jax.Array  # [R, v] bool: ids seen (repetition penalty)


# ----- programs -----
def _pick(st: SlotState, features: tuple[bool, bool, bool, bool]) -> tuple[SlotState, jax.Array, jax.Array]:
    """Choose every busy row's next token; returns the state (rows that just ended no longer busy), the tokens
    [R] and the rows that ended [R]."""
    tok, keys = choose_rows(st.logits, st.keys, st.rows, st.seen, features)
    tok = jnp.where(st.busy, tok, 0)
    count = st.count + st.busy
    ended = st.busy & (jnp.any(tok[:, None] == st.eos, axis=1) | (count >= st.limit))
    seen = st.seen
    if features[3]:
        seen = seen.at[jnp.arange(tok.shape[0]), tok].max(st.busy)
    keys = jnp.where(st.busy[:, None], keys, st.keys)
    return dataclasses.replace(st, keys=keys, count=count, busy=st.busy & ~ended, seen=seen), tok, ended


def _step_mask(lengths: jax.Array, slots: int) -> KeyMask:
    """One token of every row at slot lengths[r], seeing the row's cache below it."""
    return KeyMask(lengths, jnp.arange(slots)[None, :] < lengths[:, None], jnp.ones((lengths.shape[0], 1), bool))


def _keep(cache: KVCache, sharding: KVCache | None) -> KVCache:
    """The cache as it came in: split as the rules table says (on a mesh), never left to XLA's choice."""
    return cache if sharding is None else jax.lax.with_sharding_constraint(cache, sharding)


@functools.lru_cache(maxsize=32)
def _decode_fn(module: InternVLModule, features: tuple[bool, bool, bool, bool], steps: int,
               sharding: KVCache | None) -> Callable:
    """Up to `steps` decode steps on device; stops early once a row ends (its slot is then refilled)."""
    def decode(params, cache: KVCache, st: SlotState):
        r, slots = cache.slot.shape[0], cache.k.shape[2]

        def cond(carry):
            _, st, _, ended, i = carry
            return (i < steps) & ~jnp.any(ended) & jnp.any(st.busy)

        def body(carry):
            cache, st, out, ended, i = carry
            st, tok, ended = _pick(st, features)
            lengths = cache.slot[:r]
            logits, cache = module.apply({"params": params}, tok[:, None], None, lengths[:, None],
                                         _step_mask(lengths, slots), cache)
            cache = cache._replace(slot=cache.slot.at[:r].add(st.busy))
            st = dataclasses.replace(st, logits=logits[:, -1])
            return cache, st, out.at[:, i].set(tok), ended, i + 1

        out = jnp.zeros((r, steps), jnp.int32)
        cache, st, out, ended, n = jax.lax.while_loop(
            cond, body, (cache, st, out, jnp.zeros((r,), bool), jnp.int32(0)))
        return _keep(cache, sharding), st, out, n, ended

    return jax.jit(decode, donate_argnums=(1, 2))


@functools.lru_cache(maxsize=8)
def _prefill_fn(module: InternVLModule, sharding: KVCache | None) -> Callable:
    """A chunk of n rows' prompts (right padded to one length L) into cache rows `rows` from slot `starts` on;
    returns the cache and each row's scores after its last real token. `features` [n * L, d] holds the image
    features of each row's image tokens in place (zeros elsewhere; a text-only chunk passes zeros)."""

    def prefill(params, cache: KVCache, ids, valid, rows, starts, features):
        n, length = ids.shape
        lengths = valid.sum(axis=1).astype(jnp.int32)
        slots = cache.k.shape[2]
        mask = KeyMask(starts, jnp.arange(slots)[None, :] < starts[:, None], valid)
        positions = starts[:, None] + jnp.arange(length)[None, :]
        in_place = jnp.arange(n * length, dtype=jnp.int32).reshape(n, length)

        def run(m: InternVLModule):
            x = merge_image_features(m.text.embed(ids), ids, features, m.cfg.image_token_id, in_place)
            hidden, new_cache = m.text(x, positions, mask, cache, rows)
            last = hidden[jnp.arange(n), jnp.maximum(lengths - 1, 0)][:, None]
            return m.text.logits(last)[:, 0].astype(jnp.float32), new_cache

        logits, cache = module.apply({"params": params}, method=run)
        cache = cache._replace(slot=cache.slot.at[rows].set(starts + lengths))
        return _keep(cache, sharding), logits

    return jax.jit(prefill, donate_argnums=(1,))


@functools.lru_cache(maxsize=8)
def _vision_fn(module: InternVLModule) -> Callable:
    return jax.jit(lambda params, px: module.apply({"params": params}, px, method=InternVLModule.image_features))


@functools.lru_cache(maxsize=8)
def _insert_fn() -> Callable:
    """A request's first scores and settings into decode row `row`."""

    def insert(st: SlotState, row, logits, key, limit, eos, values, seen):
        rows = RowSampling(*(getattr(st.rows, f.name).at[row].set(v)
                             for f, v in zip(dataclasses.fields(RowSampling), values, strict=True)))
        return SlotState(logits=st.logits.at[row].set(logits), keys=st.keys.at[row].set(key),
                         count=st.count.at[row].set(0), limit=st.limit.at[row].set(limit),
                         busy=st.busy.at[row].set(True), eos=st.eos.at[row].set(eos), rows=rows,
                         seen=st.seen.at[row].set(seen))

    return jax.jit(insert, donate_argnums=(0,))


@functools.lru_cache(maxsize=32)
def _begin_fn(module: InternVLModule, features: tuple[bool, bool, bool, bool]) -> Callable:
    """The host layer loop's first program of a step: choose, embed, RoPE tables and mask."""

    def begin(text: Params, st: SlotState, lengths, slots: int):
        st, tok, ended = _pick(st, features)
        x = module.apply({"params": {"text": text}}, tok[:, None], method=lambda m, t: m.text.embed(t))
        stop = jnp.any(ended) | ~jnp.any(st.busy)  # read by the host without waiting for the step's layers
        return st, tok, ended, stop, x, rope_tables(module.cfg.text, lengths[:, None]), _step_mask(lengths, slots)

    return jax.jit(begin, donate_argnums=(1,), static_argnums=(3,))


@functools.lru_cache(maxsize=8)
def _end_fn(module: InternVLModule) -> Callable:
    def end(text: Params, st: SlotState, x, cache_slot):
        logits = module.apply({"params": {"text": text}}, x,
                              method=lambda m, h: m.text.logits(m.text.final_norm(h)).astype(jnp.float32))
        r = st.busy.shape[0]
        return dataclasses.replace(st, logits=logits[:, -1]), cache_slot.at[:r].add(st.busy)

    return jax.jit(end, donate_argnums=(1,))


# ----- the host side -----
@dataclasses.dataclass
class EngineStats:
    """Where the engine's last `run` spent its time (seconds of each kind of device call, the host waiting on
    each) and how full the decode steps were: slot_steps / decode_steps is the mean number of busy slots a step."""

    vision_s: float = 0.0
    vision_calls: int = 0
    prefill_s: float = 0.0
    prefill_calls: int = 0
    prefill_tokens: int = 0  # rows x row length of the calls, padding included
    decode_s: float = 0.0
    decode_steps: int = 0
    slot_steps: int = 0


@dataclasses.dataclass
class _Job:
    """A request between admission and its first decode step."""

    request: Request
    row: int
    features: list[jax.Array]  # computed groups of its image features
    groups: list[np.ndarray]  # tile groups still to run through the vision tower
    done: int = 0  # prompt tokens written to the cache
    first: float | None = None

    @property
    def remaining(self) -> int:
        return len(self.request.ids) - self.done


@dataclasses.dataclass
class _Active:
    request: Request
    tokens: list[int]
    first: float | None = None


class SlotEngine:
    """Serve requests through `slots` decode slots of a static cache of `cache_len` slots each.

    `run(requests)` yields a `Completion` per request in completion order; a request that cannot be served
    (too long for the cache, too many tiles, a bad setting) yields one with `error` and costs nothing else."""

    def __init__(self, module: InternVLModule, params: Params, *, slots: int = 16, cache_len: int = 4096,
                 chunk: int = CHUNK, max_tiles: int = 64, mesh: Mesh | None = None, decode_steps: int = 8):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if chunk < MIN_PROMPT_BUCKET or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two >= {MIN_PROMPT_BUCKET}, got {chunk}")
        self.module, self.params, self.mesh = module, params, mesh
        self.cfg = module.cfg
        self.slots, self.chunk, self.max_tiles, self.decode_steps = slots, chunk, max_tiles, decode_steps
        # A multiple of the chunk (a chunk never runs past the end) and of the attention block.
        unit = math.lcm(chunk, min(BLOCK, bucket(cache_len)))
        self.cache_len = -(-cache_len // unit) * unit
        # Row lengths of a prefill call (rows = chunk / length): chunk/8 .. chunk, at least the smallest bucket.
        self.lengths = sorted({max(chunk // (1 << i), MIN_PROMPT_BUCKET) for i in range(4)})
        self.host_layers = layer_loop.host_layers(module, params) if mesh is None else None
        self._text = layer_loop.text_params(params) if self.host_layers else None
        self.room = min(self.cache_len, max_length(self.cfg))  # slots a request's prompt + answer may fill
        self.cache: KVCache | None = None
        self.state: SlotState | None = None
        self.sharding = None if mesh is None else cache_shardings(self.cfg, mesh, slots, self.cache_len,
                                                                   module.cache_dtype)
        self.busy = 0  # slots decoding or being prefilled (for progress reports)
        self.stats = EngineStats()

    # -- validation: every problem becomes that request's error --
    def check(self, req: Request) -> str | None:
        ids = np.asarray(req.ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            return f"prompt must be a non-empty 1-D array of token ids, got {ids.dtype} {ids.shape}"
        vocab = self.cfg.text.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            return f"prompt holds ids outside [0, {vocab}): min {ids.min()}, max {ids.max()}"
        try:
            req.sampling.check()
        except ValueError as e:
            return str(e)
        if len(ids) >= self.room:
            return (f"prompt of {len(ids)} tokens does not fit the {self.room} slots a request may use "
                    "(--cache-len / the model's maximum length), with room for one new token")
        if len(req.sampling.eos_token_id) > EOS_WIDTH:
            return f"{len(req.sampling.eos_token_id)} EOS ids given, at most {EOS_WIDTH} are supported"
        n_image = int((ids == self.cfg.image_token_id).sum())
        if req.pixels is None:
            return f"prompt holds {n_image} image tokens but no pixel values were given" if n_image else None
        try:
            px = check_pixels(self.cfg, req.pixels, self.module.param_dtype)
        except ValueError as e:
            return str(e)
        if px.shape[0] > self.max_tiles:
            return f"{px.shape[0]} tiles exceed the engine's limit of {self.max_tiles} per request (max_tiles)"
        per = tokens_per_tile(self.cfg, px.shape[-1])
        if n_image != px.shape[0] * per:
            return (f"prompt holds {n_image} image tokens (id {self.cfg.image_token_id}) but pixel values have "
                    f"{px.shape[0]} tiles x {per} tokens = {px.shape[0] * per}")
        return None

    # -- device state --
    def _allocate(self) -> None:
        if self.cache is not None:
            return
        r, v, dtype = self.slots, self.cfg.text.vocab_size, self.module.cache_dtype
        check_cache_fits(self.cfg, r, self.cache_len, dtype)
        shape = KVCache.abstract(self.cfg.text, r, self.cache_len, dtype, per_row=True)
        if self.mesh is None:
            self.cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
        else:  # allocated in place, split as the rules table says
            self.cache = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape),
                                 out_shardings=self.sharding)()
        self.state = SlotState(logits=jnp.zeros((r, v), jnp.float32), keys=jnp.zeros((r, 2), jnp.uint32),
                               count=jnp.zeros((r,), jnp.int32), limit=jnp.zeros((r,), jnp.int32),
                               busy=jnp.zeros((r,), bool), eos=jnp.full((r, EOS_WIDTH), -1, jnp.int32),
                               rows=RowSampling.idle(r), seen=jnp.zeros((r, v), bool))

    # -- units of work --
    def _vision(self, job: _Job) -> None:
        group = job.groups.pop(0)
        t = time.perf_counter()
        job.features.append(jax.block_until_ready(_vision_fn(self.module)(self.params, jnp.asarray(group))))
        self.stats.vision_s += time.perf_counter() - t
        self.stats.vision_calls += 1

    def _prefill(self, jobs: list[_Job]) -> list[tuple[_Job, jax.Array]]:
        """One prefill call over `jobs` (their next chunks); returns the jobs whose prompt is now complete, with
        their scores. Rows and row length are bucketed (a power of two of rows, L from `self.lengths`, rows x L
        at most `chunk`), so that a run compiles at most ten prefill programs whatever its prompts."""
        pieces = [self._piece(j.remaining) for j in jobs]
        takes = [take for take, _ in pieces]
        length = max(L for _, L in pieces)
        n = bucket(len(jobs))
        d = self.cfg.text.hidden_size
        ids = np.zeros((n, length), np.int32)
        valid = np.zeros((n, length), bool)
        rows = np.zeros((n,), np.int32)
        starts = np.zeros((n,), np.int32)
        features = []
        for i, (job, take) in enumerate(zip(jobs, takes, strict=True)):
            part = np.asarray(job.request.ids[job.done: job.done + take])
            ids[i, :take], valid[i, :take], rows[i], starts[i] = part, True, job.row, job.done
            if job.request.pixels is None:
                features.append(jnp.zeros((length, d), self.module.param_dtype))
                continue
            # This chunk's image tokens take the request's feature rows from the count of image tokens before it.
            is_image = part == self.cfg.image_token_id
            before = int((np.asarray(job.request.ids[: job.done]) == self.cfg.image_token_id).sum())
            index = np.zeros((length,), np.int32)
            index[:take] = np.where(is_image, before + np.cumsum(is_image) - 1, 0)
            if len(job.features) > 1:
                job.features = [jnp.concatenate(job.features)]
            flat = job.features[0]
            features.append(jnp.take(flat.reshape(-1, d), jnp.asarray(index), axis=0).astype(self.module.param_dtype))
        # Padding rows repeat the first row: they write the same keys to the same place, harmlessly.
        for a in (ids, valid, rows, starts):
            a[len(jobs):] = a[0]
        features += features[:1] * (n - len(jobs))
        t = time.perf_counter()
        self.cache, logits = jax.block_until_ready(_prefill_fn(self.module, self.sharding)(
            self.params, self.cache, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(rows), jnp.asarray(starts),
            jnp.concatenate(features)))
        self.stats.prefill_s += time.perf_counter() - t
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += n * length
        complete = []
        for i, (job, take) in enumerate(zip(jobs, takes, strict=True)):
            job.done += take
            if job.remaining == 0:
                complete.append((job, logits[i]))
        return complete

    def _insert(self, job: _Job, logits: jax.Array) -> None:
        s = job.request.sampling
        eos = np.full((EOS_WIDTH,), -1, np.int32)
        eos[: len(s.eos_token_id)] = s.eos_token_id
        seen = np.zeros((self.cfg.text.vocab_size,), bool)
        if s.repetition_penalty != 1.0:  # transformers penalises every id of the prompt
            seen[np.asarray(job.request.ids)] = True
        values = tuple(np.asarray(x, dt) for x, dt in zip(
            RowSampling.values(s), (bool, np.float32, np.int32, np.float32, np.float32), strict=True))
        self.state = _insert_fn()(self.state, np.int32(job.row), logits, np.asarray(jax.random.PRNGKey(s.seed)),
                                  np.int32(self.new_tokens(job.request)), eos, values, seen)

    def new_tokens(self, req: Request) -> int:
        """The request's answer length limit: max_new_tokens, or fewer when the cache row fills first (its
        answer then ends with finish_reason "cache", as vLLM's end at max_model_len)."""
        return min(req.sampling.max_new_tokens, self.room - len(req.ids))

    def _decode(self, features: tuple[bool, bool, bool, bool]) -> tuple[np.ndarray, np.ndarray]:
        """Decode steps until a row ends (at most `decode_steps`): tokens [R, n] and the rows that ended [R]."""
        if self.host_layers is None:
            self.cache, self.state, out, n, ended = _decode_fn(self.module, features, self.decode_steps,
                                                               self.sharding)(
                self.params, self.cache, self.state)
            return np.asarray(out)[:, : int(n)], np.asarray(ended)
        # One CPU device: the layers run from the host on views of the stacked weights (engine/layer_loop.py).
        begin, end = _begin_fn(self.module, features), _end_fn(self.module)
        r, slots = self.slots, self.cache_len
        toks, k, v, slot = [], self.cache.k, self.cache.v, self.cache.slot
        for _ in range(self.decode_steps):
            lengths = slot[:r]
            self.state, tok, ended, stop, x, rope, mask = begin(self._text, self.state, lengths, slots)
            x, k, v = self.host_layers(x, rope, mask, k, v, lengths)
            self.state, slot = end(self._text, self.state, x, slot)
            toks.append(tok)
            if bool(stop):
                break
        self.cache = KVCache(k, v, slot)
        return np.stack([np.asarray(t) for t in toks], axis=1), np.asarray(ended)

    # -- the loop --
    def run(self, requests: Iterable[Request]) -> Iterator[Completion]:
        start = time.perf_counter()
        self.stats = EngineStats()  # this run's, not the sum of every run on the engine
        pending: collections.deque[Request] = collections.deque()
        source = iter(requests)
        free = list(range(self.slots))[::-1]
        jobs: list[_Job] = []
        active: dict[int, _Active] = {}

        def elapsed() -> float:
            return time.perf_counter() - start

        def refill() -> Iterator[Completion]:
            while len(pending) < self.slots:
                req = next(source, None)
                if req is None:
                    return
                error = self.check(req)
                if error is not None:
                    yield Completion(id=req.id, error=error, prompt_tokens=int(np.size(req.ids)),
                                     seconds=elapsed())
                    continue
                pending.append(req)

        self._allocate()
        yield from refill()
        while pending or jobs or active:
            while free and pending:
                req = pending.popleft()
                px = None if req.pixels is None else check_pixels(self.cfg, req.pixels, self.module.param_dtype)
                jobs.append(_Job(req, free.pop(), [], _tile_groups(px)))
                yield from refill()
            for _ in range(ADMIT_UNITS):
                ready = [j for j in jobs if not j.groups]
                vision = next((j for j in jobs if j.groups), None)
                if ready:  # a prompt whose features are in goes first: it fills a slot soonest
                    for job, logits in self._prefill(self._pack(ready)):
                        jobs.remove(job)
                        self._insert(job, logits)
                        active[job.row] = _Active(job.request, [])
                elif vision is not None:
                    self._vision(vision)
                else:
                    break
            self.busy = len(active) + len(jobs)
            if active:
                busy = [a.request.sampling for a in active.values()]
                features = tuple(any(f) for f in zip(*(features_of(s) for s in busy), strict=True))
                began = elapsed()
                tokens, ended = self._decode(features)
                now = elapsed()
                self.stats.decode_s += now - began
                self.stats.decode_steps += tokens.shape[1]
                self.stats.slot_steps += tokens.shape[1] * len(active)
                for row, act in list(active.items()):
                    take = tokens[row]  # a call stops at the step a row ends: its last token is that row's last
                    if act.first is None and len(take):
                        act.first = now
                    act.tokens.extend(int(t) for t in take)
                    if ended[row]:
                        del active[row]
                        free.append(row)
                        yield _completion(act, now, self.new_tokens(act.request))
                yield from refill()

    def _pack(self, ready: list[_Job]) -> list[_Job]:
        """The prefill call's jobs: the first ready one, and the next ones whose next piece has the same row
        length, while rows x length stays within a chunk."""
        length = self._piece(ready[0].remaining)[1]
        pack = [ready[0]]
        for job in ready[1:]:
            if len(pack) == self.chunk // length:
                break
            if self._piece(job.remaining)[1] == length:
                pack.append(job)
        return pack

    def _piece(self, remaining: int) -> tuple[int, int]:
        """(tokens, row length) of a prompt's next prefill piece: a chunk while more than a chunk is left, else
        the split of the rest into row lengths that pads least (a call costing `PIECE_COST` tokens more): 300
        tokens go as 256 + 64 (20 padded), not as one 512 (212 padded)."""
        if remaining >= self.chunk:
            return self.chunk, self.chunk
        return _split(remaining, tuple(self.lengths))[1]


@functools.lru_cache(maxsize=4096)
def _split(remaining: int, lengths: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
    """The least cost (padded tokens + `PIECE_COST` a call) of prefilling `remaining` tokens in pieces of the row
    `lengths`, and the first piece (tokens, length)."""
    length = next(L for L in lengths if L >= remaining)
    best = (length + PIECE_COST, (remaining, length))
    for smaller in reversed(lengths):  # on a tie, the larger piece first
        if smaller >= remaining:
            continue
        cost = smaller + PIECE_COST + _split(remaining - smaller, lengths)[0]
        if cost < best[0]:
            best = (cost, (smaller, smaller))
    return best


def _completion(act: _Active, now: float, limit: int) -> Completion:
    s = act.request.sampling
    if act.tokens and act.tokens[-1] in s.eos_token_id:
        reason = "eos"
    else:
        reason = "length" if limit == s.max_new_tokens else "cache"
    return Completion(id=act.request.id, tokens=tuple(act.tokens), finish_reason=reason,
                      prompt_tokens=len(act.request.ids), first_token_s=act.first, seconds=now)


def _tile_groups(pixels: np.ndarray | None) -> list[np.ndarray]:
    """A request's tiles in vision passes of `VISION_GROUP` (the last one padded with zero tiles, whose features
    are never used); fewer tiles make one pass of the next power of two."""
    if pixels is None:
        return []
    n = pixels.shape[0]
    size = min(VISION_GROUP, bucket(n))
    groups = []
    for lo in range(0, n, size):
        g = pixels[lo: lo + size]
        if g.shape[0] < size:
            g = np.concatenate([g, np.zeros((size - g.shape[0], *g.shape[1:]), g.dtype)])
        groups.append(g)
    return groups
