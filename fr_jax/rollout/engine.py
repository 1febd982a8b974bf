"""The JAX generation engine: decode slots filled continuously, chunked prefill, and a prefix cache.

How requests move through it (one `step()` at a time, on one thread):
- **waiting**: requests queue per owner (one HTTP call, one `generate()`); a new prefill group takes one request
  from each owner in turn (round-robin across groups too), so a request's wait does not grow with another
  owner's batch. A request is its n samples: one prefill, n decode rows.
- **prefill**: the group's distinct prompts are prefilled into their own cache, at most `chunked_prefill_size`
  tokens per step, so a long prompt never stalls the rows that are decoding for more than one chunk. A prompt
  starts from the K/V of its longest cached block-aligned prefix (fr_jax.rollout.prefix_cache); the new full
  blocks are saved to the pool afterwards. Prompts that would prefill the same uncached blocks are not put in one
  group: the later one waits a step and then finds those blocks cached (SGLang's in-batch prefix caching).
- **decode**: a finished group's rows are copied into free slots of the decode cache, and all slots decode
  `chunk_steps` tokens per step inside one jitted while_loop (rows at different lengths: per-row cache slots
  and positions). Between chunks, finished rows leave, their slots take new rows, and the host checks stop
  strings. The loop ends early when a row finishes and requests are waiting.
- **static** scheduling (`scheduling="static"`, the baseline): a new batch starts only when the previous one has
  ended completely, and finished rows keep their slots until then, as a plain batched generate does.

Shapes: the decode cache is [rows, kv_heads, length, head_dim] per layer, rows and length rounded up to powers of
two (rows cover the live rows, length what they fill by the end of the next chunk: attention reads the whole
length at every step); it grows when rows need more and shrinks (live rows moved to the front) when rows leave.
Prefill groups, chunk sizes and pool transfers are bucketed the same way. So each program compiles once per bucket
combination, a bounded number, and a workload that repeats compiles nothing more (`compiles` counts them; each
compile is logged). No shape depends on data: it runs on TPU.

Log-prob convention (shared with the GRPO trainer): see fr_jax.rollout.sampling. The engine returns the log-prob of
each generated token under log_softmax(logits / temperature), before top-k/top-p/min-p filtering, in float32.
Seeds: a request's seed s gives sample j the key fold_in(key(s), j), advanced per token by fold_in(., i) for its
i-th generated token: the stream depends only on (s, j), never on the slot, the batch or the arrival order.
(SGLang's sampling_seed instead gives all n samples the same stream.) Token-based stops (EOS and stop_token_ids)
are all disabled by ignore_eos, as in SGLang; stop strings still apply.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import CACHE_AXES, Decoder, KVCache
from fr_jax.parallel.rules import constrain, named_sharding
from fr_jax.rollout.prefix_cache import PrefixCache
from fr_jax.rollout.sampling import sample_tokens

_log = logging.getLogger(__name__)

RUNNING, STOP_TOKEN, LENGTH = 0, 1, 2
_MIN_CHUNK = 16  # prefill tokens per prompt per step, at least
_DEFER_TOKENS = 64  # a prompt waits a step for another to cache the blocks they share when they are this many


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling settings (SGLang's names and defaults; top_k -1 = off, temperature 0 = greedy)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.top_k == -1 or self.top_k >= 1):
            problems.append(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if any(s == "" for s in self.stop):
            problems.append("stop strings must be non-empty")
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    options: SamplingOptions = SamplingOptions()
    n: int = 1


@dataclasses.dataclass
class Completion:
    """One sample: the generated ids (a matched stop token included), their log-probs and why generation ended.

    finish_reason is SGLang's dict: {"type": "stop", "matched": token id or stop string},
    {"type": "length", "length": number of generated tokens} or {"type": "abort", "message": why}; None in the
    progress of a sample still generating.
    cached_tokens: prompt tokens whose K/V this sample reused instead of computing (SGLang's meta_info field).
    """

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: dict | None
    prompt_tokens: int
    weight_version: str  # the weights that generated it
    cached_tokens: int = 0


@dataclasses.dataclass(eq=False)
class Sample:
    """One sample of a request as it moves through the engine; `output_ids` grows a decode chunk at a time."""

    prompt: tuple[int, ...]
    options: SamplingOptions
    index: int  # j: its place among the request's n samples (folded into its random key)
    seed: int
    owner: Hashable
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: dict | None = None
    cached_tokens: int = 0
    weight_version: str = ""
    stop_checked: int = 0  # output tokens already searched for stop strings

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def completion(self) -> Completion:
        """Its completion so far (copies: the sample keeps growing; finish_reason None while it runs)."""
        return Completion(
            list(self.output_ids),
            list(self.logprobs),
            self.finish_reason,
            len(self.prompt),
            self.weight_version,
            self.cached_tokens,
        )


class RowInputs(NamedTuple):
    """Per decode slot, uploaded with every chunk (empty slots: finish != RUNNING)."""

    current: jax.Array  # int32 [R] the token fed at the next step
    position: jax.Array  # int32 [R] its cache slot and RoPE position
    generated: jax.Array  # int32 [R] tokens generated so far (the step of its random stream)
    finish: jax.Array  # int32 [R] RUNNING / STOP_TOKEN / LENGTH
    seeds: jax.Array
    samples: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    max_new: jax.Array
    stop_ids: jax.Array  # int32 [R, S], -1 padded


class _Decoding(NamedTuple):
    """The carry of the decode loop."""

    cache: KVCache
    current: jax.Array
    position: jax.Array
    generated: jax.Array
    finish: jax.Array
    tokens: jax.Array  # int32 [R, chunk] this chunk's tokens, by step
    logprobs: jax.Array  # float32 [R, chunk]
    step: jax.Array
    any_finished: jax.Array  # bool: a row finished during this chunk


@dataclasses.dataclass(eq=False)
class _Request:
    """A queued request: its prompt and the samples not yet admitted."""

    prompt: tuple[int, ...]
    samples: list[Sample]


@dataclasses.dataclass(eq=False)
class _Prompt:
    """One distinct prompt of a prefill group: where its K/V comes from and which samples decode from it."""

    tokens: tuple[int, ...]
    samples: list[Sample]
    cached: int  # leading tokens whose K/V comes from the prefix cache
    pool_blocks: list[int]

    @property
    def kv_len(self) -> int:  # the prefill computes K/V for every prompt token but the last (the first decode feeds it)
        return len(self.tokens) - 1


@dataclasses.dataclass(eq=False)
class _Group:
    prompts: list[_Prompt]
    chunk: int  # prompt tokens per prompt per step
    chunks: int
    length: int  # the group cache's length
    cache: KVCache
    done: int = 0  # chunks run


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


class Engine:
    """Generates from token ids with a Decoder's parameters under `mesh`.

    Two ways to use it: `generate(requests)` runs them to the end (tests, benchmarks, the trainer's checks), or a
    serving thread calls `submit()` and `step()` (fr_jax.rollout.scheduler). `step`, `abort`, `flush_cache` and
    `swap_state` belong to that one thread; `submit`, `check` and the counters are safe from any thread.

    eos_token_ids: the model's end-of-sequence ids (a token-based stop unless ignore_eos).
    detokenize: ids -> text, needed only for stop strings.
    max_seq_len: prompt + generation limit (default: the config's max_position_embeddings).
    max_running_requests: decode slots (samples decoding at once).
    chunk_steps: decode steps per chunk (new rows join and stop strings are checked between chunks). A request
        that arrives mid-chunk waits for its end, hence a short default (the README measures 4 against 16).
    chunked_prefill_size: prompt tokens prefilled per step, over all prompts of a group.
    prefix_cache_tokens: size of the prefix cache's K/V pool in tokens (0: off).
    scheduling: "continuous" or "static" (see the module docstring).
    """

    def __init__(
        self,
        model: Decoder,
        *,
        mesh,
        eos_token_ids: Sequence[int] = (),
        detokenize: Callable[[list[int]], str] | None = None,
        max_seq_len: int | None = None,
        max_running_requests: int = 64,
        chunk_steps: int = 4,
        chunked_prefill_size: int = 512,
        prefix_cache_tokens: int = 8192,
        prefix_block: int = 16,
        scheduling: Literal["continuous", "static"] = "continuous",
        min_rows_bucket: int = 4,
        min_length_bucket: int = 64,
        seed: int = 0,
        weight_version: str = "default",
    ):
        if scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling={scheduling!r}: expected 'continuous' or 'static'")
        for name, value in (
            ("max_running_requests", max_running_requests),
            ("chunk_steps", chunk_steps),
            ("prefix_block", prefix_block),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if chunked_prefill_size < _MIN_CHUNK:
            raise ValueError(f"chunked_prefill_size must be >= {_MIN_CHUNK}, got {chunked_prefill_size}")
        self.cfg: ModelConfig = model.cfg
        self.mesh = mesh
        self._served = self._param_specs(model)
        self.graphdef, self.state = nnx.split(model.unstacked())
        self.weight_version = weight_version
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.detokenize = detokenize
        self.max_seq_len = int(max_seq_len or self.cfg.max_position_embeddings)
        self.max_running_requests = max_running_requests
        self.chunk_steps = chunk_steps
        self.chunked_prefill_size = chunked_prefill_size
        self.scheduling = scheduling
        self.min_rows_bucket = min_rows_bucket
        self.min_length_bucket = min_length_bucket
        self.prefix = PrefixCache(prefix_cache_tokens // prefix_block, prefix_block)
        self._rng = np.random.default_rng(seed)
        self._queue_lock = threading.Lock()
        self._waiting: collections.OrderedDict[Hashable, collections.deque[_Request]] = collections.OrderedDict()
        self._owners = itertools.count()
        self.admitting = True  # False: requests wait in the queue (a weight update drains the engine)
        self._group: _Group | None = None
        self._slots: list[Sample | None] = []
        self._cache: KVCache | None = None
        self._pool: KVCache | None = None
        self.compiles = 0
        self.compile_seconds = 0.0  # the calls that compiled, compile included
        self.steps = 0
        self.prefill_seconds = 0.0  # forming groups, their prefill chunks, prefix-cache transfers, copies into slots
        self._prefill = jax.jit(self._prefill_fn, static_argnums=(4,), donate_argnums=(1,))
        self._assemble = jax.jit(self._assemble_fn, static_argnums=(1,))
        self._zeros = jax.jit(self._zeros_fn, static_argnums=(0, 1))
        self._save = jax.jit(self._save_fn, donate_argnums=(0,))
        self._insert = jax.jit(self._insert_fn, donate_argnums=(0,))
        self._relayout = jax.jit(self._relayout_fn, static_argnums=(2,))
        self._decode = jax.jit(self._decode_fn, static_argnums=(3,), donate_argnums=(1,))

    # ------------------------------------------------------------------------------------------ weights

    @staticmethod
    def _param_specs(model: Decoder) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {
            ".".join(map(str, path)): (var.get_value().shape, var.get_value().dtype)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
        }

    def swap_state(self, model: Decoder, weight_version: str | None = None) -> None:
        """Serve `model`'s parameters from the next step on; their names, shapes and dtypes must equal the current
        ones. The engine takes `model`'s arrays over (they are unstacked in place: `model` is unusable afterwards),
        so a swap holds two copies of the weights at most. The prefix cache is emptied: its K/V came from the old
        weights. Call it between steps; rows still decoding would continue on the new weights."""
        new = self._param_specs(model)
        if new.keys() != self._served.keys():
            missing, extra = sorted(self._served.keys() - new.keys()), sorted(new.keys() - self._served.keys())
            raise ValueError(f"new parameters do not match the served model: missing {missing}, unexpected {extra}")
        for name, (shape, dtype) in self._served.items():
            if new[name] != (shape, dtype):
                raise ValueError(
                    f"parameter {name}: served {dtype}{list(shape)}, new {new[name][1]}{list(new[name][0])}"
                )
        self.state = nnx.split(model.unstacked(consume=True))[1]
        self.flush_cache()
        if weight_version is not None:
            self.weight_version = weight_version

    def flush_cache(self) -> None:
        """Empty the prefix cache and free its pool (SGLang's /flush_cache); the next save allocates it again."""
        self.prefix.clear()
        self._pool = None

    # ------------------------------------------------------------------------------------- jitted programs

    def _kv_shape(self, rows: int, length: int) -> tuple[int, int, int, int]:
        return (rows, self.cfg.num_key_value_heads, length, self.cfg.head_dim)

    def _zeros_fn(self, rows: int, length: int) -> KVCache:
        def zeros():
            return constrain(jnp.zeros(self._kv_shape(rows, length), self.cfg.dtype), CACHE_AXES)

        layers = range(self.cfg.num_hidden_layers)
        return KVCache(tuple(zeros() for _ in layers), tuple(zeros() for _ in layers))

    def _assemble_fn(self, pool: KVCache, length: int, table) -> KVCache:
        """A group cache [G, K, length, D] starting with the pool blocks table [G, blocks] (the rest zeros)."""

        def gather(blocks):  # [pool, K, B, D] -> [G, K, blocks * B, D]
            g, n = table.shape
            x = jnp.take(blocks, table.reshape(-1), axis=0).reshape(g, n, *blocks.shape[1:])
            x = x.transpose(0, 2, 1, 3, 4).reshape(g, blocks.shape[1], n * blocks.shape[2], blocks.shape[3])
            full = jnp.zeros(self._kv_shape(g, length), blocks.dtype).at[:, :, : x.shape[2]].set(x)
            return constrain(full, CACHE_AXES)

        return jax.tree.map(gather, pool)

    def _prefill_fn(self, state, cache: KVCache, ids, starts, window: int) -> KVCache:
        """K/V of ids [G, C] written from each prompt's own start slot (no logits: nothing uses them). Attention
        reads only the first `window` slots, which hold every write of this chunk."""
        model = nnx.merge(self.graphdef, state)
        positions = starts[:, None] + jnp.arange(ids.shape[1], dtype=jnp.int32)
        head = jax.tree.map(lambda x: x[:, :, :window], cache)
        _, head = model.decode(ids, positions, head, starts, jnp.ones((ids.shape[0], window), bool))
        return jax.tree.map(lambda x, h: jax.lax.dynamic_update_slice(x, h, (0, 0, 0, 0)), cache, head)

    def _save_fn(self, pool: KVCache, cache: KVCache, rows, starts, blocks) -> KVCache:
        """Copy block-sized slices cache[rows[i], :, starts[i]:] into pool[blocks[i]] (out-of-range: skipped)."""
        size = pool.k[0].shape[2]

        def save(p, c):
            pieces = jax.vmap(lambda r, s: jax.lax.dynamic_slice(c[r], (0, s, 0), (c.shape[1], size, c.shape[3])))(
                rows, starts
            )
            return p.at[blocks].set(pieces, mode="drop")

        return jax.tree.map(save, pool, cache)

    def _insert_fn(self, cache: KVCache, group: KVCache, slots, rows) -> KVCache:
        """Decode slots `slots` take group rows `rows` (out-of-range slots: skipped)."""
        length = min(cache.k[0].shape[2], group.k[0].shape[2])

        def insert(c, g):
            return constrain(c.at[slots, :, :length].set(g[rows, :, :length], mode="drop"), CACHE_AXES)

        return jax.tree.map(insert, cache, group)

    def _relayout_fn(self, cache: KVCache, row_map, length: int) -> KVCache:
        """Slot i of the new cache is old slot row_map[i]; the length is cut or zero-padded to `length`."""

        def move(x):
            x = jnp.take(x, row_map, axis=0)[:, :, :length]
            x = jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))
            return constrain(x, CACHE_AXES)

        return jax.tree.map(move, cache)

    def _decode_fn(self, state, cache: KVCache, rows: RowInputs, chunk: int, stop_on_finish) -> _Decoding:
        """Decode every running slot for `chunk` steps, until all are done or (stop_on_finish) one finished."""
        model = nnx.merge(self.graphdef, state)  # closed over: the loop carries only what changes
        num_rows = rows.current.shape[0]
        keys = jax.vmap(lambda s, j: jax.random.fold_in(jax.random.key(s), j))(rows.seeds, rows.samples)
        everything = jnp.ones((num_rows, cache.k[0].shape[2]), bool)

        def cond(c: _Decoding):
            return (c.step < chunk) & jnp.any(c.finish == RUNNING) & ~(stop_on_finish & c.any_finished)

        def body(c: _Decoding):
            logits, cache = model.decode(c.current[:, None], c.position[:, None], c.cache, c.position, everything)
            step_keys = jax.vmap(jax.random.fold_in)(keys, c.generated)
            tokens, logprobs = sample_tokens(
                logits[:, 0], step_keys, rows.temperature, rows.top_k, rows.top_p, rows.min_p
            )
            running = c.finish == RUNNING
            generated = c.generated + running
            stopped = jnp.any(tokens[:, None] == rows.stop_ids, axis=-1)
            finish = jnp.where(
                running & stopped, STOP_TOKEN, jnp.where(running & (generated >= rows.max_new), LENGTH, c.finish)
            )
            return _Decoding(
                cache=cache,
                current=jnp.where(running, tokens, c.current),
                position=c.position + running,
                generated=generated,
                finish=finish,
                tokens=jax.lax.dynamic_update_slice(c.tokens, tokens[:, None], (0, c.step)),
                logprobs=jax.lax.dynamic_update_slice(c.logprobs, logprobs[:, None], (0, c.step)),
                step=c.step + 1,
                any_finished=c.any_finished | jnp.any(running & (finish != RUNNING)),
            )

        start = _Decoding(
            cache=cache,
            current=rows.current,
            position=rows.position,
            generated=rows.generated,
            finish=rows.finish,
            tokens=jnp.zeros((num_rows, chunk), jnp.int32),
            logprobs=jnp.zeros((num_rows, chunk), jnp.float32),
            step=jnp.int32(0),
            any_finished=jnp.bool_(False),
        )
        return jax.lax.while_loop(cond, body, start)

    # --------------------------------------------------------------------------------------- host side

    def _put(self, arrays: Sequence[np.ndarray], axes: Sequence[tuple]) -> list[jax.Array]:
        """Host arrays onto the mesh by logical axes, in one transfer."""
        return jax.device_put(list(arrays), [named_sharding(self.mesh, x.shape, a) for x, a in zip(arrays, axes)])

    def _call(self, fn, name: str, shapes: dict, *args):
        before, started = fn._cache_size(), time.perf_counter()
        with jax.set_mesh(self.mesh):
            out = fn(*args)
        if fn._cache_size() > before:
            elapsed = time.perf_counter() - started
            self.compiles += 1
            self.compile_seconds += elapsed
            _log.info("compiled %s %s in %.1fs (engine compile #%d)", name, shapes, elapsed, self.compiles)
        return out

    def check(self, requests: Sequence[GenerationRequest]) -> None:
        """Raise ValueError naming the first request this engine cannot serve (before it is queued)."""
        for i, req in enumerate(requests):
            prompt = req.prompt_ids
            if not prompt:
                raise ValueError(f"request {i}: the prompt is empty")
            if req.n < 1:
                raise ValueError(f"request {i}: n must be >= 1, got {req.n}")
            bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(
                    f"request {i}: token ids {bad[:5]} are outside the vocabulary [0, {self.cfg.vocab_size})"
                )
            if len(prompt) + max(req.options.max_new_tokens, 1) > self.max_seq_len:
                raise ValueError(
                    f"request {i}: prompt ({len(prompt)} tokens) + max_new_tokens "
                    f"({req.options.max_new_tokens}) exceeds the context length ({self.max_seq_len})"
                )
            if req.options.stop and self.detokenize is None:
                raise ValueError(f"request {i}: stop strings need a tokenizer, and this engine has none")

    def submit(self, requests: Sequence[GenerationRequest], owner: Hashable | None = None) -> list[list[Sample]]:
        """Queue `requests` under `owner` (default: a new owner); returns each request's samples, which fill in as
        the engine steps. Samples with max_new_tokens 0 are finished at once."""
        self.check(requests)
        owner = next(self._owners) if owner is None else owner
        out, queued = [], []
        for req in requests:
            prompt = tuple(int(t) for t in req.prompt_ids)
            seed = req.options.seed if req.options.seed is not None else int(self._rng.integers(0, 2**31 - 1))
            samples = [Sample(prompt, req.options, j, seed, owner) for j in range(req.n)]
            if req.options.max_new_tokens == 0:
                for s in samples:
                    s.finish_reason, s.weight_version = {"type": "length", "length": 0}, self.weight_version
            else:
                queued.append(_Request(prompt, list(samples)))
            out.append(samples)
        if queued:
            with self._queue_lock:
                self._waiting.setdefault(owner, collections.deque()).extend(queued)
        return out

    @property
    def waiting_samples(self) -> int:
        with self._queue_lock:
            return sum(len(r.samples) for q in self._waiting.values() for r in q)

    @property
    def running_samples(self) -> int:
        """Samples decoding or being prefilled (read from any thread: a snapshot)."""
        group, slots = self._group, list(self._slots)
        return (sum(len(p.samples) for p in group.prompts) if group else 0) + sum(s is not None for s in slots)

    def live_tokens(self) -> int:
        """Tokens held in the decode cache by the running samples (prompt and output)."""
        return sum(len(s.prompt) + len(s.output_ids) for s in list(self._slots) if s is not None)

    def has_work(self) -> bool:
        return self.running_samples > 0 or (self.admitting and self.waiting_samples > 0)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """Completions for each request (n per request, in sample order), run to the end on this thread."""
        samples = self.submit(requests)
        while any(not s.finished for group in samples for s in group):
            self.step()
        return [[s.completion() for s in group] for group in samples]

    def step(self) -> list[Sample]:
        """One round: admit waiting requests into a prefill group, run one prefill chunk, one decode chunk.
        Returns the samples that received tokens or finished."""
        self.steps += 1
        started = time.perf_counter()
        idle = not any(self._slots) and self._group is None
        if self._group is None and self.admitting and (self.scheduling == "continuous" or idle):
            self._group = self._form_group()
        changed: list[Sample] = []
        if self._group is not None:
            changed += self._prefill_step()
            jax.block_until_ready(self._group.cache if self._group else self._cache)
            self.prefill_seconds += time.perf_counter() - started
        if any(s is not None for s in self._slots):
            changed += self._decode_step()
        return changed

    def abort(self, owner: Hashable | None = None, message: str = "aborted") -> list[Sample]:
        """Finish the queued and running samples of `owner` (all owners: None) with finish_reason abort."""
        aborted: list[Sample] = []
        with self._queue_lock:
            for key in [k for k in self._waiting if owner is None or k == owner]:
                aborted += [s for r in self._waiting.pop(key) for s in r.samples]
        running = [s for s in self._slots if s is not None]
        if self._group is not None:
            running += [s for p in self._group.prompts for s in p.samples]
        aborted += [s for s in running if owner is None or s.owner == owner]
        for s in aborted:
            s.finish_reason = {"type": "abort", "message": message}
        self._slots = [None if s is None or s.finished else s for s in self._slots]
        if self._group is not None:
            for p in self._group.prompts:
                p.samples = [s for s in p.samples if not s.finished]
            if not any(p.samples for p in self._group.prompts):
                self._group = None  # nobody waits for it (and after a failed step its cache may be donated)
        self._shrink()
        return aborted

    # ----------------------------------------------------------------------------------------- admission

    def _free_slots(self) -> int:
        return self.max_running_requests - self.running_samples

    def _form_group(self) -> _Group | None:
        """Take waiting requests, one per owner in turn, while slots and the prefill budget last."""
        free = self._free_slots()
        prompts: dict[tuple[int, ...], _Prompt] = {}
        max_prompts = self.chunked_prefill_size // _MIN_CHUNK
        with self._queue_lock:
            passed: set[Hashable] = set()  # owners whose next request waits for a later group
            while free > 0 and len(passed) < len(self._waiting):
                owner = next(k for k in self._waiting if k not in passed)
                queue = self._waiting[owner]
                request = queue[0]
                prompt = prompts.get(request.prompt)
                if prompt is None:
                    if len(prompts) == max_prompts or self._shares_uncached_blocks(request.prompt, prompts):
                        passed.add(owner)
                        continue
                    blocks = self.prefix.match(request.prompt[:-1])
                    cached = len(blocks) * self.prefix.block_size
                    prompt = prompts[request.prompt] = _Prompt(request.prompt, [], cached, blocks)
                taken, request.samples = request.samples[:free], request.samples[free:]
                prompt.samples += taken
                free -= len(taken)
                if not request.samples:
                    queue.popleft()
                self._waiting.move_to_end(owner)
                if not queue:
                    del self._waiting[owner]
        if not prompts:
            return None
        return self._start_group(list(prompts.values()))

    def _shares_uncached_blocks(self, tokens: tuple[int, ...], group: dict[tuple[int, ...], _Prompt]) -> bool:
        """Would `tokens` prefill _DEFER_TOKENS or more tokens of blocks that a prompt already in the group
        prefills too? Then it waits: next step those blocks are cached. (A shorter overlap, such as two code prompts
        opening with the same import, is cheaper to compute twice than to wait for.)"""
        size = self.prefix.block_size
        if self.prefix.capacity == 0 or len(tokens) - 1 < _DEFER_TOKENS:
            return False
        first = tokens[:size]
        for other in group.values():
            if other.tokens[:size] == first and other.cached < len(other.tokens) - 1:
                common = next((i for i, (a, b) in enumerate(zip(tokens, other.tokens)) if a != b), len(tokens))
                shared = min(common, len(tokens) - 1, other.kv_len) // size * size
                if shared - other.cached >= _DEFER_TOKENS:
                    return True
        return False

    def _start_group(self, prompts: list[_Prompt]) -> _Group:
        size = len(prompts)
        rows = bucket(size)
        weights = self.weight_version
        for p in prompts:
            for i, s in enumerate(p.samples):
                # the first sample computes what the cache lacks; the others reuse its prefill (SGLang's n > 1)
                s.cached_tokens, s.weight_version = (p.cached if i == 0 else p.kv_len), weights
        remaining = [p.kv_len - p.cached for p in prompts]
        longest = max(remaining)
        chunk = min(bucket(longest, _MIN_CHUNK), max(_MIN_CHUNK, _floor_pow2(self.chunked_prefill_size // rows)))
        chunks = math.ceil(longest / chunk)
        # each prompt writes chunk k at cached + k * chunk while it has tokens left, then (garbage) from its K/V's end
        ends = [p.cached + math.ceil(r / chunk) * chunk for p, r in zip(prompts, remaining)]
        ends += [p.kv_len + chunk for p, r in zip(prompts, remaining) if math.ceil(r / chunk) < chunks]
        hits = max(len(p.pool_blocks) for p in prompts)
        length = bucket(max(*ends, hits * self.prefix.block_size, 1), _MIN_CHUNK)
        shapes = dict(prompts=rows, length=length)
        if hits:
            table = np.zeros((rows, bucket(hits)), np.int32)
            for i, p in enumerate(prompts):
                table[i, : len(p.pool_blocks)] = p.pool_blocks
            cache = self._call(
                self._assemble, "assemble", {**shapes, "blocks": table.shape[1]}, self._pool, length, table
            )
        else:
            cache = self._call(self._zeros, "zeros", shapes, rows, length)
        return _Group(prompts, chunk, chunks, length, cache)

    def _prefill_step(self) -> list[Sample]:
        group = self._group
        if group.done < group.chunks:
            rows = bucket(len(group.prompts))
            ids = np.zeros((rows, group.chunk), np.int32)
            starts = np.zeros(rows, np.int32)  # padding rows write garbage into their own unused rows
            for i, p in enumerate(group.prompts):
                start = p.cached + group.done * group.chunk
                if start < p.kv_len:
                    piece = p.tokens[start : min(start + group.chunk, p.kv_len)]
                    ids[i, : len(piece)], starts[i] = piece, start
                else:
                    starts[i] = p.kv_len  # done: garbage past its own K/V
            window = min(bucket(int(starts.max()) + group.chunk, _MIN_CHUNK), group.length)
            inputs = self._put((ids, starts), (("batch", "length"), ("batch",)))
            shapes = dict(prompts=rows, chunk=group.chunk, window=window, length=group.length)
            group.cache = self._call(self._prefill, "prefill", shapes, self.state, group.cache, *inputs, window)
            group.done += 1
        if group.done < group.chunks:
            return []
        self._group = None
        self._save_prefixes(group)
        return self._insert_group(group)

    def _save_prefixes(self, group: _Group) -> None:
        if self.prefix.capacity == 0:
            return
        writes: dict[int, tuple[int, int]] = {}  # pool block -> (group row, start slot); later writes win
        for row, p in enumerate(group.prompts):
            for number, block in self.prefix.insert(p.tokens[: p.kv_len]):
                writes[block] = (row, number * self.prefix.block_size)
        if not writes:
            return
        if self._pool is None:
            capacity, size = self.prefix.capacity, self.prefix.block_size
            self._pool = self._call(self._zeros, "zeros", dict(pool=capacity, block=size), capacity, size)
        count = bucket(len(writes))
        rows, starts = np.zeros(count, np.int32), np.zeros(count, np.int32)
        blocks = np.full(count, self.prefix.capacity, np.int32)  # padding: out of range, dropped
        for i, (block, (row, start)) in enumerate(writes.items()):
            rows[i], starts[i], blocks[i] = row, start, block
        shapes = dict(blocks=count, prompts=group.cache.k[0].shape[0], length=group.length)
        self._pool = self._call(self._save, "save", shapes, self._pool, group.cache, rows, starts, blocks)

    def _insert_group(self, group: _Group) -> list[Sample]:
        new = [(row, s) for row, p in enumerate(group.prompts) for s in p.samples if not s.finished]
        if not new:
            return []
        live = [s for s in self._slots if s is not None]
        if not live:  # a new decode cache: gather it straight from the group's rows (no zeros, then a copy)
            rows, length = self._decode_shape(len(new), [s for _, s in new])
            row_map = np.array([row for row, _ in new] + [0] * (rows - len(new)), np.int32)
            shapes = dict(rows=f"group {len(group.prompts)}->{rows}", length=f"{group.length}->{length}")
            self._cache = self._call(self._relayout, "relayout", shapes, group.cache, row_map, length)
            self._slots = [s for _, s in new] + [None] * (rows - len(new))
            return []
        self._layout(len(live) + len(new), live + [s for _, s in new], grow_only=True)
        free = [i for i, s in enumerate(self._slots) if s is None]
        count = bucket(len(new))
        slots = np.full(count, len(self._slots), np.int32)  # padding: out of range, dropped
        rows = np.zeros(count, np.int32)
        for i, ((row, sample), slot) in enumerate(zip(new, free)):
            slots[i], rows[i] = slot, row
            self._slots[slot] = sample
        shapes = dict(slots=len(self._slots), length=self._cache.k[0].shape[2], new=count, group_length=group.length)
        self._cache = self._call(self._insert, "insert", shapes, self._cache, group.cache, slots, rows)
        return []

    # ------------------------------------------------------------------------------------------- layout

    def _reach(self, sample: Sample) -> int:
        """The cache slots `sample` may fill by the end of the next decode chunk."""
        return len(sample.prompt) + min(sample.options.max_new_tokens, len(sample.output_ids) + self.chunk_steps)

    def _decode_shape(self, live: int, samples: Sequence[Sample]) -> tuple[int, int]:
        """(rows, length) of a decode cache for `live` rows holding `samples` through their next chunk."""
        rows = min(bucket(live, self.min_rows_bucket), bucket(self.max_running_requests, self.min_rows_bucket))
        return rows, bucket(max(map(self._reach, samples)), self.min_length_bucket)

    def _layout(self, live: int, samples: Sequence[Sample], *, grow_only: bool) -> None:
        """Give the (existing) decode cache room for `live` rows holding `samples` through their next chunk,
        growing it, or shrinking it when grow_only is False; live rows move to the front. The length follows the
        rows as they grow: attention reads the whole cache every step, so it must not be longer than they need."""
        rows, length = self._decode_shape(live, samples)
        old_rows, old_length = len(self._slots), self._cache.k[0].shape[2]
        if grow_only:
            rows, length = max(rows, old_rows), max(length, old_length)
        if (rows, length) == (old_rows, old_length):
            return
        occupied = [i for i, s in enumerate(self._slots) if s is not None]
        row_map = np.array(occupied + [0] * (rows - len(occupied)), np.int32)
        shapes = dict(rows=f"{old_rows}->{rows}", length=f"{old_length}->{length}")
        self._cache = self._call(self._relayout, "relayout", shapes, self._cache, row_map, length)
        self._slots = [self._slots[i] for i in occupied] + [None] * (rows - len(occupied))

    def _shrink(self) -> None:
        live = [s for s in self._slots if s is not None]
        if not live:
            self._cache, self._slots = None, []
        elif self.scheduling == "continuous":
            incoming = [s for p in self._group.prompts for s in p.samples] if self._group else []
            self._layout(len(live) + len(incoming), live + incoming, grow_only=False)

    # ------------------------------------------------------------------------------------------- decode

    def _row_inputs(self) -> RowInputs:
        rows = len(self._slots)
        stops = [
            ()
            if s is None or s.options.ignore_eos
            else tuple(dict.fromkeys(self.eos_token_ids + s.options.stop_token_ids))
            for s in self._slots
        ]
        stop_ids = np.full((rows, bucket(max(map(len, stops)), 4)), -1, np.int32)
        for i, ids in enumerate(stops):
            stop_ids[i, : len(ids)] = ids

        def column(value, dtype, empty):
            return np.array([empty if s is None else value(s) for s in self._slots], dtype)

        host = RowInputs(
            current=column(lambda s: (s.output_ids or s.prompt)[-1], np.int32, 0),
            position=column(lambda s: len(s.prompt) - 1 + len(s.output_ids), np.int32, 0),
            generated=column(lambda s: len(s.output_ids), np.int32, 0),
            finish=column(lambda s: LENGTH if s.finished else RUNNING, np.int32, LENGTH),
            seeds=column(lambda s: s.seed, np.int32, 0),
            samples=column(lambda s: s.index, np.int32, 0),
            temperature=column(lambda s: s.options.temperature, np.float32, 0.0),
            top_k=column(lambda s: s.options.top_k, np.int32, -1),
            top_p=column(lambda s: s.options.top_p, np.float32, 1.0),
            min_p=column(lambda s: s.options.min_p, np.float32, 0.0),
            max_new=column(lambda s: s.options.max_new_tokens, np.int32, 0),
            stop_ids=stop_ids,
        )
        return RowInputs(*self._put(host, [("batch",)] * 11 + [("batch", None)]))

    def _decode_step(self) -> list[Sample]:
        live = [s for s in self._slots if s is not None]
        self._layout(len(live), live, grow_only=True)
        rows = self._row_inputs()
        waiting = self.scheduling == "continuous" and self.admitting and self.waiting_samples > 0
        shapes = dict(rows=len(self._slots), length=self._cache.k[0].shape[2], steps=self.chunk_steps)
        out = self._call(self._decode, "decode", shapes, self.state, self._cache, rows, self.chunk_steps, waiting)
        self._cache = out.cache
        tokens, logprobs, generated, finish = map(np.asarray, (out.tokens, out.logprobs, out.generated, out.finish))
        changed = []
        for i, s in enumerate(self._slots):
            if s is None:
                continue
            new, was_finished = int(generated[i]) - len(s.output_ids), s.finished
            s.output_ids += tokens[i, :new].tolist()
            s.logprobs += logprobs[i, :new].tolist()
            if s.options.stop:
                self._match_stop_strings(s)
            if s.finish_reason is None and finish[i] != RUNNING:
                n = len(s.output_ids)
                s.finish_reason = (
                    {"type": "stop", "matched": s.output_ids[-1]}
                    if finish[i] == STOP_TOKEN
                    else {"type": "length", "length": n}
                )
            if new or s.finished != was_finished:
                changed.append(s)
        if self.scheduling == "continuous" or all(s is None or s.finished for s in self._slots):
            self._slots = [None if s is None or s.finished else s for s in self._slots]
            self._shrink()
        return changed

    def _match_stop_strings(self, sample: Sample) -> None:
        """Finish `sample` at its first stop string (its tokens after it are dropped)."""
        ids = sample.output_ids
        if len(ids) == sample.stop_checked:
            return
        sample.stop_checked = len(ids)
        hit = self._first_stop(ids, sample.options.stop)
        if hit is not None:
            count, matched = hit
            del sample.output_ids[count:], sample.logprobs[count:]
            sample.finish_reason = {"type": "stop", "matched": matched}

    def _first_stop(self, ids: list[int], stops: tuple[str, ...]) -> tuple[int, str] | None:
        """(fewest tokens whose text contains a stop string, that string), or None."""
        text = self.detokenize(ids)
        if not any(s in text for s in stops):
            return None
        lo, hi = 1, len(ids)  # the text of ids[:hi] contains a stop string; find the smallest such hi
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in self.detokenize(ids[:mid]) for s in stops):
                hi = mid
            else:
                lo = mid + 1
        text = self.detokenize(ids[:hi])
        return hi, min((s for s in stops if s in text), key=text.find)


def _floor_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)
