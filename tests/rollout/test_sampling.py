"""The engine's sampler (fr_jax.rollout.sampling) against hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fr_jax.rollout import sampling

# jitted once per shape, as the engine runs them (eager dispatch of the conds and loops is slower than compiling)
keep_threshold = jax.jit(sampling.keep_threshold, static_argnames="candidates")
inverse_cdf_sample = jax.jit(sampling.inverse_cdf_sample)
sample_tokens = jax.jit(sampling.sample_tokens)

PROBS = [0.4, 0.3, 0.2, 0.1]
# (top_k, top_p, min_p) -> the smallest kept probability, by SGLang's definitions on the sorted distribution
CASES = [
    ((-1, 1.0, 0.0), 0.0),  # no filter
    ((2, 1.0, 0.0), 0.3),  # top-2
    ((-1, 0.5, 0.0), 0.3),  # mass before each rank: 0, .4, .7, .9 -> ranks 0, 1 are <= .5
    ((-1, 0.75, 0.0), 0.2),  # .7 <= .75 keeps rank 2
    ((-1, 1.0, 0.6), 0.24),  # min_p * max = .24 keeps .4 and .3
    ((3, 0.5, 0.0), 0.3),  # the strictest filter wins
    ((1, 1.0, 0.0), 0.4),
]


def _threshold(candidates):
    k, p, m = (np.array(col) for col in zip(*(case for case, _ in CASES)))
    probs = jnp.asarray([PROBS] * len(CASES), jnp.float32)
    return np.asarray(
        keep_threshold(
            probs,
            jnp.asarray(k, jnp.int32),
            jnp.asarray(p, jnp.float32),
            jnp.asarray(m, jnp.float32),
            candidates=candidates,
        )
    )


@pytest.mark.parametrize("candidates", [4, 2], ids=["from-candidates", "bisection-fallback"])
def test_keep_threshold_hand_cases(candidates):
    # with 2 candidates, the rows keeping 3+ tokens must take the exact bisection path and agree
    np.testing.assert_allclose(_threshold(candidates), [tau for _, tau in CASES], rtol=1e-6)


def test_inverse_cdf_sample_hand_cases():
    weights = jnp.asarray([[0.1, 0.0, 0.3, 0.6]] * 7, jnp.float32)
    uniform = jnp.asarray([0.05, 0.1, 0.11, 0.4, 0.41, 0.999, 1.0], jnp.float32)
    assert np.asarray(inverse_cdf_sample(weights, uniform)).tolist() == [0, 0, 2, 2, 3, 3, 3]


def test_inverse_cdf_sample_crosses_blocks_and_skips_zeros():
    weights = np.zeros((4, 600), np.float32)  # 3 blocks of 256; mass only at 0, 300 and 599
    weights[:, [0, 300, 599]] = [0.25, 0.25, 0.5]
    uniform = jnp.asarray([0.2, 0.3, 0.5, 0.51], jnp.float32)
    assert np.asarray(inverse_cdf_sample(jnp.asarray(weights), uniform)).tolist() == [0, 300, 300, 599]


def test_sample_tokens_frequencies_and_logprobs():
    logits = jnp.log(jnp.asarray([0.5, 0.25, 0.15, 0.1], jnp.float32))
    rows = 4000
    keys = jax.random.split(jax.random.key(0), rows)
    full = jnp.broadcast_to(logits, (rows, 4))
    ones = jnp.ones((rows,), jnp.float32)

    def draw(temperature, top_k):
        return sample_tokens(
            full, keys, ones * temperature, jnp.full((rows,), top_k, jnp.int32), ones, jnp.zeros((rows,), jnp.float32)
        )

    tokens, logprobs = draw(1.0, -1)
    freq = np.bincount(np.asarray(tokens), minlength=4) / rows
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.03)
    np.testing.assert_allclose(np.asarray(logprobs), np.log([0.5, 0.25, 0.15, 0.1])[np.asarray(tokens)], atol=1e-6)

    # temperature 2 flattens to p^(1/2) normalised; top_k=2 keeps the two best, renormalised, and the reported
    # log-prob stays the unfiltered log_softmax(logits / 2)
    tempered = np.sqrt([0.5, 0.25, 0.15, 0.1])
    tempered /= tempered.sum()
    tokens, logprobs = draw(2.0, 2)
    freq = np.bincount(np.asarray(tokens), minlength=4) / rows
    np.testing.assert_allclose(
        freq, [tempered[0] / tempered[:2].sum(), tempered[1] / tempered[:2].sum(), 0, 0], atol=0.03
    )
    np.testing.assert_allclose(np.asarray(logprobs), np.log(tempered)[np.asarray(tokens)], atol=1e-5)


def test_greedy_is_argmax_with_temperature_one_logprob():
    logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]], jnp.float32)
    tokens, logprobs = sample_tokens(
        logits, jax.random.split(jax.random.key(1), 2), jnp.zeros(2), jnp.full(2, -1), jnp.ones(2), jnp.zeros(2)
    )
    assert np.asarray(tokens).tolist() == [1, 0]
    expected = np.asarray(jax.nn.log_softmax(logits, axis=-1))[[0, 1], [1, 0]]
    np.testing.assert_allclose(np.asarray(logprobs), expected, atol=1e-6)
