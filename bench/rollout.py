"""Rollout generation tokens/s: fr_jax's engine vs transformers' generate, side by side, same model, prompts and
settings; then the HTTP server's overhead over the in-process engine.

Setup: SmolLM2-135M-Instruct (fp32), a batch of HumanEval prompts cut to --prompt-tokens tokens, --new-tokens new
tokens each, sampling at temperature 1 with top-k/top-p off and EOS ignored, so both sides generate exactly
batch x new-tokens tokens. Each side is warmed up first (the engine's compiles, torch's first call), then timed
--repeats times; the best time counts. Wall time and this process's CPU time are both printed, with the load
average: other processes on these cores slow both sides, and not equally. transformers runs twice, with torch's
default thread count and with one thread: on a shared 2-core machine its multi-threaded GEMMs can be many times
slower than single-threaded ones, and the fair baseline is the faster of the two.

    python bench/rollout.py                         # batch 16, 128 new tokens (goal: engine >= 3x transformers)
    python bench/rollout.py --batch 32 --new-tokens 256 --no-server
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from fr_jax.data.tasks import default_data_dir  # noqa: E402
from fr_jax.models.gguf import smollm2_hf_dir  # noqa: E402
from fr_jax.models.hf import load_pretrained  # noqa: E402
from fr_jax.models.tokenizer import load_tokenizer  # noqa: E402
from fr_jax.parallel.mesh import make_mesh  # noqa: E402
from fr_jax.rollout import RolloutClient, launch_local  # noqa: E402
from fr_jax.rollout.engine import Engine, GenerationRequest, SamplingOptions  # noqa: E402


def prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    with open(default_data_dir() / "HumanEval.jsonl") as f:
        tasks = [json.loads(line) for line in f][:batch]
    return [tokenizer.encode(task["prompt"])[:length] for task in tasks]


def best_of(repeats: int, run) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of the fastest of `repeats` runs."""
    times = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(times)


def bench_engine(model_dir, ids, new_tokens, repeats, dtype) -> tuple[float, float]:
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = load_pretrained(model_dir, mesh=mesh, param_dtype=dtype, dtype=dtype)
    engine = Engine(model, mesh=mesh, max_batch_rows=len(ids))
    options = SamplingOptions(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True)
    requests = [GenerationRequest(tuple(p), options) for p in ids]
    engine.generate(requests)  # compiles
    return best_of(repeats, lambda: engine.generate(requests))


def bench_transformers(model_dir, tokenizer, ids, new_tokens, repeats, threads, dtype) -> tuple[float, float]:
    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, as the engine does
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])

    def run(n):
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad,
            )
        assert out.shape[1] == width + n

    run(2)  # warm-up
    return best_of(repeats, lambda: run(new_tokens))


def bench_server(model_dir, ids, new_tokens, repeats, dtype) -> tuple[float, float]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    params = {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}
    with (
        launch_local(
            model_dir, env=env, mesh="1,1,1", max_running_requests=len(ids), dtype=dtype, param_dtype=dtype
        ) as server,
        RolloutClient(server.url) as client,
    ):
        client.generate(ids, params)  # compiles
        return best_of(repeats, lambda: client.generate(ids, params))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="weights, activations and KV cache of both sides (matmuls accumulate in float32)",
    )
    p.add_argument("--no-server", action="store_true", help="skip the HTTP server overhead measurement")
    p.add_argument("--no-transformers", action="store_true", help="skip the (slow) transformers baseline")
    p.add_argument(
        "--torch-threads",
        default=f"{os.cpu_count()},1",
        help="comma-separated torch intra-op thread counts, one baseline run each (default: all cores, 1)",
    )
    args = p.parse_args()

    model_dir = smollm2_hf_dir()
    tokenizer = load_tokenizer(model_dir)
    ids = prompts(tokenizer, args.batch, args.prompt_tokens)
    tokens = args.batch * args.new_tokens
    print(
        f"SmolLM2-135M {args.dtype}, batch {args.batch}, prompts {min(map(len, ids))}-{max(map(len, ids))} tokens, "
        f"{args.new_tokens} new tokens, temperature 1; {os.cpu_count()} CPU cores; load average {os.getloadavg()}"
    )

    engine_s, engine_cpu = bench_engine(model_dir, ids, args.new_tokens, args.repeats, args.dtype)
    print(
        f"fr_jax engine (in process)   {tokens / engine_s:8.1f} tok/s   ({engine_s:.2f}s wall, {engine_cpu:.2f}s CPU)"
    )
    for threads in [] if args.no_transformers else [int(t) for t in args.torch_threads.split(",")]:
        hf_s, hf_cpu = bench_transformers(model_dir, tokenizer, ids, args.new_tokens, args.repeats, threads, args.dtype)
        print(
            f"transformers, {threads} thread(s)     {tokens / hf_s:8.1f} tok/s   ({hf_s:.2f}s wall, {hf_cpu:.2f}s CPU)"
        )
        print(
            f"  engine / transformers      {hf_s / engine_s:8.2f}x wall (goal >= 3x), "
            f"{hf_cpu / engine_cpu:.2f}x CPU time"
        )
    if not args.no_server:
        server_s, _ = bench_server(model_dir, ids, args.new_tokens, args.repeats, args.dtype)
        print(f"fr_jax server over HTTP      {tokens / server_s:8.1f} tok/s   ({server_s:.2f}s wall)")
        print(f"server overhead vs engine    {100 * (server_s / engine_s - 1):+8.1f}%")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
