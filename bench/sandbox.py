"""Sandbox speed, each figure against a baseline measured side by side in the same run.

1. Added latency of one jailed run: POST /run_code of `print(1)` vs bare `python3 -c 'print(1)'`, one at a time,
   interleaved (p50 and p99; goal: at most 20 ms added at p50); and of one judged evaluation: POST /evaluate of a
   function and three asserts vs bare `python3 -c` of the same function and asserts. Where cgroup v1 cpuacct is
   writable (root), also the CPU time per run of everything involved (client, service, jail, program) vs bare: on
   a host shared with other work, wall-clock latency mostly measures waiting for a CPU at each of the jail's
   process hops, while CPU time is what an idle host would see as latency.
2. Trivial runs per second at concurrency 2, 8 and 32, vs bare `python3 -c` at the same concurrency
   (goal: at least 30/s on 2 cores).
3. Load: 1,000 /evaluate requests at 32 concurrent against a service with a small queue, so that back-pressure
   (429 + Retry-After) really happens; every request must come back with the right result (0 lost).

Run: python bench/sandbox.py [--runs 200] [--load 1000] [--load-max-queue 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from fr_jax.sandbox.client import AssertTests, EvalItem
from fr_jax.sandbox.local import LocalSandbox

PYTHON = "/usr/bin/python3"
TRIVIAL = "print(1)"
SOLUTION = "def add(a, b):\n    return a + b\n"
ASSERTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert abs(add(0.1, 0.2) - 0.3) < 1e-9"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _CpuMeter:
    """CPU time of this process and all its descendants, from a cgroup v1 cpuacct group it joins (None: unavailable)."""

    def __init__(self):
        self.group = Path("/sys/fs/cgroup/cpuacct") / f"fr_sandbox_bench-{os.getpid()}"
        try:
            self.group.mkdir()
            (self.group / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            self.group = None

    def ms(self) -> float:
        return int((self.group / "cpuacct.usage").read_text()) / 1e6 if self.group else 0.0

    def close(self) -> None:
        if self.group:
            (self.group.parent / "cgroup.procs").write_text(str(os.getpid()))
            time.sleep(0.5)  # the services' exits settle
            self.group.rmdir()


def _measure(url: str, runs: int, cpu: _CpuMeter, name: str, bare_code: str, path: str, payload: dict, check) -> None:
    """`runs` interleaved pairs: bare `python3 -c bare_code`, then POST `path` with `payload` (`check` its answer)."""
    bare, jailed, bare_cpu, jailed_cpu = [], [], 0.0, 0.0
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post(path, json=payload)  # warm the connection
        for _ in tqdm(range(runs), desc=name, leave=False):
            started, cpu_before = time.perf_counter(), cpu.ms()
            subprocess.run([PYTHON, "-c", bare_code], capture_output=True, check=True)
            bare.append((time.perf_counter() - started) * 1000)
            started, cpu_between = time.perf_counter(), cpu.ms()
            answer = client.post(path, json=payload).json()
            jailed.append((time.perf_counter() - started) * 1000)
            bare_cpu, jailed_cpu = bare_cpu + cpu_between - cpu_before, jailed_cpu + cpu.ms() - cpu_between
            check(answer)
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        b, j = _percentile(bare, q), _percentile(jailed, q)
        print(
            f"{name} latency {label}: bare python3 -c {b:6.1f} ms | sandbox {path} {j:6.1f} ms | "
            f"added {j - b:6.1f} ms | ratio {j / b:4.2f}x" + ("   (goal: added <= 20 ms)" if label == "p50" else "")
        )
    if cpu.group:
        b, j = bare_cpu / runs, jailed_cpu / runs
        print(
            f"{name} CPU per run: bare python3 -c {b:6.1f} ms | sandbox {path} {j:6.1f} ms | added {j - b:6.1f} ms | "
            f"ratio {j / b:4.2f}x   (client, service, jail and program together)"
        )


def _run_code_ok(answer: dict) -> None:
    assert answer["run_result"]["stdout"] == "1\n", answer


def _judged_ok(answer: dict) -> None:
    assert answer["passed_all"] and not any(t["judged_in_process"] for t in answer["tests"]), answer


def latency(url: str, runs: int, cpu: _CpuMeter) -> None:
    _measure(url, runs, cpu, "run_code", TRIVIAL, "/run_code", {"code": TRIVIAL}, _run_code_ok)
    evaluate = {"code": SOLUTION, "tests": {"kind": "asserts", "test_list": ASSERTS}}
    _measure(url, runs, cpu, "evaluate", SOLUTION + "\n".join(ASSERTS), "/evaluate", evaluate, _judged_ok)


async def _bare_rate(concurrency: int, runs: int) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            process = await asyncio.create_subprocess_exec(PYTHON, "-c", TRIVIAL, stdout=asyncio.subprocess.PIPE)
            await process.communicate()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(runs)))
    return runs / (time.perf_counter() - started)


async def _jailed_rate(sandbox: LocalSandbox, concurrency: int, runs: int) -> float:
    async with sandbox.client(max_concurrency=concurrency) as client:
        started = time.perf_counter()
        answers = await asyncio.gather(*(client.run_code(TRIVIAL) for _ in range(runs)))
        rate = runs / (time.perf_counter() - started)
    assert all(a.stdout == "1\n" for a in answers)
    return rate


def throughput(sandbox: LocalSandbox, runs: int) -> None:
    for concurrency in (2, 8, 32):
        bare = asyncio.run(_bare_rate(concurrency, runs))
        jailed = asyncio.run(_jailed_rate(sandbox, concurrency, runs))
        print(
            f"throughput at concurrency {concurrency:2d}: sandbox {jailed:6.1f} runs/s | "
            f"bare python3 -c {bare:6.1f} runs/s "
            f"| ratio {jailed / bare:4.2f}   (goal: >= 30 runs/s on 2 cores)"
        )


async def _load(sandbox: LocalSandbox, requests: int, concurrency: int) -> None:
    # Request i passes 2 of 3 asserts when i is odd and all 3 when it is even: a mixed-up answer shows.
    def item(i: int) -> EvalItem:
        return EvalItem(
            f"def f(x):\n    return x + {i % 2}",
            AssertTests(["assert f(1) >= 1", "assert f(2) == 2", f"assert f({i}) >= {i}"]),
        )

    expected = [3 if i % 2 == 0 else 2 for i in range(requests)]
    async with sandbox.client(max_concurrency=concurrency) as client:
        progress = tqdm(total=requests, desc="load", leave=False)

        async def one(i: int) -> int:
            result = await client.evaluate(item(i).code, item(i).tests)
            progress.update()
            return -1 if result.sandbox_error else result.num_passed

        started = time.perf_counter()
        passed = await asyncio.gather(*(one(i) for i in range(requests)), return_exceptions=True)
        wall = time.perf_counter() - started
        progress.close()
    lost = sum(isinstance(p, BaseException) for p in passed)
    wrong = sum(p != e for p, e in zip(passed, expected) if not isinstance(p, BaseException))
    print(
        f"load: {requests} /evaluate at {concurrency} concurrent: lost {lost}, wrong results {wrong}, "
        f"HTTP 429 answered (and retried) {client.stats['retries_429']}, other retries "
        f"{client.stats['retries_5xx'] + client.stats['retries_timeout'] + client.stats['retries_connect']}, "
        f"wall {wall:.1f} s = {requests / wall:.1f} evaluations/s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="runs per latency and throughput measurement")
    parser.add_argument("--load", type=int, default=1000, help="/evaluate requests in the load test")
    parser.add_argument("--load-concurrency", type=int, default=32)
    parser.add_argument(
        "--load-max-queue", type=int, default=8, help="the load test's service queue (small: 429s happen)"
    )
    args = parser.parse_args()
    cpu = _CpuMeter()  # joined before the service starts, so that its processes count too
    with LocalSandbox() as sandbox:
        workers = httpx.get(f"{sandbox.url}/health").json()["capacity"]["workers"]
        print(
            f"sandbox_service with {workers} workers (the default: 2 per core) on {os.cpu_count()} cores; "
            f"python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.1f}"
        )
        latency(sandbox.url, args.runs, cpu)
    cpu.close()
    with LocalSandbox() as sandbox:
        throughput(sandbox, args.runs)
    with LocalSandbox(max_queue=args.load_max_queue) as sandbox:
        print(f"load test service: --max-queue {args.load_max_queue}")
        asyncio.run(_load(sandbox, args.load, args.load_concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
