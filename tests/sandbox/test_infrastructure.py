"""Infrastructure failures are never scored as the policy's fault (issue 14): a worker that times out, answers 503 or
cannot be reached, waiting for a jail slot, and a harness slowed at start-up are "could not judge" (marked
`infrastructure`, or SandboxError), never a failure the reward would charge to the design. Real workers throughout:
fr_jax.serve on SmolLM2, stopped with SIGSTOP to time out, and one whose queue is always full.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from fr_jax.rl.setup import server_env
from fr_jax.rollout.launch import launch_local
from fr_jax.sandbox.local import LocalSandbox
from tests.support.sandbox import health, post

ADD = "def add(a, b):\n    return a + b\n"
PROBLEM = {
    "text": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
    "entry_point": "add",
    "public_tests": {"kind": "asserts", "test_list": ["assert add(1, 2) == 3"]},
    "hidden_tests": {"kind": "asserts", "test_list": ["assert add(2, 2) == 4"]},
}


def _graph(body: str, operator: str = "Custom") -> str:
    return (
        "import asyncio\n\nclass Workflow:\n    def __init__(self, name, llm_config, dataset):\n"
        f"        self.op = operator.{operator}(create_llm_instance(llm_config))\n\n"
        "    async def __call__(self, problem, entry_point):\n"
        + "".join(f"        {line}\n" for line in body.strip("\n").splitlines())
    )


ASK = _graph(f"await self.op(input=problem, instruction='Solve: ')\nreturn {ADD!r}")


def _run(api: httpx.Client, graph: str, worker: str, **budgets) -> dict:
    request = {"graph": graph, "problem": PROBLEM, "worker": worker, "sampling": {"max_tokens": 8}, "budgets": budgets}
    return post(api, "/workflow/run", request)


@pytest.fixture(scope="module")
def full_queue(smollm2_dir):
    """A real worker whose request queue is always full: every call is answered 503."""
    with launch_local(smollm2_dir, context_length=2048, max_queued_requests=0, env=server_env()) as server:
        yield server


@pytest.fixture(scope="module")
def service(workflow_worker, full_queue):
    workers = [
        f"healthy={workflow_worker.url}/v1",
        f"full={full_queue.url}/v1",
        "gone=http://127.0.0.1:9/v1",
    ]
    args = [arg for worker in workers for arg in ("--worker", worker)] + ["--worker-timeout-s", "3"]
    with LocalSandbox(workers=2, max_queue=1, extra_args=args) as sandbox:
        with httpx.Client(base_url=sandbox.url, timeout=120) as api:
            yield api


def test_a_worker_that_times_out_is_not_the_designs_fault(service, workflow_worker):
    workflow_worker.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = _run(service, ASK, "healthy", wall_s=2)
        waited = time.monotonic() - started
    finally:
        workflow_worker.process.send_signal(signal.SIGCONT)
    failure = result["failure"]
    assert failure["kind"] == "worker_unreachable" and failure["infrastructure"], failure
    assert "did not answer within 3 s" in failure["message"] and 3 <= waited < 10
    # the 2 s budget did not run out while the graph waited 3 s for the worker: waiting is not charged


def test_a_worker_that_answers_503_or_is_gone_is_not_the_designs_fault(service):
    busy = _run(service, ASK, "full")["failure"]
    assert busy["kind"] == "worker_error" and "HTTP 503" in busy["message"] and busy["infrastructure"], busy
    gone = _run(service, ASK, "gone")["failure"]
    assert gone["kind"] == "worker_unreachable" and gone["infrastructure"], gone


def test_a_request_the_worker_refuses_is_the_designs_fault(service):
    too_long = _graph(f"await self.op(input=problem * 3000, instruction='Solve: ')\nreturn {ADD!r}")
    failure = _run(service, too_long, "healthy", max_worker_tokens=10**7)["failure"]
    assert failure["kind"] == "worker_error" and "HTTP 400" in failure["message"], failure
    assert not failure["infrastructure"]


def test_waiting_for_a_jail_slot_is_not_charged_and_test_runs_are_admitted(service):
    # two slots: a long /run_code holds one, the workflow's graph the other, so its Test operator waits ~4 s
    blocker = threading.Thread(target=lambda: post(service, "/run_code", {"code": "import time\ntime.sleep(5)"}))
    test_then_return = _graph(
        f"await asyncio.sleep(0.5)\nverdict = await self.op(problem=problem, solution={ADD!r}, entry_point='add')\n"
        f"assert verdict['result'], verdict\nreturn {ADD!r}",
        "Test",
    )
    seen: dict = {}

    def watch() -> None:
        time.sleep(0.3)
        seen["admitted"] = health(service)["capacity"]["admitted"]
        seen["refused"] = service.post("/evaluate", json={"code": ADD, "tests": PROBLEM["public_tests"]}).status_code

    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(_run(service, test_then_return, "healthy", wall_s=3)))
    blocker.start()
    deadline = time.monotonic() + 10
    while health(service)["capacity"]["busy"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    runner.start()
    watcher = threading.Thread(target=watch)
    watcher.start()
    for thread in (runner, blocker, watcher):
        thread.join()
    assert result["status"] == "ok", result["failure"]  # 5 s waiting for a slot, on a budget of 3 s
    assert result["test_runs"] == 1 and result["public_pass_rate"] == 1.0
    # the workflow counts as two runs (its graph and its test runs), the /run_code as one: 3 of 2 workers + 1 queued
    assert seen == {"admitted": 3, "refused": 429}
    slow = _run(service, _graph(f"await asyncio.sleep(4)\nreturn {ADD!r}"), "healthy", wall_s=2)["failure"]
    assert slow["kind"] == "timeout" and not slow["infrastructure"]  # the graph's own time is charged


@pytest.fixture(scope="module")
def slow_python():
    """An interpreter that takes 2 s to start (a host under load), in a directory the jail's uid can read."""
    root = Path(tempfile.mkdtemp(prefix="fr_sandbox_slow_python-"))
    (root / "bin").mkdir()
    python = root / "bin" / "python"
    python.write_text('#!/bin/sh\nsleep 2\nexec /usr/bin/python3 "$@"\n')
    python.chmod(0o755)
    for directory in (root, root / "bin"):
        directory.chmod(0o755)
    yield python
    shutil.rmtree(root)


def test_a_slow_harness_start_is_not_the_solutions_time(slow_python):
    request = {
        "code": ADD,
        "tests": {"kind": "asserts", "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]},
        "timeout_s": 1,
        "python": "slow",
    }
    with LocalSandbox(workers=1, extra_args=["--python", f"slow={slow_python}"]) as patient:
        answer = httpx.post(f"{patient.url}/evaluate", json=request, timeout=60).json()
        assert answer["passed_all"], answer  # 2 s of start-up on a 1 s limit per test
    with LocalSandbox(workers=1, extra_args=["--python", f"slow={slow_python}", "--harness-start-s", "1"]) as hasty:
        started = time.monotonic()
        answer = httpx.post(f"{hasty.url}/evaluate", json=request, timeout=60).json()
        assert answer["status"] == "SandboxError" and "did not start" in answer["message"], answer
        assert time.monotonic() - started < 20
