"""Rollout tokens/s of real SGLang against fr_jax's embedded engine server: same device, model, requests.

Each server is started in turn by the trainer's own launchers (fr_jax.rollout.launch_server, `launch: sglang` and
`launch: local`) and spoken to over SGLang's /generate by RolloutClient, as a GRPO round does: --prompts HumanEval
prompts (token ids, the same for both) x --n samples, --new-tokens each with EOS ignored, so both generate exactly
the same number of tokens. A first round warms each server up (compiles, CUDA graphs); the best of --repeats timed
rounds counts. One server runs at a time, so each has the whole device. Prints a line per server and the ratio,
and writes the figures as JSON (--out).

    python bench/rollout_servers.py --out gpu_check_out/rollout_servers.json            # SmolLM2-135M, bf16
    python bench/rollout_servers.py --servers local --prompts 2 --n 2 --new-tokens 8   # the embedded side alone
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

from fr_jax.data.tasks import default_data_dir
from fr_jax.models.gguf import smollm2_hf_dir
from fr_jax.models.tokenizer import load_tokenizer
from fr_jax.rollout import RolloutClient, launch_server
from fr_jax.rollout.protocol import SamplingParams


def humaneval_prompts(model_dir: pathlib.Path, count: int) -> list[list[int]]:
    tokenizer = load_tokenizer(model_dir)
    with open(default_data_dir() / "HumanEval.jsonl") as f:
        return [tokenizer.encode(json.loads(line)["prompt"]) for _, line in zip(range(count), f)]


def measure(kind: str, model_dir: pathlib.Path, prompts, sampling: SamplingParams, args, log_dir) -> dict:
    """Start the server, warm it up, time the best of `args.repeats` rounds of the same requests, stop it."""
    flags = {"dtype": args.dtype, "random_seed": 0, "log_path": log_dir / f"{kind}.log"}
    if kind == "local":
        flags.update(mesh="1,1,1", max_running_requests=len(prompts) * sampling.n)
    else:
        flags.update(mem_fraction_static=args.mem_fraction)
    started = time.perf_counter()
    with launch_server(kind, model_dir, **flags) as server, RolloutClient(server.url) as client:
        startup_s = time.perf_counter() - started
        client.generate(prompts, sampling)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            groups = client.generate(prompts, sampling)
            best = min(best, time.perf_counter() - t)
    tokens = sum(len(r.output_ids) for group in groups for r in group)
    expected = len(prompts) * sampling.n * sampling.max_new_tokens
    if tokens != expected:
        raise RuntimeError(f"{kind}: {tokens} tokens generated, {expected} asked for (ignore_eos)")
    return {"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best, "startup_s": startup_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, help="HF model directory (default: SmolLM2-135M-Instruct, shipped)")
    p.add_argument("--servers", default="sglang,local", help="comma list of sglang, local")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8, help="samples per prompt (a GRPO group)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--mem-fraction", type=float, default=0.6, help="SGLang's --mem-fraction-static")
    p.add_argument("--out", type=pathlib.Path, help="write the figures here as JSON (its folder gets the server logs)")
    args = p.parse_args()
    servers = args.servers.split(",")
    if not servers or set(servers) - {"sglang", "local"}:
        p.error(f"--servers {args.servers!r}: a comma list of sglang, local")
    model_dir = args.model or smollm2_hf_dir()
    prompts = humaneval_prompts(model_dir, args.prompts)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, n=args.n, ignore_eos=True)
    log_dir = args.out.parent if args.out else pathlib.Path(".")
    log_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"{model_dir.name}, {args.dtype}: {len(prompts)} prompts x n={args.n} x {args.new_tokens} new tokens, "
        f"best of {args.repeats} (load average {os.getloadavg()[0]:.1f})"
    )
    figures = {}
    for kind in servers:
        figures[kind] = measure(kind, model_dir, prompts, sampling, args, log_dir)
        f = figures[kind]
        print(
            f"  {kind:<7} {f['tokens_per_s']:10.1f} tokens/s  ({f['tokens']} in {f['seconds']:.2f} s; up in "
            f"{f['startup_s']:.0f} s)"
        )
    result = {
        "model": str(model_dir),
        "dtype": args.dtype,
        "prompts": len(prompts),
        "n": args.n,
        "new_tokens": args.new_tokens,
        "servers": figures,
    }
    if len(figures) == 2:
        result["local_over_sglang"] = figures["local"]["tokens_per_s"] / figures["sglang"]["tokens_per_s"]
        print(f"  embedded / SGLang: {result['local_over_sglang']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
