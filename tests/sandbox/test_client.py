"""fr_jax.sandbox.client against the real service: typed results, batching, retries on 429, the deadline,
clear errors for bad requests and for a service that is not there, and LocalSandbox's life cycle."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from fr_jax.sandbox.client import (
    AssertTests,
    EvalItem,
    Evaluation,
    RunCodeResult,
    SandboxClient,
    SandboxDeadlineExceeded,
    SandboxRequestError,
    SandboxUnavailable,
    StdioTests,
    TestOutcome,
)
from fr_jax.sandbox.local import LocalSandbox


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_typed_results_for_evaluate_and_run_code(sandbox):
    async def go():
        async with sandbox.client() as client:
            evaluation = await client.evaluate(
                "def sq(x):\n    return x * x", AssertTests(["assert sq(3) == 9", "assert sq(2) == 5"])
            )
            stdio = await client.evaluate("print(input()[::-1])", StdioTests([("abc\n", "cba"), ("x\n", "y")]))
            ran = await client.run_code(
                "import sys\nopen('o.bin', 'wb').write(open('i.bin', 'rb').read()[::-1])\n"
                "print(sys.stdin.read().strip())",
                stdin="hi\n",
                files={"i.bin": b"\x00\x01"},
                fetch_files=["o.bin"],
            )
            return evaluation, stdio, ran

    evaluation, stdio, ran = asyncio.run(go())
    assert isinstance(evaluation, Evaluation) and isinstance(evaluation.tests[0], TestOutcome)
    assert [t.passed for t in evaluation.tests] == [True, False] and evaluation.pass_rate == 0.5
    assert not evaluation.sandbox_error and evaluation.tests[1].error_type == "AssertionError"
    assert [t.status for t in stdio.tests] == ["Passed", "Failed"]
    assert isinstance(ran, RunCodeResult) and ran.status == "Success" and ran.stdout == "hi\n"
    assert ran.run_status == "Finished" and ran.return_code == 0 and ran.files == {"o.bin": b"\x01\x00"}


def test_evaluate_batch_splits_large_lists_and_keeps_the_order(sandbox):
    items = [
        EvalItem(f"def f():\n    return {i}", AssertTests([f"assert f() == {i}", "assert f() % 2 == 0"]))
        for i in range(11)
    ]

    async def go():
        async with sandbox.client(batch_size=4, max_concurrency=2) as client:
            return await client.evaluate_batch(items), client.stats["requests"]

    results, requests = asyncio.run(go())
    assert [r.num_passed for r in results] == [2 if i % 2 == 0 else 1 for i in range(11)]
    assert requests >= 3  # 11 items in batches of 4


def test_a_bad_request_raises_at_once_naming_the_field(sandbox):
    async def go():
        async with sandbox.client() as client:
            await client.evaluate("x = 1", AssertTests(["assert x =="]))

    started = time.monotonic()
    with pytest.raises(SandboxRequestError, match="test_list"):
        asyncio.run(go())
    assert time.monotonic() - started < 5


def test_an_unreachable_service_is_a_clear_error():
    url = f"http://127.0.0.1:{_free_port()}"

    async def go():
        async with SandboxClient(url, unreachable_after_s=0.5) as client:
            await client.health()

    started = time.monotonic()
    with pytest.raises(SandboxUnavailable, match="cannot reach the sandbox service at " + url):
        asyncio.run(go())
    assert time.monotonic() - started < 5


def test_the_total_deadline_bounds_a_call(sandbox):
    async def go():
        async with sandbox.client(deadline_s=1.0) as client:
            await client.run_code("import time\ntime.sleep(20)", run_timeout=3)

    started = time.monotonic()
    with pytest.raises(SandboxDeadlineExceeded):
        asyncio.run(go())
    assert time.monotonic() - started < 3


def test_retries_on_429_until_everything_is_served():
    with LocalSandbox(workers=1, max_queue=0) as small:

        async def go():
            async with small.client(max_concurrency=8) as client:
                results = await asyncio.gather(
                    *(client.run_code(f"import time\ntime.sleep(0.2)\nprint({i})") for i in range(5))
                )
                return results, client.stats

        results, stats = asyncio.run(go())
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(5)]
        assert stats["retries_429"] >= 1


def test_a_killed_parent_leaves_no_service_behind(tmp_path):
    """SIGKILL the process that started a LocalSandbox (a trainer killed by its scheduler): the kernel stops the
    service too (setpriv --pdeathsig), instead of leaving it running with its port and jails."""
    script = (
        "import sys, time\nfrom fr_jax.sandbox.local import LocalSandbox\n"
        "service = LocalSandbox(workers=1, log_path=sys.argv[1])\nservice.start()\n"  # as a run gives it
        "print(service.process.pid, service.url, flush=True)\ntime.sleep(600)\n"
    )
    log = tmp_path / "sandbox.log"
    parent = subprocess.Popen([sys.executable, "-c", script, str(log)], stdout=subprocess.PIPE, text=True)
    try:
        pid, url = parent.stdout.readline().split()
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while _alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(int(pid)), "the sandbox service outlived its killed parent"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, already dead and waiting for init to reap it, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_local_sandbox_starts_and_stops_cleanly():
    service = LocalSandbox(workers=1)
    url = service.start()
    assert url.startswith("http://127.0.0.1:")
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    pid = service.process.pid
    folder = service.log_path.parent  # its own temp folder: no log_path was given
    assert folder.name.startswith("local_sandbox-") and service.log_path.read_text()
    assert service.stop() in (0, -15)
    assert not folder.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def test_a_local_sandbox_logging_elsewhere_keeps_no_folder_once_started(tmp_path):
    """Its port file is read at start; a parent SIGKILLed afterwards (a trainer) would leave its folder in /tmp."""
    with LocalSandbox(workers=1, log_path=tmp_path / "sandbox.log") as service:
        port_file = service.server.port_file
        assert port_file is not None and not port_file.parent.exists()
        assert httpx.get(f"{service.url}/health").json()["status"] == "ok"
    assert (tmp_path / "sandbox.log").read_text()  # the service's log went where it was told
