"""The JAX generation engine: batched prefill, then KV-cached decode inside one jitted while_loop.

How a batch runs:
- Rows are (prompt, sample index) pairs. Identical prompts (the n samples of one request, or repeats across
  requests) are prefilled once and their KV rows are gathered into every sample's row.
- Prompts are left-padded to a bucketed length P; the prefill writes K/V of the first P-1 tokens only and computes
  no logits (they are dead code under jit), and every decode step (the first included) feeds one token, takes its
  logits and samples. The decode loop is a lax.while_loop that stops when every row is done or the step budget of
  the call is spent; with stop strings in the batch it runs in chunks of `chunk_steps` so the host can check the
  decoded text between chunks. Without them a batch is one prefill call and one decode call.
- Batch rows, unique prompts, prompt length and new-token budget are rounded up to powers of two, so the number of
  compilations stays bounded; each compile is logged with its shapes and time.
- The engine keeps the Decoder `unstacked` (one array per layer and parameter): decode steps read every weight
  once per token, and slicing stacked weights would copy them every step.
- Everything runs under the mesh of the parameters (tensor-parallel decode when the mesh has a tensor axis):
  inputs are placed with fr_jax.parallel.rules' logical axes and the KV cache follows the model's own constraints.

Log-prob convention (shared with the GRPO trainer): see fr_jax.rollout.sampling. The engine returns the log-prob of
each generated token under log_softmax(logits / temperature), before top-k/top-p/min-p filtering, in float32.
Seeds: a request's seed s gives sample j the key fold_in(key(s), j), advanced per step by fold_in(., step): the n
samples of one request differ, and the same seed reproduces them whatever else shares the batch. (SGLang's
sampling_seed instead gives all n samples the same stream.) Token-based stops (EOS and stop_token_ids) are all
disabled by ignore_eos, as in SGLang; stop strings still apply.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import CACHE_AXES, Decoder, KVCache
from fr_jax.parallel.rules import constrain, named_sharding
from fr_jax.rollout.sampling import sample_tokens

_log = logging.getLogger(__name__)

RUNNING, STOP_TOKEN, LENGTH, STOP_STRING = 0, 1, 2, 3


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

    finish_reason is SGLang's dict: {"type": "stop", "matched": token id or stop string} or
    {"type": "length", "length": number of generated tokens}.
    """

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: dict
    prompt_tokens: int
    weight_version: str  # the weights that generated it


class _Row(NamedTuple):
    request: int
    sample: int
    prompt: tuple[int, ...]
    options: SamplingOptions
    seed: int


class DecodeState(NamedTuple):
    """The carry of the decode loop; it stays on device between chunks."""

    cache: KVCache
    tokens: jax.Array  # int32 [R, N] generated ids
    logprobs: jax.Array  # float32 [R, N]
    current: jax.Array  # int32 [R] the token fed at the next step
    lengths: jax.Array  # int32 [R] tokens generated so far
    finish: jax.Array  # int32 [R] RUNNING / STOP_TOKEN / LENGTH / STOP_STRING
    step: jax.Array  # int32 scalar


class RowSettings(NamedTuple):
    """Per-row constants of one batch."""

    kv_mask: jax.Array  # bool [R, P - 1 + N]
    first_position: jax.Array  # int32 [R] position of the last prompt token
    seeds: jax.Array  # int32 [R]
    samples: jax.Array  # int32 [R] sample index within its request (folded into the key)
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    max_new: jax.Array  # int32 [R]
    stop_ids: jax.Array  # int32 [R, S], -1 padded


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


class Engine:
    """Generates from token ids with a Decoder's parameters under `mesh`. Thread-safe: one batch at a time.

    eos_token_ids: the model's end-of-sequence ids (a token-based stop unless ignore_eos).
    detokenize: ids -> text, needed only for stop strings.
    max_seq_len: prompt + generation limit (default: the config's max_position_embeddings).
    max_batch_rows: rows per device batch; larger calls are split.
    min_rows_bucket: decode at least this many rows (padding is nearly free in memory-bound decode, compiles are not).
    """

    def __init__(
        self,
        model: Decoder,
        *,
        mesh,
        eos_token_ids: Sequence[int] = (),
        detokenize: Callable[[list[int]], str] | None = None,
        max_seq_len: int | None = None,
        max_batch_rows: int = 64,
        chunk_steps: int = 32,
        min_rows_bucket: int = 4,
        min_prompt_bucket: int = 16,
        min_new_tokens_bucket: int = 16,
        seed: int = 0,
        weight_version: str = "default",
    ):
        self.cfg: ModelConfig = model.cfg
        self.mesh = mesh
        self._served = self._param_specs(model)
        self.graphdef, self.state = nnx.split(model.unstacked())
        self.weight_version = weight_version
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.detokenize = detokenize
        self.max_seq_len = int(max_seq_len or self.cfg.max_position_embeddings)
        self.max_batch_rows = max_batch_rows
        self.chunk_steps = chunk_steps
        self.min_rows_bucket = min_rows_bucket
        self.min_prompt_bucket = min_prompt_bucket
        self.min_new_tokens_bucket = min_new_tokens_bucket
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.compiles = 0
        self._prefill = jax.jit(self._prefill_fn)
        self._begin = jax.jit(self._begin_fn, static_argnums=(3,))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))

    # ------------------------------------------------------------------------------------------ weights

    @staticmethod
    def _param_specs(model: Decoder) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {
            ".".join(map(str, path)): (var.get_value().shape, var.get_value().dtype)
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
        }

    def swap_state(self, model: Decoder, weight_version: str | None = None) -> None:
        """Serve `model`'s parameters (between batches); their names, shapes and dtypes must equal the current ones.
        The engine takes `model`'s arrays over (they are unstacked in place: `model` is unusable afterwards), so
        a swap holds two copies of the weights at most, the served ones and the new ones."""
        new = self._param_specs(model)
        if new.keys() != self._served.keys():
            missing, extra = sorted(self._served.keys() - new.keys()), sorted(new.keys() - self._served.keys())
            raise ValueError(f"new parameters do not match the served model: missing {missing}, unexpected {extra}")
        for name, (shape, dtype) in self._served.items():
            if new[name] != (shape, dtype):
                raise ValueError(
                    f"parameter {name}: served {dtype}{list(shape)}, new {new[name][1]}{list(new[name][0])}"
                )
        state = nnx.split(model.unstacked(consume=True))[1]
        with self._lock:
            self.state = state
            if weight_version is not None:
                self.weight_version = weight_version

    # ------------------------------------------------------------------------------------- jitted steps

    def _prefill_fn(self, state, prompt_ids, prompt_mask):
        """K/V of the first P-1 prompt tokens for each unique prompt (no logits: nothing uses them)."""
        model = nnx.merge(self.graphdef, state)
        positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
        cache = model.init_cache(prompt_ids.shape[0], prompt_ids.shape[1] - 1)
        _, cache = model.decode(prompt_ids[:, :-1], positions[:, :-1], cache, jnp.int32(0), prompt_mask[:, :-1])
        return cache

    def _begin_fn(self, prefix: KVCache, row_source, last_tokens, new_tokens: int) -> DecodeState:
        """Each row's cache: its prompt's prefix K/V (gathered: samples share one prefill) plus room for new tokens."""
        rows = row_source.shape[0]

        def grow(x):  # [unique, kv_heads, P - 1, head_dim] -> [rows, kv_heads, P - 1 + new_tokens, head_dim]
            shape = (rows, x.shape[1], x.shape[2] + new_tokens, x.shape[3])
            full = jnp.zeros(shape, x.dtype).at[:, :, : x.shape[2]].set(jnp.take(x, row_source, axis=0))
            return constrain(full, CACHE_AXES)

        return DecodeState(
            cache=jax.tree.map(grow, prefix),
            tokens=jnp.zeros((rows, new_tokens), jnp.int32),
            logprobs=jnp.zeros((rows, new_tokens), jnp.float32),
            current=last_tokens,
            lengths=jnp.zeros((rows,), jnp.int32),
            finish=jnp.full((rows,), RUNNING, jnp.int32),
            step=jnp.int32(0),
        )

    def _decode_fn(self, state, carry: DecodeState, rows: RowSettings, step_limit) -> DecodeState:
        """Decode until every row is done or `step_limit` steps have run in total."""
        prefix_len = rows.kv_mask.shape[1] - carry.tokens.shape[1]
        keys = jax.vmap(lambda s, j: jax.random.fold_in(jax.random.key(s), j))(rows.seeds, rows.samples)
        finish0 = jnp.where(rows.max_new <= 0, LENGTH, carry.finish)

        model = nnx.merge(self.graphdef, state)  # closed over: the loop carries only what changes

        def cond(c):
            return (c.step < step_limit) & jnp.any(c.finish == RUNNING)

        def body(c):
            positions = (rows.first_position + c.step)[:, None]
            logits, cache = model.decode(c.current[:, None], positions, c.cache, prefix_len + c.step, rows.kv_mask)
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, c.step))(keys)
            tokens, logprobs = sample_tokens(
                logits[:, 0], step_keys, rows.temperature, rows.top_k, rows.top_p, rows.min_p
            )
            running = c.finish == RUNNING
            lengths = c.lengths + running
            stopped = jnp.any(tokens[:, None] == rows.stop_ids, axis=-1)
            finish = jnp.where(
                running & stopped, STOP_TOKEN, jnp.where(running & (lengths >= rows.max_new), LENGTH, c.finish)
            )
            return DecodeState(
                cache=cache,
                tokens=jax.lax.dynamic_update_slice(c.tokens, tokens[:, None], (0, c.step)),
                logprobs=jax.lax.dynamic_update_slice(c.logprobs, logprobs[:, None], (0, c.step)),
                current=tokens,
                lengths=lengths,
                finish=finish,
                step=c.step + 1,
            )

        return jax.lax.while_loop(cond, body, carry._replace(finish=finish0))

    # --------------------------------------------------------------------------------------- host side

    def _put(self, x: np.ndarray, axes: tuple) -> jax.Array:
        return jax.device_put(x, named_sharding(self.mesh, x.shape, axes))

    def _log_compile(self, fn, name: str, shapes: dict, started: float, before: int) -> None:
        if fn._cache_size() > before:
            self.compiles += 1
            _log.info(
                "compiled %s %s in %.1fs (engine compile #%d)",
                name,
                shapes,
                time.perf_counter() - started,
                self.compiles,
            )

    def _call(self, fn, name: str, shapes: dict, *args):
        before, started = fn._cache_size(), time.perf_counter()
        out = fn(*args)
        self._log_compile(fn, name, shapes, started, before)
        return out

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """Completions for each request (n per request, in sample order)."""
        rows = self._expand(requests)
        results: dict[tuple[int, int], Completion] = {}
        with self._lock:
            for start in range(0, len(rows), self.max_batch_rows):
                batch = rows[start : start + self.max_batch_rows]
                for row, completion in zip(batch, self._generate_batch(batch)):
                    results[(row.request, row.sample)] = completion
        return [[results[(i, j)] for j in range(req.n)] for i, req in enumerate(requests)]

    def check(self, requests: Sequence[GenerationRequest]) -> None:
        """Raise ValueError naming the first request this engine cannot serve (before it joins a batch)."""
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

    def _expand(self, requests: Sequence[GenerationRequest]) -> list[_Row]:
        self.check(requests)
        rows = []
        for i, req in enumerate(requests):
            seed = req.options.seed if req.options.seed is not None else int(self._rng.integers(0, 2**31 - 1))
            rows.extend(_Row(i, j, tuple(int(t) for t in req.prompt_ids), req.options, seed) for j in range(req.n))
        return rows

    def _generate_batch(self, batch: list[_Row]) -> list[Completion]:
        started = time.perf_counter()
        prompts = list(dict.fromkeys(row.prompt for row in batch))  # unique, in order
        source = np.array([prompts.index(row.prompt) for row in batch], np.int32)
        max_new = np.array([r.options.max_new_tokens for r in batch], np.int32)
        num_rows, num_unique = bucket(len(batch), self.min_rows_bucket), bucket(len(prompts))
        prompt_len = bucket(max(len(p) for p in prompts), self.min_prompt_bucket)
        new_tokens = bucket(int(max_new.max()), self.min_new_tokens_bucket)

        ids = np.zeros((num_unique, prompt_len), np.int32)
        mask = np.zeros((num_unique, prompt_len), bool)
        for u, p in enumerate(prompts):
            ids[u, prompt_len - len(p) :] = p
            mask[u, prompt_len - len(p) :] = True
        row_source = np.zeros(num_rows, np.int32)
        row_source[: len(batch)] = source

        def per_row(values, dtype, pad):
            out = np.full(num_rows, pad, dtype)
            out[: len(batch)] = values
            return out

        stops = [
            () if r.options.ignore_eos else tuple(dict.fromkeys(self.eos_token_ids + r.options.stop_token_ids))
            for r in batch
        ]
        stop_ids = np.full((num_rows, bucket(max(map(len, stops)), 4)), -1, np.int32)
        for i, s in enumerate(stops):
            stop_ids[i, : len(s)] = s
        kv_mask = np.concatenate([mask[row_source, :-1], np.ones((num_rows, new_tokens), bool)], axis=1)
        lengths_in = np.array([len(r.prompt) for r in batch])
        settings = RowSettings(
            kv_mask=self._put(kv_mask, ("batch", "length")),
            first_position=self._put(per_row(lengths_in - 1, np.int32, 0), ("batch",)),
            seeds=self._put(per_row([r.seed for r in batch], np.int32, 0), ("batch",)),
            samples=self._put(per_row([r.sample for r in batch], np.int32, 0), ("batch",)),
            temperature=self._put(per_row([r.options.temperature for r in batch], np.float32, 0.0), ("batch",)),
            top_k=self._put(per_row([r.options.top_k for r in batch], np.int32, -1), ("batch",)),
            top_p=self._put(per_row([r.options.top_p for r in batch], np.float32, 1.0), ("batch",)),
            min_p=self._put(per_row([r.options.min_p for r in batch], np.float32, 0.0), ("batch",)),
            max_new=self._put(per_row(max_new, np.int32, 0), ("batch",)),
            stop_ids=self._put(stop_ids, ("batch", None)),
        )

        shapes = dict(unique_prompts=num_unique, prompt_len=prompt_len, rows=num_rows, new_tokens=new_tokens)
        with jax.set_mesh(self.mesh):
            prefix = self._call(
                self._prefill,
                "prefill",
                dict(unique_prompts=num_unique, prompt_len=prompt_len),
                self.state,
                self._put(ids, ("batch", "length")),
                self._put(mask, ("batch", "length")),
            )
            carry = self._call(
                self._begin,
                "begin",
                shapes,
                prefix,
                self._put(row_source, ("batch",)),
                self._put(ids[row_source, -1], ("batch",)),
                new_tokens,
            )
            prefill_s = time.perf_counter() - started
            has_stop_strings = any(r.options.stop for r in batch)
            chunk = self.chunk_steps if has_stop_strings else new_tokens
            matched: dict[int, tuple[int, str]] = {}
            checked = np.zeros(len(batch), np.int64)
            while True:
                limit = min(int(carry.step) + chunk, new_tokens)
                carry = self._call(self._decode, "decode", shapes, self.state, carry, settings, jnp.int32(limit))
                finish = np.array(carry.finish)  # a writable copy: stop strings edit it
                if has_stop_strings:
                    newly = self._match_stop_strings(batch, carry, finish, checked, matched)
                    if newly:
                        finish[newly] = STOP_STRING
                        carry = carry._replace(finish=self._put(finish, ("batch",)))
                if limit >= new_tokens or not np.any(finish[: len(batch)] == RUNNING):
                    break
        tokens, logprobs, lengths = (np.asarray(x) for x in (carry.tokens, carry.logprobs, carry.lengths))
        completions = []
        for i, row in enumerate(batch):
            n = matched[i][0] if i in matched else int(lengths[i])
            if i in matched:
                reason = {"type": "stop", "matched": matched[i][1]}
            elif finish[i] == STOP_TOKEN:
                reason = {"type": "stop", "matched": int(tokens[i, n - 1])}
            else:
                reason = {"type": "length", "length": n}
            completions.append(
                Completion(
                    tokens[i, :n].tolist(), logprobs[i, :n].tolist(), reason, len(row.prompt), self.weight_version
                )
            )
        generated = int(sum(len(c.output_ids) for c in completions))
        elapsed = time.perf_counter() - started
        _log.info(
            "generated %d tokens for %d rows (%d unique prompts) in %.2fs (prefill %.2fs, %.1f tok/s) %s",
            generated,
            len(batch),
            len(prompts),
            elapsed,
            prefill_s,
            generated / max(elapsed, 1e-9),
            shapes,
        )
        return completions

    def _match_stop_strings(self, batch, carry: DecodeState, finish, checked, matched) -> list[int]:
        """Rows whose decoded text now contains one of their stop strings; records (tokens kept, string) in matched."""
        tokens, lengths = np.asarray(carry.tokens), np.asarray(carry.lengths)
        newly = []
        for i, row in enumerate(batch):
            if not row.options.stop or i in matched or lengths[i] == checked[i]:
                continue
            ids = tokens[i, : lengths[i]].tolist()
            checked[i] = lengths[i]
            hit = self._first_stop(ids, row.options.stop)
            if hit is not None:
                matched[i] = hit
                if finish[i] == RUNNING:
                    newly.append(i)
        return newly

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
