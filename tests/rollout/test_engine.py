"""The JAX generation engine: greedy equals transformers and log-probs equal the trainer's recompute, also with
requests joining mid-decode; seeded samples do not depend on arrival order, slots or scheduling; the prefix cache
changes no output and evicts under pressure; prefill is chunked; the queue is fair; the number of compiled
programs is bounded and steady traffic compiles nothing; a failed step fails only the jobs in flight."""

import dataclasses

import jax
import numpy as np
import pytest
import transformers

from fr_jax.models.hf import load_pretrained
from fr_jax.models.tokenizer import load_tokenizer
from fr_jax.parallel.mesh import make_mesh
from fr_jax.rollout.engine import Engine, GenerationRequest, SamplingOptions
from fr_jax.rollout.scheduler import Scheduler
from tests.support.rollout import build_tiny_qwen2, hf_greedy, make_engine, recomputed_logprobs

PROMPTS = ["def add(a, b):", "The quick brown fox jumps over", "Write a haiku about JAX compilers and hot tea"]
# 72 tokens shared by every prompt of the prefix-cache tests: four full cache blocks of 16, then the rest differs
SHARED = tuple(range(1000, 1072))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), smollm2_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def tiny(tiny_dir, mesh1, tokenizer):
    return make_engine(tiny_dir, mesh1, tokenizer)


@pytest.fixture(scope="module")
def narrow(tiny_dir, mesh1, tokenizer):
    """Two slots, 4-step decode chunks, 16-token prefill chunks: requests queue, join mid-decode and prefill in
    pieces."""
    return make_engine(tiny_dir, mesh1, tokenizer, max_running_requests=2, chunk_steps=4, chunked_prefill_size=16)


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tuple(tokenizer.encode(p)) for p in PROMPTS]


def greedy(engine, prompts, max_new_tokens=24, **options):
    opts = SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0, **options)
    return [c for [c] in engine.generate([GenerationRequest(p, opts) for p in prompts])]


def run_to_end(engine, samples):
    while any(not s.finished for group in samples for s in group):
        engine.step()
    return [[s.completion() for s in group] for group in samples]


def test_greedy_matches_transformers_tiny(tiny, hf, prompt_ids):
    _, engine = tiny
    for prompt, completion in zip(prompt_ids, greedy(engine, prompt_ids)):  # three lengths in one batch
        assert completion.output_ids == hf_greedy(hf, list(prompt), 24)
        assert completion.prompt_tokens == len(prompt)


def test_greedy_matches_transformers_smollm2(smollm2_dir, mesh1):
    tokenizer = load_tokenizer(smollm2_dir)
    _, engine = make_engine(smollm2_dir, mesh1, tokenizer)
    prompts = [
        tuple(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)[
                "input_ids"
            ]
        )
        for q in ("What is 2 + 2?", "Name a prime number.")
    ]
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    for prompt, completion in zip(prompts, greedy(engine, prompts, max_new_tokens=16)):
        assert completion.output_ids == hf_greedy(hf, list(prompt), 16)


def _sampled(engine, prompt_ids, **options):
    requests = [
        GenerationRequest(prompt_ids[0], SamplingOptions(max_new_tokens=20, seed=11, **options), n=2),
        GenerationRequest(prompt_ids[2], SamplingOptions(max_new_tokens=20, seed=12, **options), n=2),
    ]
    flat = [(r.prompt_ids, c.output_ids, c.logprobs) for r, cs in zip(requests, engine.generate(requests)) for c in cs]
    return [list(col) for col in zip(*flat)]


@pytest.mark.parametrize(
    "options",
    [dict(temperature=0.7, top_p=0.9, top_k=50), dict(temperature=1.0), dict(temperature=0.0)],
    ids=["tempered-filtered", "plain", "greedy"],
)
def test_logprobs_match_trainer_recompute_fp32(tiny, mesh1, prompt_ids, options):
    model, engine = tiny
    prompts, outputs, logprobs = _sampled(engine, prompt_ids, **options)
    for ours, theirs in zip(logprobs, recomputed_logprobs(model, mesh1, prompts, outputs, options["temperature"])):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_logprobs_bf16_mean_difference(tiny_dir, mesh1, tokenizer, prompt_ids, record_property):
    model, engine = make_engine(tiny_dir, mesh1, tokenizer, dtype="bfloat16")
    prompts, outputs, logprobs = _sampled(engine, prompt_ids, temperature=1.0)
    diffs = np.concatenate(
        [
            np.abs(np.asarray(ours) - theirs)
            for ours, theirs in zip(logprobs, recomputed_logprobs(model, mesh1, prompts, outputs, 1.0))
        ]
    )
    record_property("bf16_mean_abs_logprob_diff", float(diffs.mean()))
    print(f"bf16 engine vs full-forward log-probs: mean |diff| {diffs.mean():.4f}, max {diffs.max():.4f}")
    assert diffs.mean() < 0.05


def test_requests_joining_mid_decode_keep_parity(narrow, hf, mesh1, prompt_ids):
    """Continuous batching: a row decodes alone, two requests arrive while it runs and take the slots that free up;
    every greedy output equals transformers and every log-prob the trainer's."""
    model, engine = narrow
    first = engine.submit([GenerationRequest(prompt_ids[0], SamplingOptions(max_new_tokens=30, temperature=0.0))])
    engine.step()
    engine.step()
    assert 0 < len(first[0][0].output_ids) < 30, "the first request should be mid-decode"
    later = engine.submit(
        [
            GenerationRequest(prompt_ids[1], SamplingOptions(max_new_tokens=21, temperature=0.0)),
            GenerationRequest(prompt_ids[2], SamplingOptions(max_new_tokens=17, temperature=0.8, seed=3)),
        ]
    )
    [[a]], [[b], [c]] = run_to_end(engine, first), run_to_end(engine, later)
    assert a.output_ids == hf_greedy(hf, list(prompt_ids[0]), 30)
    assert b.output_ids == hf_greedy(hf, list(prompt_ids[1]), 21)
    for (completion, temperature), prompt in zip([(a, 0.0), (b, 0.0), (c, 0.8)], prompt_ids):
        [theirs] = recomputed_logprobs(model, mesh1, [prompt], [completion.output_ids], temperature)
        np.testing.assert_allclose(completion.logprobs, theirs, atol=1e-4, rtol=0)


def test_seeded_samples_do_not_depend_on_arrival_order_or_scheduling(
    tiny, narrow, tiny_dir, mesh1, tokenizer, prompt_ids
):
    requests = [
        GenerationRequest(p, SamplingOptions(max_new_tokens=8 + 5 * i, temperature=1.0, seed=100 + i), n=2)
        for i, p in enumerate(prompt_ids)
    ]
    reference = [[c.output_ids for c in group] for group in tiny[1].generate(requests)]  # all at once
    _, engine = narrow  # two slots: samples queue and join mid-decode, in reverse order, one request per step
    samples = []
    for request in reversed(requests):
        samples.insert(0, engine.submit([request])[0])
        engine.step()
    assert [[c.output_ids for c in group] for group in run_to_end(engine, samples)] == reference
    _, static = make_engine(tiny_dir, mesh1, tokenizer, scheduling="static", max_running_requests=4)
    assert [[c.output_ids for c in group] for group in static.generate(requests)] == reference


def test_sampling_is_honest(tiny, prompt_ids):
    _, engine = tiny
    request = GenerationRequest(prompt_ids[1], SamplingOptions(max_new_tokens=20, temperature=1.0, seed=7), n=3)
    first = [c.output_ids for c in engine.generate([request])[0]]
    assert len({tuple(o) for o in first}) == 3, "n samples under temperature 1 should differ"
    reseeded = GenerationRequest(request.prompt_ids, SamplingOptions(max_new_tokens=20, temperature=1.0, seed=8), n=3)
    assert [c.output_ids for c in engine.generate([reseeded])[0]] != first


def test_stop_tokens_strings_and_lengths(tiny, tokenizer, prompt_ids):
    _, engine = tiny
    [reference] = greedy(engine, prompt_ids[:1], max_new_tokens=30, ignore_eos=True)
    ids = reference.output_ids
    assert reference.finish_reason == {"type": "length", "length": 30}
    k = next(i for i in range(3, 30) if ids[i] not in ids[:i])
    [by_token] = greedy(engine, prompt_ids[:1], max_new_tokens=30, stop_token_ids=(ids[k],))
    assert by_token.output_ids == ids[: k + 1]
    assert by_token.finish_reason == {"type": "stop", "matched": ids[k]}
    assert by_token.logprobs == pytest.approx(reference.logprobs[: k + 1], abs=1e-6)

    text = tokenizer.decode(ids, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    [by_string] = greedy(engine, prompt_ids[:1], max_new_tokens=30, stop=(stop,))
    kept = by_string.output_ids
    assert kept == ids[: len(kept)] and by_string.finish_reason == {"type": "stop", "matched": stop}
    assert stop in tokenizer.decode(kept, skip_special_tokens=True)
    assert stop not in tokenizer.decode(kept[:-1], skip_special_tokens=True)

    [empty] = greedy(engine, prompt_ids[:1], max_new_tokens=0)
    assert empty.output_ids == [] and empty.finish_reason == {"type": "length", "length": 0}


def test_prefix_cache_hits_change_no_output(tiny_dir, mesh1, tokenizer, prompt_ids):
    """Prompts sharing a 72-token prefix: the second and third wait one step for the first to cache its four full
    blocks, then reuse them (cached_tokens 64); a repeat reuses everything. Greedy outputs equal the cache-less
    engine's and log-probs agree. /flush_cache and new weights empty the cache."""
    prompts = [SHARED + p for p in prompt_ids]
    requests = [GenerationRequest(p, SamplingOptions(max_new_tokens=10, temperature=0.0)) for p in prompts]
    _, off = make_engine(tiny_dir, mesh1, tokenizer, prefix_cache_tokens=0)
    _, on = make_engine(tiny_dir, mesh1, tokenizer, prefix_cache_tokens=256)
    reference = [c for [c] in off.generate(requests)]
    assert all(c.cached_tokens == 0 for c in reference) and off.prefix.hit_tokens == 0
    for attempt in range(2):
        got = [c for [c] in on.generate(requests)]
        for ours, theirs in zip(got, reference):
            assert ours.output_ids == theirs.output_ids
            np.testing.assert_allclose(ours.logprobs, theirs.logprobs, atol=1e-4)
        if attempt == 0:
            assert [c.cached_tokens for c in got] == [0, 64, 64]
    assert [c.cached_tokens for c in got] == [(len(p) - 1) // 16 * 16 for p in prompts]
    assert on.prefix.hit_tokens == 2 * 64 + sum(c.cached_tokens for c in got)
    on.flush_cache()
    assert on._pool is None, "/flush_cache frees the pool's memory"
    compiles = on.compiles
    assert [c.cached_tokens for [c] in on.generate(requests[:1])] == [0]
    assert on.prefix.cached_blocks > 0 and on.compiles == compiles  # the pool comes back, nothing recompiles
    on.swap_state(load_pretrained(tiny_dir, mesh=mesh1), weight_version="v2")  # new weights: the old K/V is stale
    assert on.prefix.cached_blocks == 0
    assert [(c.cached_tokens, c.weight_version) for [c] in on.generate(requests[:1])] == [(0, "v2")]


def test_prefix_cache_evicts_under_memory_pressure(tiny_dir, mesh1, tokenizer, prompt_ids):
    """A two-block pool and prompts with four different 32-token prefixes: blocks are evicted, the pool never
    holds more than its capacity, and the outputs stay those of the cache-less engine."""
    prompts = [tuple(range(2000 + 100 * i, 2032 + 100 * i)) + prompt_ids[i % 3] for i in range(4)]
    requests = [GenerationRequest(p, SamplingOptions(max_new_tokens=6, temperature=0.0)) for p in prompts]
    _, off = make_engine(tiny_dir, mesh1, tokenizer, prefix_cache_tokens=0)
    _, small = make_engine(tiny_dir, mesh1, tokenizer, prefix_cache_tokens=32)
    reference = [c.output_ids for [c] in off.generate(requests)]
    for request in requests + requests[::-1]:
        small.generate([request])
        assert small.prefix.cached_blocks <= 2
    assert small.prefix.evicted_blocks >= 6
    assert [c.output_ids for [c] in small.generate(requests)] == reference


def test_long_prompt_prefills_in_chunks_while_another_request_decodes(narrow, hf, prompt_ids):
    _, engine = narrow
    engine.flush_cache()
    running = engine.submit([GenerationRequest(prompt_ids[1], SamplingOptions(max_new_tokens=40, temperature=0.0))])
    engine.step()
    long_prompt = tuple(range(3000, 3090)) + prompt_ids[2]  # 16-token chunks: six prefill steps
    waiting = engine.submit([GenerationRequest(long_prompt, SamplingOptions(max_new_tokens=8, temperature=0.0))])
    grew = []
    while not waiting[0][0].output_ids:
        before = len(running[0][0].output_ids)
        engine.step()
        grew.append(len(running[0][0].output_ids) > before)
    assert len(grew) >= 5 and all(grew[:-1]), "the running request must decode during every prefill step"
    [[a]], [[b]] = run_to_end(engine, running), run_to_end(engine, waiting)
    assert a.output_ids == hf_greedy(hf, list(prompt_ids[1]), 40)
    assert b.output_ids == hf_greedy(hf, list(long_prompt), 8)


def test_queue_is_fair_across_owners(narrow, prompt_ids):
    """Owner A queues six requests on two slots, then owner B one: B is served with A's next ones, not after all."""
    _, engine = narrow
    options = SamplingOptions(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    a = engine.submit([GenerationRequest(prompt_ids[i % 3], options) for i in range(6)], owner="A")
    b = engine.submit([GenerationRequest(prompt_ids[0], options)], owner="B")
    finished_at = {}
    step = 0
    while len(finished_at) < 7:
        engine.step()
        step += 1
        for key, s in [(f"A{i}", g[0]) for i, g in enumerate(a)] + [("B", b[0][0])]:
            if s.finished and key not in finished_at:
                finished_at[key] = step
    assert finished_at["B"] <= sorted(v for k, v in finished_at.items() if k != "B")[2]


def test_abort_finishes_queued_and_running_samples(narrow, prompt_ids):
    _, engine = narrow
    options = SamplingOptions(max_new_tokens=30, temperature=0.0)
    samples = engine.submit([GenerationRequest(p, options) for p in prompt_ids], owner="gone")
    engine.step()
    aborted = engine.abort("gone", "the client left")
    assert len(aborted) == 3 and all(
        s.finish_reason == {"type": "abort", "message": "the client left"} for s in aborted
    )
    assert {id(s) for group in samples for s in group} == {id(s) for s in aborted}
    assert not engine.has_work() and engine.running_samples == 0


def test_tensor_parallel_decode_matches_one_device(tiny, tiny_dir, tokenizer, prompt_ids):
    mesh = make_mesh(1, 1, 2, devices=jax.devices()[:2])
    _, sharded = make_engine(tiny_dir, mesh, tokenizer)
    layers = sharded.state["layers"]  # one Block per layer: [embed, heads, head_dim] each, heads split
    assert [layers[i]["q_proj"].get_value().sharding.spec[1] for i in range(len(layers))] == ["tensor"] * len(layers)
    ours = greedy(sharded, prompt_ids)
    reference = greedy(tiny[1], prompt_ids)
    for a, b in zip(ours, reference):
        assert a.output_ids == b.output_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_steady_traffic_compiles_nothing(tiny_dir, mesh1, tokenizer, prompt_ids):
    """Staggered arrivals of mixed lengths, run three times: the first run compiles (a bounded number of programs),
    the second meets a warm prefix cache (its own few shapes), the third compiles nothing."""
    _, engine = make_engine(tiny_dir, mesh1, tokenizer, max_running_requests=4, chunk_steps=4, chunked_prefill_size=32)
    options = [SamplingOptions(max_new_tokens=m, temperature=1.0, seed=m) for m in (5, 30, 12, 3, 20)]
    prompts = [prompt_ids[0], SHARED + prompt_ids[1], prompt_ids[2], SHARED + prompt_ids[0], prompt_ids[1] * 3]

    def traffic():
        samples = []
        for prompt, option in zip(prompts, options):
            samples.append(engine.submit([GenerationRequest(prompt, option, n=2)])[0])
            engine.step()
        return [[c.output_ids for c in group] for group in run_to_end(engine, samples)]

    first = traffic()
    cold = engine.compiles
    assert traffic() == first
    warm = engine.compiles
    assert traffic() == first
    print(
        f"compiles: {cold} cold, {warm - cold} more with a warm prefix cache, {engine.compiles - warm} in steady state"
    )
    assert engine.compiles == warm and cold <= 40


def test_refuses_bad_requests(tiny):
    _, engine = tiny
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([GenerationRequest((1, 49152))])
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([GenerationRequest(())])
    with pytest.raises(ValueError, match="exceeds the context length"):
        engine.generate([GenerationRequest((1,) * 500, SamplingOptions(max_new_tokens=13))])
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ValueError, match="scheduling='fifo'"):
        Engine(tiny[0], mesh=engine.mesh, scheduling="fifo")


@pytest.mark.parametrize("program", ["_save", "_prefill", "_decode"])
def test_a_failed_step_fails_its_jobs_and_serving_goes_on(tiny_dir, mesh1, tokenizer, prompt_ids, program):
    """A program that fails after its inputs were donated (the prefix pool, the group cache, the decode cache):
    the jobs in flight get the error, the cache is flushed, and the next request is served as if nothing happened,
    its cache hits counted from zero."""
    _, engine = make_engine(tiny_dir, mesh1, tokenizer, prefix_cache_tokens=256)
    request = GenerationRequest(SHARED + prompt_ids[0], SamplingOptions(max_new_tokens=6, temperature=0.0))
    [[reference]] = engine.generate([request])
    scheduler = Scheduler(engine)
    try:
        real = getattr(engine, program)

        def fails_after_running(*args):
            real(*args)  # the donated buffers are gone now
            raise RuntimeError("device lost")

        fails_after_running._cache_size = real._cache_size  # the engine counts compiles by it
        setattr(engine, program, fails_after_running)
        other = tuple(range(4000, 4040)) + prompt_ids[1]  # new blocks to save
        failed = scheduler.submit([dataclasses.replace(request, prompt_ids=other)])
        with pytest.raises(RuntimeError, match="device lost"):
            failed.future.result(timeout=120)
        setattr(engine, program, real)
        assert engine.prefix.cached_blocks == 0 and not engine.has_work()
        [[again]] = scheduler.submit([request]).future.result(timeout=120)
        assert again.output_ids == reference.output_ids and again.cached_tokens == 0
        [[hit]] = scheduler.submit([request]).future.result(timeout=120)
        assert hit.output_ids == reference.output_ids and hit.cached_tokens == 64
    finally:
        scheduler.stop()
