"""Nothing from the jail can make the service fail (issue 14): one test per poison and per bound, against the real
service. Every hostile program runs only behind the jail probe; the service must answer, stay healthy and keep
its memory, its disk and its event loop for the next request.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from fr_jax.sandbox.local import LocalSandbox
from tests.support.sandbox import health, post, require_jail, run_code, wait_until_no_processes

MiB = 1 << 20


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def _run_dirs(api) -> list[str]:
    return sorted(os.listdir(health(api)["isolation"]["run_root"]))


# --------------------------------------------------------------------------------------------------- disk


LITTER = """
import fcntl, os
os.symlink("/etc", "out")
os.symlink("/", "root_link")
os.makedirs("closed/inner")
open("closed/inner/f", "w").write("x")
os.chmod("closed/inner", 0)
os.chmod("closed", 0)
locked = open("locked", "w")
fcntl.flock(locked, fcntl.LOCK_EX)
start = os.getcwd()
for _ in range(2000):  # deeper than any recursion limit
    os.mkdir("d")
    os.chdir("d")
os.chdir(start)
made = 0
try:
    for i in range(100_000):  # until the inode limit stops it
        open(f"f{i}", "w").close()
        made += 1
except OSError as e:
    print(made, e.errno)
"""


def test_whatever_a_run_leaves_is_removed(jail_check, api, sandbox, jail_uids):
    require_jail(jail_check)
    before = _run_dirs(api)
    answer = run_code(api, LITTER, run_timeout=60)
    made, errno = map(int, answer["run_result"]["stdout"].split())
    assert errno == 28 and made < health(api)["limits"]["run_inodes"], answer  # ENOSPC: out of inodes
    deadline = time.monotonic() + 10
    while _run_dirs(api) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _run_dirs(api) == before
    assert os.path.isdir("/etc") and health(api)["status"] == "ok"
    assert wait_until_no_processes(jail_uids) == []


def test_a_run_has_a_disk_quota_that_covers_tmp_and_dev_shm(jail_check, api):
    require_jail(jail_check)
    limits = health(api)["limits"]
    code = """
import json, os
seen = {}
for where in (".", "/tmp", "/dev/shm"):
    stat = os.statvfs(where)
    seen[where] = stat.f_blocks * stat.f_frsize
written = 0
try:
    for i, where in enumerate(["."] * 3 + ["/tmp"] * 3 + ["/dev/shm"] * 3):
        with open(f"{where}/big{i}", "wb") as f:
            for _ in range(60):
                f.write(b"x" * (1 << 20))
                written += 1 << 20
except OSError as e:
    seen["error"] = e.errno
seen["written"] = written
print(json.dumps(seen))
"""
    seen = json.loads(run_code(api, code, run_timeout=60, memory_limit_MB=2048)["run_result"]["stdout"])
    quota = limits["run_disk_mb"] * MiB
    assert seen["."] == seen["/tmp"] == seen["/dev/shm"] == quota  # one tmpfs, seen three times
    assert seen["error"] == 28 and seen["written"] <= quota


def test_files_fetched_back_are_bounded_in_total(api):
    limit = health(api)["limits"]["max_fetch_bytes"]
    code = f"for i in range(3):\n    open(f'f{{i}}', 'wb').write(b'x' * {limit // 2 + 1})\n"
    answer = run_code(api, code, fetch_files=["f0", "f1", "f2"])
    assert list(answer["files"]) == ["f0"] and "f1" in answer["message"] and "f2" in answer["message"]


@pytest.mark.parametrize(
    "files, problem",
    [
        ({"a\x00b": "eA=="}, "NUL"),
        ({"a": "eA==", "a/b": "eA=="}, "which is a file"),
        ({"x": "eA==", "/sandbox/x": "eA=="}, "the same file"),
        ({"/".join(["d"] * 40): "eA=="}, "deeper than"),
        ({f"f{i}": "" for i in range(1001)}, "over the limit"),
    ],
)
def test_malformed_paths_get_422(api, files, problem):
    response = api.post("/run_code", json={"code": "print(1)", "files": files})
    assert response.status_code == 422 and problem in response.json()["message"], response.text[:500]


def test_nul_in_fetch_paths_and_json_too_deep_are_refused_not_500(api):
    response = api.post("/run_code", json={"code": "print(1)", "fetch_files": ["a\x00"]})
    assert response.status_code == 422 and "NUL" in response.json()["message"]
    deep = api.post("/evaluate", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert 400 <= deep.status_code < 500


# ------------------------------------------------------------------------------------------ time and stalls


@pytest.fixture(scope="module")
def short_budget():
    with LocalSandbox(workers=2, extra_args=["--max-eval-s", "3"]) as service:
        with httpx.Client(base_url=service.url, timeout=120) as api:
            yield api


def test_an_evaluation_has_a_total_wall_time_however_many_tests(jail_check, short_budget):
    require_jail(jail_check)
    code = "import time\ndef slow(x):\n    time.sleep(0.4)\n    return x\n"
    tests = [f"assert slow({i}) == {i}" for i in range(40)]
    started = time.monotonic()
    answer = post(short_budget, "/evaluate", {"code": code, "tests": {"kind": "asserts", "test_list": tests}})
    assert time.monotonic() - started < 10
    statuses = [t["status"] for t in answer["tests"]]
    assert statuses[0] == "Passed" and statuses[-1] == "TimeLimitExceeded"
    assert "total time limit (3 s)" in answer["tests"][-1]["error_message"]


def test_a_stopped_harness_is_a_stall_however_the_solution_spams(jail_check, api, jail_uids):
    require_jail(jail_check)
    forged = b'{"n":"x","e":"alive","k":1}\n' * 100
    code = f"""
import os, signal, time
def f(x):
    os.kill(os.getppid(), signal.SIGSTOP)  # the supervisor: no more heartbeats
    for _ in range(200):
        for fd in range(3, 64):
            try:
                os.write(fd, {forged!r})
            except OSError:
                pass
        time.sleep(0.1)
    return x
"""
    started = time.monotonic()
    answer = post(api, "/evaluate", {"code": code, "tests": {"kind": "asserts", "test_list": ["assert f(1) == 1"]}})
    assert 8 < time.monotonic() - started < 30
    assert answer["tests"][0]["status"] in ("TimeLimitExceeded", "Error") and not answer["passed_all"]
    assert wait_until_no_processes(jail_uids) == []


# ------------------------------------------------------------------------------------------- the channel


@pytest.fixture(scope="module")
def workflows():
    """A service that runs workflows; its one worker is allowlisted but absent (these graphs never call it)."""
    with LocalSandbox(workers=4, extra_args=["--worker", "nobody=http://127.0.0.1:9/v1"]) as service:
        with httpx.Client(base_url=service.url, timeout=120) as api:
            yield service, api


GRAPH = """
import asyncio, os, stat

class Workflow:
    def __init__(self, name, llm_config, dataset):
        self.test = operator.Test(create_llm_instance(llm_config))

    async def __call__(self, problem, entry_point):
{body}
"""


def _workflow(api, body: str, **budgets) -> dict:
    graph = GRAPH.format(body="".join(f"        {line}\n" for line in body.strip("\n").splitlines()))
    problem = {
        "text": "add",
        "entry_point": "add",
        "public_tests": {"kind": "asserts", "test_list": ["assert add(1, 2) == 3"]},
    }
    request = {"graph": graph, "problem": problem, "worker": "nobody", "budgets": budgets}
    return post(api, "/workflow/run", request)


@pytest.mark.parametrize(
    "write, detail",
    [
        ("b'[' * 60000 + b'\\n'", "malformed message"),
        ("b'{\"id\": 1, \"op\": \"Custom\"' + b' ' * (5 << 20) + b'}\\n'", "longer than"),
        ("b'\\xff\\xfe not json\\n'", "malformed message"),
    ],
)
def test_poison_on_the_operator_channel_is_the_graphs_failure(jail_check, workflows, write, detail):
    require_jail(jail_check)
    service, api = workflows
    body = f"""
sockets = []
for fd in range(3, 64):
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            sockets.append(fd)
    except OSError:
        pass
channel = max(sockets)  # the operator channel (asyncio's own socket pair comes later, with lower numbers)
os.set_blocking(channel, True)
data = {write}
while data:
    data = data[os.write(channel, data):]
await asyncio.sleep(10)
return 'def add(a, b):\\n    return a + b\\n'
"""
    result = _workflow(api, body)
    assert result["status"] == "failed" and result["failure"]["kind"] == "workflow_exception"
    assert detail in result["failure"]["message"] and result["wall_s"] < 10
    assert health(api)["status"] == "ok"


@pytest.mark.parametrize("calls, problem_bytes", [(100, 10), (40, 1 << 20)], ids=["many", "large"])
def test_a_flood_of_operator_calls_ends_the_run_and_memory_stays_flat(jail_check, workflows, calls, problem_bytes):
    require_jail(jail_check)
    service, api = workflows
    rss_before = _rss_kb(service.process.pid)
    body = f"""
calls = [self.test(problem='x' * {problem_bytes}, solution='def add(a, b):\\n    return a + b\\n', entry_point='add')
         for _ in range({calls})]
await asyncio.gather(*calls, return_exceptions=True)
return 'def add(a, b):\\n    return a + b\\n'
"""
    result = _workflow(api, body, max_operator_calls=1000)
    assert result["failure"]["kind"] == "budget_exceeded" and "in flight" in result["failure"]["message"]
    assert _rss_kb(service.process.pid) - rss_before < 100_000, "the flood stayed in the service's memory"
    assert health(api)["status"] == "ok"


# ------------------------------------------------------------------------------------- the service itself


def test_health_answers_within_100_ms_while_hostile_runs_go_on(jail_check, sandbox, api):
    require_jail(jail_check)
    battery = [
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "import sys\nsys.stdout.write('x' * 10 ** 8)\n",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2 ** 20))\n",
        LITTER,
    ]
    stop, latencies = threading.Event(), []

    def poll() -> None:
        with httpx.Client(base_url=sandbox.url, timeout=5) as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)

    def hostile(code: str) -> None:
        with httpx.Client(base_url=sandbox.url, timeout=120) as client:
            client.post("/run_code", json={"code": code, "run_timeout": 4, "memory_limit_MB": 256})

    poller = threading.Thread(target=poll)
    runs = [threading.Thread(target=hostile, args=(code,)) for code in battery * 2]
    poller.start()
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    stop.set()
    poller.join()
    assert len(latencies) > 50
    # a blocked event loop delays every answer; one answer can also wait a scheduler tick when other jobs load the
    # host's two cores, so: 95% within 100 ms, none beyond 500 ms
    latencies.sort()
    p95 = latencies[int(0.95 * len(latencies))]
    assert p95 < 0.1 and latencies[-1] < 0.5, f"/health p95 {p95 * 1000:.0f} ms, slowest {latencies[-1] * 1000:.0f} ms"


def test_a_request_whose_client_has_gone_is_cancelled(jail_check, sandbox, api, jail_uids):
    require_jail(jail_check)
    port = httpx.URL(sandbox.url).port
    body = json.dumps({"code": "import time\ntime.sleep(60)", "run_timeout": 60}).encode()
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(
            b"POST /run_code HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while health(api)["capacity"]["busy"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health(api)["capacity"]["busy"] >= 1
    # a busy slot can precede the jailed process, so wait for the cancellation itself before checking processes
    started = time.monotonic()
    while 'sandbox_rejected_total{reason="client_gone"}' not in api.get("/metrics").text:
        assert time.monotonic() - started < 5, "the service did not cancel the request of a client that went away"
        time.sleep(0.05)
    assert wait_until_no_processes(jail_uids, timeout_s=5) == []
    assert time.monotonic() - started < 5


def _sleep_until_killed(url: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the service is killed under this request
        httpx.post(f"{url}/run_code", json={"code": "import time\ntime.sleep(30)"}, timeout=60)


def test_the_leftovers_of_a_killed_service_are_swept_at_start():
    root = Path(tempfile.mkdtemp(prefix="fr_sandbox_sweep-"))
    root.chmod(0o711)  # the jail's uids pass through it to their run directories
    try:
        service = LocalSandbox(workers=1, extra_args=["--run-root", str(root)])
        service.start()
        with httpx.Client(base_url=service.url, timeout=60) as api:
            run_root = Path(health(api)["isolation"]["run_root"])
            threading.Thread(target=_sleep_until_killed, args=(service.url,)).start()
            deadline = time.monotonic() + 10
            while not any(run_root.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert any(run_root.iterdir())
            service.process.send_signal(signal.SIGKILL)
            service.stop()  # reaps it and sweeps its process group, as a supervisor would
        assert run_root.is_dir()  # what a kill -9 leaves behind
        with LocalSandbox(workers=1, extra_args=["--run-root", str(root)]) as again:
            with httpx.Client(base_url=again.url, timeout=60) as api:
                assert not run_root.exists()
                assert [p.name for p in root.iterdir()] == [Path(health(api)["isolation"]["run_root"]).name]
        assert list(root.iterdir()) == []  # and a clean stop leaves nothing
    finally:
        shutil.rmtree(root, ignore_errors=True)
