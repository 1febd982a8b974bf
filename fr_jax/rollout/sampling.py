"""Token sampling for the rollout engine: temperature, top-k, top-p and min-p, one row per sequence, inside jit.

Conventions (the GRPO trainer recomputes log-probs with the same ones):
- The log-prob reported for a sampled token is log_softmax(logits / temperature)[token], taken BEFORE the top-k /
  top-p / min-p filters, as SGLang's sampler reports it by default (its SGLANG_RETURN_ORIGINAL_LOGPROB switches to
  the raw logits). Temperature 0 means greedy; its token's log-prob is log_softmax(logits) (temperature 1), as in
  SGLang, which turns temperature 0 into top_k=1 at temperature 1.
- The filters follow SGLang's definitions on the probability-sorted vocabulary: keep rank < top_k, keep a token when
  the mass ranked strictly before it is <= top_p, keep p >= min_p * max(p). Every filter is a threshold on the
  probability, so the kept set is {p >= tau} with tau the largest of the three (tokens tied at tau are all kept).
- Sampling is inverse-CDF with one uniform per row (two-level: blocks, then tokens), which costs O(V) per row instead
  of the V random numbers a Gumbel draw needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CANDIDATES = 256  # top-k / top-p look at this many best tokens first; a wider kept set falls back to bisection
_BLOCK = 256
_ONE_BITS = 0x3F800000  # float32 1.0 as int32: probabilities lie in [0, 1], and their bit patterns sort like them


def _rank_and_mass_threshold(probs: jax.Array, top_k: jax.Array, top_p: jax.Array, candidates: int):
    """(tau, overflow): the top-k/top-p threshold from the best `candidates` tokens, and the rows where the kept set
    may reach past them (so tau must come from the whole vocabulary)."""
    k = min(candidates, probs.shape[-1])
    best, _ = jax.lax.top_k(probs, k)  # [R, k], descending
    mass_before = jnp.cumsum(best, axis=-1) - best
    rank = jnp.arange(k)[None, :]
    keep = (rank < top_k[:, None]) & (mass_before <= top_p[:, None])
    last_kept = jnp.sum(keep, axis=-1) - 1  # keep is a prefix; rank 0 is always kept
    tau = jnp.take_along_axis(best, last_kept[:, None], axis=-1)[:, 0]
    overflow = keep[:, -1] & (top_k > k) & (k < probs.shape[-1])
    return tau, overflow


def _bisect_threshold(probs: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The exact top-k/top-p threshold over the whole vocabulary: the smallest float x (bisected on its bits) with
    fewer than top_k tokens above it and at most top_p mass above it."""

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        x = jax.lax.bitcast_convert_type(mid, jnp.float32)[:, None]
        above = probs > x
        ok = (jnp.sum(above, axis=-1) < top_k) & (jnp.sum(jnp.where(above, probs, 0.0), axis=-1) <= top_p)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    rows = probs.shape[0]
    lo = jnp.zeros((rows,), jnp.int32)
    hi = jnp.full((rows,), _ONE_BITS + 1, jnp.int32)
    _, hi = jax.lax.fori_loop(0, 31, step, (lo, hi))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


def keep_threshold(
    probs: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array, candidates: int = CANDIDATES
) -> jax.Array:
    """tau [R] such that the filtered distribution keeps exactly the tokens with probs >= tau.

    probs [R, V] (each row sums to 1); top_k int [R] (<= 0: off); top_p, min_p float [R] (1 and 0: off).
    """
    vocab = probs.shape[-1]
    top_k = jnp.where((top_k <= 0) | (top_k > vocab), vocab + 1, top_k).astype(jnp.int32)
    top_p = jnp.where(top_p >= 1.0, jnp.inf, top_p).astype(jnp.float32)
    tau_min_p = min_p * jnp.max(probs, axis=-1)
    filtered = (top_k <= vocab) | jnp.isfinite(top_p)  # rows with a rank or mass filter

    def rank_or_mass(_):
        tau, overflow = _rank_and_mass_threshold(probs, top_k, top_p, candidates)
        overflow &= filtered
        tau = jax.lax.cond(
            jnp.any(overflow), lambda: jnp.where(overflow, _bisect_threshold(probs, top_k, top_p), tau), lambda: tau
        )
        return jnp.where(filtered, tau, 0.0)

    tau = jax.lax.cond(jnp.any(filtered), rank_or_mass, lambda _: jnp.zeros_like(tau_min_p), None)
    return jnp.maximum(tau, tau_min_p)


def inverse_cdf_sample(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """Index i [R] drawn with probability weights[i] / sum(weights), from uniform [R] in (0, 1].

    Two levels (block sums, then one block's cumulative sum) keep the float32 running sums short and the work O(V).
    Zero-weight tokens are never returned.
    """
    rows, vocab = weights.shape
    blocks = -(-vocab // _BLOCK)
    w = jnp.pad(weights, ((0, 0), (0, blocks * _BLOCK - vocab))).reshape(rows, blocks, _BLOCK)
    block_mass = jnp.sum(w, axis=-1)
    block_cum = jnp.cumsum(block_mass, axis=-1)
    target = uniform * block_cum[:, -1]
    # the first block whose cumulative mass reaches the target, never an empty block
    block = jnp.argmax((block_cum >= target[:, None]) & (block_mass > 0), axis=-1)
    within = jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0]
    rest = target - jnp.take_along_axis(block_cum - block_mass, block[:, None], axis=-1)[:, 0]
    within_cum = jnp.cumsum(within, axis=-1)
    # rounding can leave `rest` above the block's own sum: then take the block's last non-zero token
    reached = (within_cum >= rest[:, None]) & (within > 0)
    last_nonzero = _BLOCK - 1 - jnp.argmax((within > 0)[:, ::-1], axis=-1)
    index = jnp.where(jnp.any(reached, axis=-1), jnp.argmax(reached, axis=-1), last_nonzero)
    return block * _BLOCK + index


def sample_tokens(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    candidates: int = CANDIDATES,
) -> tuple[jax.Array, jax.Array]:
    """(tokens int32 [R], log-probs float32 [R]) for logits [R, V], one PRNG key per row, per-row sampling settings.

    Temperature 0 is greedy. The log-prob is log_softmax(logits / temperature) of the chosen token (module docstring).
    """
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    log_norm = jax.nn.logsumexp(scaled, axis=-1)
    probs = jnp.exp(scaled - log_norm[:, None])
    tau = keep_threshold(probs, top_k, top_p, min_p, candidates)
    weights = jnp.where(probs >= tau[:, None], probs, 0.0)
    uniform = 1.0 - jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys)  # (0, 1]
    sampled = inverse_cdf_sample(weights, uniform)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    logprobs = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0] - log_norm
    return tokens, logprobs
