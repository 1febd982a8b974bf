"""The JAX generation engine: greedy equals transformers, log-probs equal the trainer's recompute, honest sampling,
stops, tensor-parallel decode, bounded compilation. Most requests share one bucket (rows 4, prompt 16, new 32)
so the whole file compiles the decode loop only a few times."""

import jax
import numpy as np
import pytest
import transformers

from fr_jax.models.hf import load_pretrained
from fr_jax.models.tokenizer import load_tokenizer
from fr_jax.parallel.mesh import make_mesh
from fr_jax.rollout.engine import Engine, GenerationRequest, SamplingOptions
from fr_jax.rollout.server import eos_token_ids
from tests.support.rollout import build_tiny_qwen2, hf_greedy, recomputed_logprobs

PROMPTS = ["def add(a, b):", "The quick brown fox jumps over", "Write a haiku about JAX compilers and hot tea"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), smollm2_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def make_engine(model_dir, mesh, tokenizer, **overrides):
    model = load_pretrained(model_dir, mesh=mesh, **overrides)
    return model, Engine(
        model,
        mesh=mesh,
        eos_token_ids=eos_token_ids(model_dir, tokenizer),
        detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )


@pytest.fixture(scope="module")
def tiny(tiny_dir, mesh1, tokenizer):
    return make_engine(tiny_dir, mesh1, tokenizer)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tuple(tokenizer.encode(p)) for p in PROMPTS]


def greedy(engine, prompts, max_new_tokens=24, **options):
    opts = SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0, **options)
    return [c for [c] in engine.generate([GenerationRequest(p, opts) for p in prompts])]


def test_greedy_matches_transformers_tiny(tiny, tiny_dir, prompt_ids):
    _, engine = tiny
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ours = greedy(engine, prompt_ids)  # three lengths: left padding in one batch
    for prompt, completion in zip(prompt_ids, ours):
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
    model, engine = make_engine(tiny_dir, mesh1, tokenizer, param_dtype="bfloat16", dtype="bfloat16")
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


def test_sampling_is_honest(tiny, prompt_ids):
    _, engine = tiny
    request = GenerationRequest(prompt_ids[1], SamplingOptions(max_new_tokens=20, temperature=1.0, seed=7), n=3)
    first = [c.output_ids for c in engine.generate([request])[0]]
    assert len({tuple(o) for o in first}) == 3, "n samples under temperature 1 should differ"
    other = GenerationRequest(prompt_ids[0], SamplingOptions(max_new_tokens=30, temperature=1.0))
    again = [c.output_ids for c in engine.generate([other, request])[1]]  # another batch composition
    assert again == first, "the same seed must reproduce the same samples"
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
    engine.chunk_steps = 4  # the host checks the text every 4 steps instead of once
    try:
        [in_chunks] = greedy(engine, prompt_ids[:1], max_new_tokens=30, stop=(stop,))
    finally:
        engine.chunk_steps = 32
    assert in_chunks.output_ids == by_string.output_ids
    kept = by_string.output_ids
    assert kept == ids[: len(kept)] and by_string.finish_reason == {"type": "stop", "matched": stop}
    assert stop in tokenizer.decode(kept, skip_special_tokens=True)
    assert stop not in tokenizer.decode(kept[:-1], skip_special_tokens=True)

    [empty] = greedy(engine, prompt_ids[:1], max_new_tokens=0)
    assert empty.output_ids == [] and empty.finish_reason == {"type": "length", "length": 0}


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


def test_compiles_are_bounded_by_buckets(tiny, prompt_ids):
    _, engine = tiny
    greedy(engine, prompt_ids, max_new_tokens=24)
    before = engine.compiles
    greedy(engine, [p[:5] for p in prompt_ids], max_new_tokens=17)  # same buckets: rows 4, prompt 16, new 32
    greedy(engine, [prompt_ids[2] + prompt_ids[1][:2]] * 2 + [prompt_ids[0]], max_new_tokens=31)
    assert engine.compiles == before


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
