"""The rollout server over real HTTP, started by the launchers as a child process: SGLang protocol conformance
(the fields SGLang's requests define, its answers, its streams, prefix-cache hits and /flush_cache), OpenAI routes
with the official `openai` client, the real sglang-router in front of it, backpressure, weight updates (drained or
aborted in-flight requests, then RolloutClient/sync_weights), bad requests, and concurrent requests served
together.

Every conformance and weight-update test runs against fr_jax's server (`launch: local`) and, on a machine with a
CUDA GPU and sglang installed, against real SGLang (`launch: sglang`, marked gpu) with the same assertions: the
field-by-field check of one is the check of the other.
"""

import concurrent.futures
import json
import os
import shutil
import sys
import time

import httpx
import jax
import openai
import pytest
from flax import nnx

from fr_jax.models.hf import load_pretrained, save_pretrained
from fr_jax.parallel.mesh import make_mesh
from fr_jax.rollout import RolloutClient, RolloutError, ServerProcess, free_port, launch_server, sync_weights
from fr_jax.rollout.protocol import GenerateOutput
from tests.support.rollout import build_tiny_qwen2, sglang_missing

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), smollm2_dir)


@pytest.fixture(scope="module", params=["local", pytest.param("sglang", marks=pytest.mark.gpu)])
def server(request, tiny_dir):
    kind = request.param
    if kind == "sglang":
        missing = sglang_missing()
        if missing:
            pytest.skip(f"real SGLang needs a CUDA GPU and the sglang package: {missing}")
        process = launch_server("sglang", tiny_dir, mem_fraction_static=0.3, weight_version="v0")
    else:
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
        process = launch_server(
            "local",
            tiny_dir,
            env=env,
            mesh="1,1,1",
            weight_version="v0",
            max_running_requests=8,
            max_queued_requests=64,
            num_continuous_decode_steps=8,
        )
    with process, RolloutClient(process.url, retry_backoff_s=0.5) as client:
        yield kind, process, client


@pytest.fixture
def local_server(server):
    if server[0] != "local":
        pytest.skip("fr_jax-specific behaviour (real SGLang differs here by design)")
    return server


def post(process, path, body, status=200):
    response = httpx.post(process.url + path, json=body, timeout=300)
    assert response.status_code == status, response.text
    return response.json()


def check_generate_output(out: dict, *, logprobs: bool, logprob_text: bool = False) -> None:
    """One /generate answer, field by field as SGLang's tokenizer manager builds it."""
    assert {"text", "output_ids", "meta_info"} <= out.keys()
    assert isinstance(out["text"], str)
    assert isinstance(out["output_ids"], list) and all(isinstance(t, int) for t in out["output_ids"])
    meta = out["meta_info"]
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"} <= meta.keys()
    assert isinstance(meta["id"], str) and meta["id"]
    for key in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        assert isinstance(meta[key], int), key
    assert isinstance(meta["e2e_latency"], float) and meta["e2e_latency"] > 0
    assert meta["completion_tokens"] == len(out["output_ids"])
    reason = meta["finish_reason"]
    assert reason["type"] in ("stop", "length")
    if reason["type"] == "length":
        assert reason["length"] == meta["completion_tokens"]
    else:
        assert isinstance(reason["matched"], (int, str))
    if logprobs:
        triples = meta["output_token_logprobs"]
        assert [t[1] for t in triples] == out["output_ids"]
        for logprob, token, text in triples:
            assert isinstance(logprob, float) and logprob <= 0 and isinstance(token, int)
            assert isinstance(text, str) if logprob_text else text is None
    else:
        assert meta.get("output_token_logprobs") is None
    GenerateOutput.model_validate(out)  # what RolloutClient parses


def test_generate_single_text(server):
    _, process, _ = server
    out = post(
        process,
        "/generate",
        {
            "text": PROMPT,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0},
            "return_logprob": True,
            "return_text_in_logprobs": True,
        },
    )
    assert isinstance(out, dict), "a single prompt gets a single object"
    check_generate_output(out, logprobs=True, logprob_text=True)
    assert out["meta_info"]["completion_tokens"] <= 8


def test_generate_batch_of_ids_with_n(server):
    _, process, _ = server
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29]]
    outs = post(
        process,
        "/generate",
        {
            "input_ids": prompts,
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 1.0, "n": 2},
        },
    )
    assert isinstance(outs, list) and len(outs) == 4
    for out in outs:
        check_generate_output(out, logprobs=True)
    # prompt-major: both samples of prompt 0, then both of prompt 1
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [5, 5, 9, 9]
    assert len({o["meta_info"]["id"] for o in outs}) == 4
    plain = post(process, "/generate", {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 4}})
    check_generate_output(plain, logprobs=False)


def test_stop_string_is_trimmed_from_text(server):
    _, process, _ = server
    base = {"text": PROMPT, "return_logprob": True}
    full = post(
        process, "/generate", {**base, "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}}
    )
    stop = full["text"][6:9]
    cut = post(
        process, "/generate", {**base, "sampling_params": {"max_new_tokens": 16, "temperature": 0, "stop": [stop]}}
    )
    check_generate_output(cut, logprobs=True)
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert full["text"].startswith(cut["text"]) and stop not in cut["text"]
    assert cut["output_ids"] == full["output_ids"][: len(cut["output_ids"])]


def test_openai_routes_report_usage(server):
    _, process, _ = server
    chat = post(
        process,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6, "temperature": 0, "n": 2},
    )
    assert chat["object"] == "chat.completion" and len(chat["choices"]) == 2
    for choice in chat["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
    usage = chat["usage"]
    assert usage["prompt_tokens"] > 5 and 2 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    done = post(process, "/v1/completions", {"prompt": [PROMPT, "x = 1"], "max_tokens": 5, "temperature": 0})
    assert done["object"] == "text_completion" and [c["index"] for c in done["choices"]] == [0, 1]
    assert done["usage"]["completion_tokens"] <= 10 and done["usage"]["prompt_tokens"] >= 6


def test_client_returns_checked_rollouts(server):
    kind, _, client = server
    assert client.health()
    [[a, b], [c, d]] = client.generate([[5, 6, 7], [8, 9, 10, 11]], {"max_new_tokens": 6, "temperature": 1.0, "n": 2})
    for rollout in (a, b, c, d):
        assert len(rollout.output_ids) == len(rollout.logprobs) >= 1
        assert rollout.finish_reason in ("stop", "length") and all(lp <= 0 for lp in rollout.logprobs)
    assert (a.prompt_tokens, c.prompt_tokens) == (3, 4)
    [[greedy]] = client.generate([PROMPT], {"max_new_tokens": 6, "temperature": 0})
    assert greedy.text
    per_prompt = [{"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": seed} for seed in (1, 2)]
    first = client.generate([[5, 6, 7]] * 2, per_prompt)
    assert [len(group) for group in first] == [1, 1]
    if kind == "local":  # real SGLang honours sampling_seed only with --enable-deterministic-inference
        assert client.generate([[5, 6, 7]] * 2, per_prompt) == first
        assert first[0][0].output_ids != first[1][0].output_ids
    if kind == "local":  # older SGLang releases leave weight_version out of meta_info
        assert greedy.weight_version == "v0"


def test_control_endpoints(server):
    kind, process, client = server
    assert httpx.get(process.url + "/health").status_code == 200
    assert client.model_info().weight_version == client.weight_version() == "v0"
    assert httpx.post(process.url + "/flush_cache").status_code == 200
    if kind == "local":
        assert httpx.get(process.url + "/get_weight_version").json() == {"weight_version": "v0"}
        assert httpx.get(process.url + "/health_generate").status_code == 200


def test_cached_tokens_count_prefix_hits_until_flush_cache(server):
    """A repeated prompt reuses its K/V (meta_info.cached_tokens > 0, the same output); after /flush_cache the next
    one computes everything again (cached_tokens 0) and the one after hits again."""
    _, process, _ = server
    body = {"input_ids": list(range(900, 940)), "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    cold = post(process, "/generate", body)
    warm = post(process, "/generate", body)
    assert cold["meta_info"]["cached_tokens"] == 0 and warm["meta_info"]["cached_tokens"] > 0
    assert warm["output_ids"] == cold["output_ids"]
    assert httpx.post(process.url + "/flush_cache").status_code == 200
    flushed = post(process, "/generate", body)
    assert flushed["meta_info"]["cached_tokens"] == 0 and flushed["output_ids"] == cold["output_ids"]
    assert post(process, "/generate", body)["meta_info"]["cached_tokens"] == warm["meta_info"]["cached_tokens"]


def test_bad_requests_get_400_naming_the_problem(local_server):
    _, process, client = local_server
    cases = [
        ({"text": "a", "input_ids": [1]}, "exactly one of text and input_ids"),
        ({"text": "a", "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
        ({"text": "a", "sampling_params": {"max_new_token": 5}}, "max_new_token"),
        ({"text": "a", "bogus": 1}, "bogus"),
        ({"input_ids": [1, 49152]}, "outside the vocabulary"),
        ({"input_ids": [1] * 500, "sampling_params": {"max_new_tokens": 100}}, "context length"),
        ({"text": "a", "sampling_params": {"top_p": 0}}, "top_p"),
        ({"text": "a", "image_data": "cat.png"}, "image_data"),
        ({"text": "a", "return_hidden_states": True}, "return_hidden_states"),
        ({"text": "a", "logprob_start_len": 0}, "logprob_start_len"),
    ]
    for body, expected in cases:
        error = post(process, "/generate", body, status=400)["error"]["message"]
        assert expected in error, (body, error)
    with pytest.raises(RolloutError, match="refused.*outside the vocabulary"):
        client.generate([[1, 49152]])  # the server's refusal reaches the caller at once
    with pytest.raises(ValueError, match="top_k"):
        client.generate([[1, 2]], {"top_k": 0})  # checked before sending
    assert client.generate([[1, 2]], {"max_new_tokens": 2})[0][0].output_ids  # still serving


def _engine_state(process) -> dict:
    return httpx.get(process.url + "/server_info").json()["internal_states"][0]


def test_concurrent_requests_are_served_together(local_server):
    _, process, _ = local_server
    bodies = [
        {"input_ids": [3, 4, 5 + i], "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}}
        for i in range(6)
    ]
    post(process, "/generate", bodies[0])  # compiles
    before = _engine_state(process)
    post(process, "/generate", bodies[0])
    alone = _engine_state(process)["engine_steps"] - before["engine_steps"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda body: post(process, "/generate", body), bodies))
    after = _engine_state(process)
    assert all(len(o["output_ids"]) == 24 for o in outs)
    assert after["jobs_served"] - before["jobs_served"] == 7
    assert after["engine_steps"] - before["engine_steps"] - alone < 3 * alone, "the six should decode side by side"


def test_every_sglang_request_field_is_accepted(local_server):
    """What SGLang's own clients and sglang-router send: metadata fields are ignored, unserved ones at their neutral
    value pass, and the answer is the same as without them."""
    _, process, _ = local_server
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    plain = post(process, "/generate", body)
    extras = {
        # sglang-router 0.3's body for a plain /generate (captured from the real router)
        "model": None,
        "return_text_in_logprobs": False,
        "stream": False,
        "log_metrics": True,
        "return_hidden_states": False,
        "background": False,
        "no_logs": False,
        "return_bytes": False,
        "return_entropy": False,
        # metadata with values: ignored
        "priority": 3,
        "session_id": "s-1",
        "routing_key": "k",
        "cache_salt": "salt",
        "custom_labels": {"team": "rl"},
        "routed_dp_rank": 0,
        # unserved fields at their neutral value
        "image_data": None,
        "lora_path": None,
        "return_routed_experts": False,
        "token_ids_logprob": None,
    }
    sampling = {**body["sampling_params"], "frequency_penalty": 0.0, "stream_interval": 4, "regex": None}
    dressed = post(process, "/generate", {**body, **extras, "sampling_params": sampling})
    assert dressed["output_ids"] == plain["output_ids"] and dressed["text"] == plain["text"]
    refused = post(process, "/generate", {**body, "modell": "x"}, status=400)["error"]["message"]
    assert "modell" in refused


def test_router_facing_endpoints(local_server):
    """What sglang-router reads from a worker: /server_info (model path, served name, limits), /model_info
    (model type, architectures), /get_load (a list, one entry per data-parallel rank)."""
    _, process, _ = local_server
    info = httpx.get(process.url + "/server_info").json()
    assert info["model_path"] and info["served_model_name"] and info["max_running_requests"] == 8
    assert info["max_queued_requests"] == 64 and info["dp_size"] == 1 and info["num_continuous_decode_steps"] == 8
    model = httpx.get(process.url + "/model_info").json()
    assert model["model_type"] == "qwen2" and model["architectures"] == ["Qwen2ForCausalLM"]
    [load] = httpx.get(process.url + "/get_load").json()
    assert {"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"} <= load.keys()
    assert all(isinstance(load[k], int) for k in ("dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"))


def test_a_full_queue_answers_503(local_server):
    _, process, _ = local_server
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "n": 65}}
    response = httpx.post(process.url + "/generate", json=body, timeout=60)
    assert response.status_code == 503 and response.json()["error"]["message"] == "The request queue is full."
    assert len(post(process, "/generate", {**body, "sampling_params": {"max_new_tokens": 2, "n": 8}})) == 8


def _sse(process, path, body) -> list[dict]:
    with httpx.stream("POST", process.url + path, json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_generate_streams_sglang_data_lines(server):
    """SGLang's stream: each chunk holds the text and ids so far; the last has the finish reason; it ends as the
    non-streamed answer does. A batch's chunks carry their sample's index."""
    _, process, _ = server
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 40, "temperature": 0}, "return_logprob": True}
    whole = post(process, "/generate", body)
    chunks = _sse(process, "/generate", {**body, "stream": True})
    assert len(chunks) >= 2, "40 tokens should come in more than one chunk"
    for before, after in zip(chunks, chunks[1:]):
        assert after["output_ids"][: len(before["output_ids"])] == before["output_ids"]
        assert before["meta_info"]["finish_reason"] is None
    last = chunks[-1]
    check_generate_output(last, logprobs=True)
    assert (last["text"], last["output_ids"]) == (whole["text"], whole["output_ids"])

    batch = {"input_ids": [[11, 12, 13], [21, 22, 23, 24]], "sampling_params": {"max_new_tokens": 20, "n": 2}}
    chunks = _sse(process, "/generate", {**batch, "stream": True})
    finals = {c["index"]: c for c in chunks if c["meta_info"]["finish_reason"] is not None}
    assert sorted(finals) == [0, 1, 2, 3]
    assert [finals[k]["meta_info"]["prompt_tokens"] for k in range(4)] == [3, 3, 4, 4]


def test_a_stream_closed_early_aborts_its_request(local_server):
    _, process, _ = local_server
    before = _engine_state(process)["samples_aborted"]
    params = {"max_new_tokens": 480, "temperature": 0, "ignore_eos": True}
    body = {"input_ids": [41, 42, 43], "sampling_params": params, "stream": True}
    with httpx.stream("POST", process.url + "/generate", json=body, timeout=60) as response:
        first = json.loads(next(line for line in response.iter_lines() if line).removeprefix("data: "))
    assert first["meta_info"]["finish_reason"] is None
    deadline = time.monotonic() + 60
    while (state := _engine_state(process))["samples_aborted"] == before:
        assert time.monotonic() < deadline, "closing the stream should abort the request"
        time.sleep(0.05)
    assert state["running_samples"] == 0


def test_openai_client_streams_chat_and_completions(server):
    """The official openai client, streaming and not: the streamed pieces add up to the non-streamed text."""
    _, process, _ = server
    client = openai.OpenAI(base_url=process.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
    pieces, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
        usage = chunk.usage or usage
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces) == whole.choices[0].message.content
    assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) == {None}
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens > 5

    text = client.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_sglang_router_registers_the_server_and_forwards(local_server):
    """The real sglang-router in front of the server: it discovers the worker (health, server and model info),
    polls its load, and forwards /generate and /v1/completions, adding fields of its own."""
    _, process, _ = local_server
    port = free_port()
    command = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", process.url]
    command += ["--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin", "--log-level", "warn"]
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 8, "temperature": 0}, "return_logprob": True}
    direct = post(process, "/generate", body)
    with ServerProcess(command, host="127.0.0.1", port=port, name="sglang-router", startup_timeout=120) as router:
        deadline = time.monotonic() + 60
        while (response := httpx.post(router.url + "/generate", json=body, timeout=120)).status_code != 200:
            assert time.monotonic() < deadline, f"the router never forwarded: {response.status_code} {response.text}"
            time.sleep(0.5)
        routed = response.json()
        check_generate_output(routed, logprobs=True)
        assert routed["output_ids"] == direct["output_ids"]
        [load] = httpx.get(router.url + "/get_loads", timeout=30).json()["workers"]
        assert load["worker"] == process.url and load["load"] >= 0
        completion = httpx.post(
            router.url + "/v1/completions",
            json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0},
            timeout=120,
        )
        assert completion.status_code == 200, completion.text
        assert completion.json()["choices"][0]["text"]


LONG_GENERATION = {
    "input_ids": [[31, 32, 33]] * 2,
    "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True},
}


def _start_long_generation(process, pool):
    started = pool.submit(post, process, "/generate", LONG_GENERATION)
    deadline = time.monotonic() + 120
    while _engine_state(process)["running_samples"] == 0:
        assert time.monotonic() < deadline and not started.done(), "the long request never started"
        time.sleep(0.02)
    return started


def _perturbed_model(tiny_dir):
    """The tiny model's weights plus noise: greedy outputs change within a few tokens."""
    model = load_pretrained(tiny_dir, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    params = nnx.state(model, nnx.Param)
    noise = jax.tree.map(lambda x: 0.2 * jax.random.normal(jax.random.key(3), x.shape, x.dtype), params)
    nnx.update(model, jax.tree.map(lambda x, e: x + e, params, noise))
    return model


def test_weight_update_drains_or_aborts_in_flight_requests(local_server, tiny_dir, tmp_path):
    """SGLang's update_weights_from_disk: by default the running requests finish on the old weights, then the new
    ones load; with abort_all_requests they end at once with finish_reason abort. num_paused_requests is 0."""
    _, process, client = local_server
    old = client.weight_version()
    on_old_weights = [o["output_ids"] for o in post(process, "/generate", LONG_GENERATION)]
    perturbed = tmp_path / "perturbed"
    save_pretrained(_perturbed_model(tiny_dir), perturbed)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = _start_long_generation(process, pool)
        update = post(process, "/update_weights_from_disk", {"model_path": str(perturbed), "weight_version": "drained"})
        outs = running.result()
    assert update == {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
    # Every one of the 400 tokens came from the old weights: a swap mid-generation would have changed the rest.
    assert [o["output_ids"] for o in outs] == on_old_weights, "the update must wait for the running request"
    assert all(o["meta_info"]["finish_reason"] == {"type": "length", "length": 400} for o in outs)
    assert all(o["meta_info"]["weight_version"] == old for o in outs)
    assert client.weight_version() == "drained"
    assert [o["output_ids"] for o in post(process, "/generate", LONG_GENERATION)] != on_old_weights

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = _start_long_generation(process, pool)
        body = {"model_path": str(tiny_dir), "weight_version": "aborted", "abort_all_requests": True}
        assert post(process, "/update_weights_from_disk", body)["success"]
        outs = running.result()
    assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs)
    assert all(o["meta_info"]["completion_tokens"] < 400 for o in outs)
    assert client.weight_version() == "aborted"
    after = post(process, "/generate", {"input_ids": [31, 32, 33], "sampling_params": {"max_new_tokens": 4}})
    assert after["meta_info"]["weight_version"] == "aborted"


def test_client_retries_then_fails_clearly():
    client = RolloutClient("http://127.0.0.1:9", max_retries=1, retry_backoff_s=0.01)  # nothing listens on port 9
    with pytest.raises(RolloutError, match="after 2 attempts"):
        client.generate([[1, 2, 3]])
    assert not client.health()


def test_launcher_reports_a_server_that_cannot_start(tmp_path):
    with pytest.raises(RuntimeError, match="(?s)exited with code 2 .*not an HF model directory"):
        launch_server("local", tmp_path / "missing", startup_timeout=120)


def test_weight_update_changes_outputs_and_version(server, tiny_dir, tmp_path):
    """Last in the file: it leaves the server on new weights."""
    kind, process, client = server
    body = {"input_ids": [[7, 8, 9, 10]], "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
    before = post(process, "/generate", body)[0]["output_ids"]

    sync = sync_weights(client, _perturbed_model(tiny_dir), tmp_path / "v1", weight_version="v1")
    assert sync.gigabytes > 0.05 and sync.seconds_per_gb > 0
    assert client.weight_version() == "v1"
    after = post(process, "/generate", body)[0]
    assert after["output_ids"] != before
    assert after["meta_info"].get("weight_version", "v1") == "v1"

    wrong = shutil.copytree(tiny_dir, tmp_path / "wrong")  # same tensors, a config that does not match them
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(RolloutError, match="refused the weights"):
        client.update_weights_from_disk(wrong, weight_version="v2")
    assert client.weight_version() == "v1"
    assert post(process, "/generate", body)[0]["output_ids"] == after["output_ids"]
    if kind == "local":
        refusal = post(process, "/update_weights_from_disk", {"model_path": str(wrong)}, status=400)
        assert refusal["success"] is False and "hidden_size: served 256, checkpoint 128" in refusal["message"]
