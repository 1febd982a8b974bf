"""Rollout engine benchmarks, each measured side by side with its baseline in one run, on SmolLM2-135M-Instruct.

Workloads (--workload, default all):
- uniform: one batch (--batch prompts, --new-tokens each, EOS ignored) through the engine and through
  transformers' generate (torch at its default threads and at 1), then the HTTP server's overhead over the
  in-process engine. Goal: no regression against the README's figure.
- long-tail: 64 requests whose max_new_tokens are drawn long-tailed (56 between 8 and 32, 8 at 256; EOS ignored,
  so every request generates exactly its budget). Useful tokens/s of continuous batching against the static
  engine (the same engine, new batches only when the last has ended) and transformers' generate (one batch run
  to the longest). Goal: >= 2x static.
- arrivals: worker-style requests (64-token prompts, 16-128 new tokens) arriving as a Poisson process at --load
  (default 70%) of the continuous engine's capacity: the rate at which it serves a queue that never empties (all
  requests submitted at once, counted until the queue empties; the static engine's is printed beside it, and
  each one's closed-loop figure, which also counts the drain at the end of a finite run). Served by the real
  serving thread (fr_jax.rollout.scheduler); p50/p99 latency, continuous against static, pooled over
  --arrival-patterns patterns (the p99 of one pattern is nearly its slowest request, so one pattern alone is a
  noisy figure), and the p50 of the first and last third of arrivals (a queue that grows shows there).
  Goal: p99 <= 1/2 of static.
- shared-prefix: 16 prompts that share a 1024-token prefix, 4 samples each sent as separate requests (as GRPO
  sends them), one new token each: the time to prefill a round, with the prefix cache against without it, for a
  cold cache and for the next round's new prompts behind the same prefix. Goal: >= 5x.
Every run first runs its workload once to compile (and prints the compiles of the timed runs: 0 is steady
state). The long-tail and arrivals engines have no prefix cache: they measure scheduling alone, on prompts that
the timed run would otherwise find cached from the compiling run. Wall times; the load average is printed before
and after: other processes on these cores slow every side, and not equally.

    python bench/rollout.py                                  # everything, fp32 (arrivals alone: 15-20 minutes here)
    python bench/rollout.py --workload long-tail --slots 16
    python bench/rollout.py --workload uniform --batch 32 --new-tokens 256 --no-server
    python bench/rollout.py --workload arrivals --no-transformers --random-weights   # no demo model (GPU check)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import threading
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from model_step import CONFIGS  # noqa: E402  (bench/model_step.py: the benchmarks' model shapes)

from fr_jax.data.tasks import default_data_dir  # noqa: E402
from fr_jax.models.config import ModelConfig  # noqa: E402
from fr_jax.models.decoder import create_model  # noqa: E402
from fr_jax.models.gguf import smollm2_hf_dir  # noqa: E402
from fr_jax.models.hf import load_pretrained  # noqa: E402
from fr_jax.models.tokenizer import load_tokenizer  # noqa: E402
from fr_jax.parallel.mesh import make_mesh  # noqa: E402
from fr_jax.rollout import RolloutClient, launch_local  # noqa: E402
from fr_jax.rollout.engine import Engine, GenerationRequest, SamplingOptions  # noqa: E402
from fr_jax.rollout.scheduler import Scheduler  # noqa: E402

COMMAND = "python bench/rollout.py " + " ".join(sys.argv[1:])


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def best_of(repeats: int, run) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of the fastest of `repeats` runs."""
    times = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(times)


class Bench:
    def __init__(self, args):
        self.args = args
        self.mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        if args.random_weights:
            # where the demo model is not (a GPU machine that cannot carry its 98 MB): timings need only the shapes
            hf_config = CONFIGS["smollm2"]()
            config = ModelConfig.from_hf(hf_config.to_dict(), param_dtype=args.dtype, dtype=args.dtype)
            self.model = create_model(config, mesh=self.mesh)
            self.eos_token_id, self.tokenizer = hf_config.eos_token_id, None
        else:
            self.model_dir = smollm2_hf_dir()
            self.tokenizer = load_tokenizer(self.model_dir)
            self.model = load_pretrained(self.model_dir, mesh=self.mesh, param_dtype=args.dtype, dtype=args.dtype)
            self.eos_token_id = self.tokenizer.eos_token_id
        self.discarded = 0  # arrivals: replays run again because they compiled
        self.compiled_timed = 0  # arrivals: timed replays that compiled all the same

    def engine(self, **options) -> Engine:
        """An engine on the loaded weights (each engine holds its own copy of the layers)."""
        if self.args.chunk_steps is not None:
            options["chunk_steps"] = self.args.chunk_steps
        return Engine(self.model, mesh=self.mesh, eos_token_ids=(self.eos_token_id,), **options)

    def token_corpus(self) -> list[int]:
        """HumanEval's prompts as one token stream; with random weights, random tokens (the text would not matter)."""
        if self.tokenizer is None:
            return np.random.default_rng(0).integers(0, self.model.cfg.vocab_size, 100_000).tolist()
        with open(default_data_dir() / "HumanEval.jsonl") as f:
            return self.tokenizer.encode("\n".join(json.loads(line)["prompt"] for line in f))

    def prompts(self, count: int, length: int) -> list[tuple[int, ...]]:
        """`count` HumanEval prompts cut to `length` tokens (only prompts at least that long), or random ones."""
        if self.tokenizer is None:
            rng = np.random.default_rng(length)
            return [tuple(row) for row in rng.integers(0, self.model.cfg.vocab_size, (count, length)).tolist()]
        with open(default_data_dir() / "HumanEval.jsonl") as f:
            encoded = [self.tokenizer.encode(json.loads(line)["prompt"]) for line in f]
        long_enough = [tuple(ids[:length]) for ids in encoded if len(ids) >= length]
        if len(long_enough) < count:
            raise SystemExit(f"only {len(long_enough)} HumanEval prompts have {length} tokens; asked for {count}")
        return long_enough[:count]

    def transformers_generate(self, prompts, new_tokens: int, threads: int) -> float:
        """Seconds for transformers' generate on `prompts` (left-padded), `new_tokens` each, EOS ignored."""
        torch.set_num_threads(threads)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=getattr(torch, self.args.dtype)
        ).eval()
        hf.generation_config.eos_token_id = None  # ignore EOS, as the engine does
        width, pad = max(map(len, prompts)), self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def run(n):
            with torch.no_grad():
                out = hf.generate(
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
        return best_of(self.args.repeats, lambda: run(new_tokens))[0]

    # ------------------------------------------------------------------------------------------ uniform

    def uniform(self) -> None:
        args = self.args
        prompts = self.prompts(args.batch, args.prompt_tokens)
        tokens = args.batch * args.new_tokens
        print(f"\n== uniform: batch {args.batch}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens")
        engine = self.engine(max_running_requests=args.batch)
        options = SamplingOptions(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True)
        requests = [GenerationRequest(p, options) for p in prompts]
        engine.generate(requests)  # compiles
        engine_s, engine_cpu = best_of(args.repeats, lambda: engine.generate(requests))
        print(f"fr_jax engine (in process)   {tokens / engine_s:8.1f} tok/s   ({engine_s:.2f}s, {engine_cpu:.2f}s CPU)")
        for threads in [] if args.no_transformers else [int(t) for t in args.torch_threads.split(",")]:
            hf_s = self.transformers_generate(prompts, args.new_tokens, threads)
            print(f"transformers, {threads} thread(s)     {tokens / hf_s:8.1f} tok/s   ({hf_s:.2f}s)")
            print(f"  engine / transformers      {hf_s / engine_s:8.2f}x")
        if not args.no_server:
            env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
            params = {"max_new_tokens": args.new_tokens, "temperature": 1.0, "ignore_eos": True}
            ids = [list(p) for p in prompts]
            with (
                launch_local(
                    self.model_dir,
                    env=env,
                    mesh="1,1,1",
                    max_running_requests=args.batch,
                    dtype=args.dtype,
                    param_dtype=args.dtype,
                    num_continuous_decode_steps=args.chunk_steps,
                ) as server,
                RolloutClient(server.url) as client,
            ):
                client.generate(ids, params)  # compiles
                server_s, _ = best_of(args.repeats, lambda: client.generate(ids, params))
            print(f"fr_jax server over HTTP      {tokens / server_s:8.1f} tok/s   ({server_s:.2f}s)")
            print(f"server overhead vs engine    {100 * (server_s / engine_s - 1):+8.1f}%")

    # ---------------------------------------------------------------------------------------- long tail

    def long_tail(self) -> None:
        args = self.args
        rng = np.random.default_rng(0)
        budgets = rng.integers(8, 33, size=64)
        budgets[rng.choice(64, size=8, replace=False)] = 256
        prompts = self.prompts(64, 32)
        requests = [
            GenerationRequest(p, SamplingOptions(max_new_tokens=int(m), temperature=1.0, ignore_eos=True, seed=i))
            for i, (p, m) in enumerate(zip(prompts, budgets))
        ]
        useful = int(budgets.sum())
        print(
            f"\n== long tail: 64 requests, max_new_tokens 8-32 (56 of them) and 256 (8), {useful} useful tokens, "
            f"{args.slots} slots"
        )
        engines = {
            s: self.engine(max_running_requests=args.slots, scheduling=s, prefix_cache_tokens=0)
            for s in ("continuous", "static")
        }
        for engine in engines.values():
            engine.generate(requests)  # compiles
        compiles = sum(e.compiles for e in engines.values())
        times = self.alternate({s: (lambda e=e: e.generate(requests)) for s, e in engines.items()})
        for scheduling, seconds in times.items():
            print(f"{scheduling:>10} engine      {useful / min(seconds):8.1f} useful tok/s (best {min(seconds):.2f}s)")
        ratios = [s / c for s, c in zip(times["static"], times["continuous"])]
        print(
            f"  continuous / static        {np.median(ratios):8.2f}x (goal >= 2x; per pair {_fmt(ratios)}; "
            f"{sum(e.compiles for e in engines.values()) - compiles} compiles while timed)"
        )
        if not args.no_transformers:
            hf_s = self.transformers_generate(prompts, 256, int(args.torch_threads.split(",")[0]))
            print(f"transformers generate        {useful / hf_s:8.1f} useful tok/s ({hf_s:.2f}s: 64 rows x 256 steps)")
            print(f"  continuous / transformers  {hf_s / min(times['continuous']):8.2f}x")

    def alternate(self, runs: dict) -> dict[str, list[float]]:
        """Each run's seconds, --repeats times, alternating between the runs: load that comes and goes on these
        shared cores then hits every side alike."""
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(self.args.repeats):
            for name, run in runs.items():
                times[name].append(timed(run))
        return times

    # ----------------------------------------------------------------------------------------- arrivals

    def arrivals(self) -> None:
        args = self.args
        count = args.arrivals
        budgets, patterns = arrival_workload(count, args.arrival_patterns)
        prompts = self.prompts(count, 64)
        requests = [
            GenerationRequest(p, SamplingOptions(max_new_tokens=int(m), temperature=1.0, ignore_eos=True, seed=i))
            for i, (p, m) in enumerate(zip(prompts, budgets))
        ]
        slots = args.arrival_slots
        print(
            f"\n== arrivals: {count} requests, 64-token prompts, 16-128 new tokens, {slots} slots, "
            f"{args.arrival_patterns} Poisson arrival patterns"
        )
        engines = {
            s: self.engine(max_running_requests=slots, scheduling=s, prefix_cache_tokens=0)
            for s in ("continuous", "static")
        }
        capacity, closed_loop = {}, {}
        for scheduling, engine in engines.items():
            engine.generate(requests)  # compiles
            capacity[scheduling], closed_loop[scheduling] = served_rates(engine, requests)
        rate = args.load * capacity["continuous"]
        print(
            f"capacity (served while requests wait): continuous {capacity['continuous']:.2f} requests/s, static "
            f"{capacity['static']:.2f}/s (closed loop, its drain included: {closed_loop['continuous']:.2f}, "
            f"{closed_loop['static']:.2f}); arrivals at {100 * args.load:.0f}% of continuous's: {rate:.2f}/s "
            f"({100 * rate / capacity['static']:.0f}% of static's)"
        )
        schedulers = {scheduling: Scheduler(engine) for scheduling, engine in engines.items()}
        latencies: dict[str, list[np.ndarray]] = {s: [] for s in engines}
        ratios = []
        try:
            # The p99 of one pattern is nearly its slowest request, and a static batch's luck with the arrival
            # times moves it by seconds: measure several patterns, the two engines one after the other on each.
            for number, pattern in enumerate(patterns, 1):
                p99 = {}
                for scheduling, engine in engines.items():
                    served = self._settled_replay(engine, schedulers[scheduling], requests, pattern / rate)
                    latencies[scheduling].append(served)
                    p99[scheduling] = np.percentile(served, 99)
                ratios.append(p99["continuous"] / p99["static"])
                print(
                    f"pattern {number}: p99 continuous {p99['continuous']:.2f}s, static {p99['static']:.2f}s: "
                    f"{ratios[-1]:.2f}"
                )
        finally:
            for scheduler in schedulers.values():
                scheduler.stop()
        pooled = {}
        for scheduling, parts in latencies.items():
            p50, pooled[scheduling] = np.percentile(np.concatenate(parts), [50, 99])
            # a queue that grows through the run shows as later arrivals waiting longer than the first ones
            first, last = (
                np.median([part[third] for part in parts]) for third in (slice(count // 3), slice(-count // 3, None))
            )
            print(
                f"{scheduling:>10}: p50 {p50:6.2f}s  p99 {pooled[scheduling]:6.2f}s  over {count * len(parts)} "
                f"requests; p50 of the first / last third of arrivals {first:.2f}s / {last:.2f}s"
            )
        low, high = p99_ratio_interval(*(np.concatenate(latencies[s]) for s in ("continuous", "static")))
        print(
            f"  p99 continuous / static    {pooled['continuous'] / pooled['static']:8.2f} (goal <= 0.5; 95% interval "
            f"over the requests {low:.2f}-{high:.2f}; per pattern {_fmt(ratios)}, median {np.median(ratios):.2f}; "
            f"{self.discarded} replays that compiled were run again, {self.compiled_timed} timed replays compiled)"
        )

    def _settled_replay(self, engine: Engine, scheduler: Scheduler, requests, offsets) -> np.ndarray:
        """`_replay`'s latencies from a replay that compiled nothing. The shapes a pattern visits depend on timing, so
        a replay that compiled (its latencies include the compile) is run again, up to 6 times in all; if the last
        one compiled too, its latencies are used and counted in `compiled_timed`."""
        for attempt in range(1, 7):
            compiles = engine.compiles
            latencies = self._replay(scheduler, requests, offsets)
            if engine.compiles == compiles:
                return latencies
            if attempt < 6:
                self.discarded += 1
        self.compiled_timed += 1
        return latencies

    @staticmethod
    def _replay(scheduler: Scheduler, requests, offsets) -> np.ndarray:
        """Submit request i at offsets[i] seconds; each one's seconds from submission to completion."""
        submitted, finished, jobs = {}, {}, []
        lock = threading.Lock()
        start = time.perf_counter()
        for i, (request, offset) in enumerate(zip(requests, offsets)):
            time.sleep(max(0.0, start + offset - time.perf_counter()))
            submitted[i] = time.perf_counter()
            job = scheduler.submit([request])

            def done(_, i=i):
                with lock:
                    finished[i] = time.perf_counter()

            job.future.add_done_callback(done)
            jobs.append(job.future)
        concurrent.futures.wait(jobs)
        return np.array([finished[i] - submitted[i] for i in range(len(requests))])

    # ------------------------------------------------------------------------------------ shared prefix

    def shared_prefix(self) -> None:
        size = self.args.prefix_tokens
        corpus = self.token_corpus()
        # the compiling run and each timed one: the same queries (so the same groups and shapes), another prefix
        prefixes = [tuple(corpus[i * size : (i + 1) * size]) for i in range(self.args.repeats + 1)]
        queries = self.prompts(32, 64)

        def round_of(prefix, first_query: int):
            return [
                GenerationRequest(prefix + q, SamplingOptions(max_new_tokens=1, temperature=1.0, seed=k * 4 + j))
                for k, q in enumerate(queries[first_query : first_query + 16])
                for j in range(4)
            ]

        print(f"\n== shared prefix: 16 prompts = a common {size}-token prefix + a 64-token query, 4 samples each")
        off = self.engine(max_running_requests=64, prefix_cache_tokens=0)
        on = self.engine(max_running_requests=64, prefix_cache_tokens=8192)
        off.generate(round_of(prefixes[0], 0))  # compiles (without a cache every round has the same shapes)
        on.generate(round_of(prefixes[0], 0))  # compiles the cold round's shapes
        on.generate(round_of(prefixes[0], 16))  # and the next round's
        compiles = off.compiles + on.compiles
        prefill: dict[str, list[float]] = {"off": [], "cold": [], "next": []}
        for repeat in range(self.args.repeats):
            prefix = prefixes[repeat + 1]  # a new prefix each time: nothing cached from before
            for name, engine, first_query in (("off", off, 0), ("cold", on, 0), ("next", on, 16)):
                before = engine.prefill_seconds
                engine.generate(round_of(prefix, first_query))
                prefill[name].append(engine.prefill_seconds - before)
        print(f"prefill of a round, without prefix cache: {_fmt(prefill['off'])} s")
        print(f"with it, cold cache: {_fmt(prefill['cold'])} s; next round (new queries): {_fmt(prefill['next'])} s")
        for name, goal in (("cold", ""), ("next", " (goal >= 5x)")):
            ratios = [a / b for a, b in zip(prefill["off"], prefill[name])]
            print(f"  prefill speed-up, {name:<5}   {np.median(ratios):8.2f}x{goal}; per pair {_fmt(ratios)}")
        print(f"  {off.compiles + on.compiles - compiles} compiles while timed")


def arrival_workload(count: int, patterns: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The arrivals workload: each request's max_new_tokens, and `patterns` Poisson arrival patterns (seconds from
    the first arrival, at 1 request/s: divide by the rate)."""
    rng = np.random.default_rng(1)
    budgets = rng.integers(16, 129, size=count)
    return budgets, [np.cumsum(gaps) - gaps[0] for gaps in rng.exponential(1.0, size=(patterns, count))]


def served_rates(engine: Engine, requests) -> tuple[float, float]:
    """(requests/s while requests wait, requests/s of the whole run), every request submitted at once. The first is
    the capacity, the rate at which a queue that never empties is served: the tokens generated until the queue
    empties, per second, over the mean tokens a request asks for. The second (a closed loop's figure) also counts
    the drain at the end, where fewer and fewer rows remain: an artefact of a finite run."""
    samples = [s for group in engine.submit(requests) for s in group]
    start = time.perf_counter()
    while engine.waiting_samples:
        engine.step()
    saturated = time.perf_counter() - start
    tokens = sum(len(s.output_ids) for s in samples)
    while engine.has_work():
        engine.step()
    total = time.perf_counter() - start
    asked = np.mean([r.options.max_new_tokens for r in requests])
    return tokens / saturated / asked, len(requests) / total


def p99_ratio_interval(continuous: np.ndarray, static: np.ndarray, resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of p99(continuous) / p99(static), the requests resampled in pairs (one request's
    latency under each engine, at the same arrival time): how much the ratio owes to which requests were slowest."""
    picks = np.random.default_rng(0).integers(0, len(continuous), (resamples, len(continuous)))
    ratios = np.percentile(continuous[picks], 99, axis=1) / np.percentile(static[picks], 99, axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def _fmt(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=["all", "uniform", "long-tail", "arrivals", "shared-prefix"], default="all")
    p.add_argument("--batch", type=int, default=16, help="uniform: prompts in the batch")
    p.add_argument("--new-tokens", type=int, default=128, help="uniform: new tokens per prompt")
    p.add_argument("--prompt-tokens", type=int, default=32, help="uniform: prompt length")
    p.add_argument("--slots", type=int, default=64, help="long-tail: decode slots (max_running_requests)")
    p.add_argument("--arrival-slots", type=int, default=16, help="arrivals: decode slots")
    p.add_argument("--arrivals", type=int, default=48, help="arrivals: number of requests")
    p.add_argument("--arrival-patterns", type=int, default=3, help="arrivals: Poisson arrival patterns measured")
    p.add_argument(
        "--load", type=float, default=0.7, help="arrivals: offered rate, a fraction of the continuous engine's capacity"
    )
    p.add_argument("--prefix-tokens", type=int, default=1024, help="shared-prefix: length of the common prefix")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--chunk-steps", type=int, help="decode steps between scheduling rounds, every engine (default: the engine's)"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="weights, activations and KV cache of both sides (matmuls accumulate in float32)",
    )
    p.add_argument("--no-server", action="store_true", help="uniform: skip the HTTP server overhead measurement")
    p.add_argument("--no-transformers", action="store_true", help="skip the (slow) transformers baselines")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="SmolLM2-135M's shapes with random weights and random prompt tokens, for a machine without the demo "
        "model: the engines' timings are the same (EOS is ignored), its outputs are not text",
    )
    p.add_argument(
        "--torch-threads",
        default=f"{os.cpu_count()},1",
        help="comma-separated torch intra-op thread counts, one uniform baseline run each (default: all cores, 1)",
    )
    args = p.parse_args()
    if args.load <= 0:
        p.error(f"--load must be > 0 (a fraction of the continuous engine's capacity), got {args.load}")
    if args.random_weights and not args.no_transformers:
        p.error("--random-weights: transformers' baselines load the demo model; add --no-transformers")
    if args.random_weights and not args.no_server and args.workload in ("all", "uniform"):
        p.error("--random-weights: the HTTP server loads the demo model; add --no-server")
    print(f"$ {COMMAND}")
    weights = "random weights" if args.random_weights else "the demo model's weights"
    print(
        f"SmolLM2-135M {args.dtype}, {weights}; {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores; "
        f"load average {os.getloadavg()}"
    )
    bench = Bench(args)
    workloads = {
        "uniform": bench.uniform,
        "long-tail": bench.long_tail,
        "arrivals": bench.arrivals,
        "shared-prefix": bench.shared_prefix,
    }
    for name, run in workloads.items():
        if args.workload in ("all", name):
            run()
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
