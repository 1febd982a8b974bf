"""sandbox_service over real HTTP on 127.0.0.1: the SandboxFusion-compatible /run_code, /evaluate and its
three test styles, batches, malformed requests, metrics, back-pressure, draining and the isolation gate."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fr_jax.sandbox.local import LocalSandbox
from tests.support.sandbox import health, post, run_code


def _asserts(code: str, tests: list[str], **fields) -> dict:
    return {"code": code, "tests": {"kind": "asserts", "test_list": tests}, **fields}


def test_health_reports_the_isolation_in_force(api):
    info = health(api)
    assert info["status"] == "ok"
    isolation = info["isolation"]
    if os.geteuid() == 0:
        assert isolation["level"] == "full"
        assert len(isolation["jail_uids"]) == 2 and 0 not in isolation["jail_uids"]
    else:
        assert isolation["level"] == "namespaces"
    assert {"pid", "net", "mount", "user", "ipc"} <= set(isolation["namespaces"])
    assert isolation["network"].startswith("none")
    host_has_v1 = os.path.isdir("/sys/fs/cgroup/memory/") and os.path.isdir("/sys/fs/cgroup/pids/")
    v2_controllers = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    if (
        os.geteuid() == 0
        and host_has_v1
        and "memory" not in (v2_controllers.read_text() if v2_controllers.exists() else "")
    ):
        # this host: cgroup v1 for memory, pids and cpu; its v2 hierarchy has no memory controller, and says so
        cgroup = isolation["cgroup"]
        assert (cgroup["version"], cgroup["memory"], cgroup["pids"]) == ("v1", True, True), cgroup
        assert cgroup["cpu"] == os.path.isdir("/sys/fs/cgroup/cpu/")
        assert not v2_controllers.exists() or "no memory and pids controllers" in cgroup["reason"]
    assert info["capacity"]["workers"] == 2


def test_run_code_answers_verls_payload_in_sandboxfusion_shape(api):
    # Exactly the keys verl's reward client sends.
    payload = {
        "compile_timeout": 10,
        "run_timeout": 10,
        "code": "a, b = map(int, input().split())\nprint(a * b)",
        "stdin": "6 7\n",
        "language": "python",
        "files": {},
        "fetch_files": [],
    }
    answer = post(api, "/run_code", payload)
    assert answer["status"] == "Success"
    assert answer["compile_result"] is None
    run = answer["run_result"]
    assert run["status"] == "Finished" and run["return_code"] == 0
    assert run["stdout"] == "42\n" and run["stderr"] == ""
    assert 0 < run["execution_time"] < 10


def test_run_code_failures_and_time_limit(api):
    failed = run_code(api, "import sys\nprint('partial')\nraise SystemExit(3)")
    assert failed["status"] == "Failed"
    assert failed["run_result"]["status"] == "Finished" and failed["run_result"]["return_code"] == 3
    assert failed["run_result"]["stdout"] == "partial\n"
    crashed = run_code(api, "1 / 0")
    assert crashed["run_result"]["return_code"] == 1 and "ZeroDivisionError" in crashed["run_result"]["stderr"]
    started = time.monotonic()
    slow = run_code(api, "import time\ntime.sleep(30)", run_timeout=1)
    assert time.monotonic() - started < 5
    assert slow["status"] == "Failed" and slow["run_result"]["status"] == "TimeLimitExceeded"
    assert 1.0 <= slow["run_result"]["execution_time"] < 3.0


def test_run_code_files_in_and_out_and_no_symlink_escape(api):
    code = (
        "import os\n"
        "data = open('data/in.txt').read()\n"
        "open('out.txt', 'w').write(data.upper())\n"
        "os.symlink('/etc/hostname', 'leak')\n"
    )
    answer = run_code(
        api,
        code,
        files={"data/in.txt": base64.b64encode(b"hello").decode()},
        fetch_files=["out.txt", "leak", "never_written.txt"],
    )
    assert answer["status"] == "Success", answer
    assert base64.b64decode(answer["files"]["out.txt"]) == b"HELLO"
    assert "leak" not in answer["files"], "a symlink must not read host files for the caller"
    assert "never_written.txt" in answer["message"] and "leak" in answer["message"]


def test_unsupported_language_is_refused_naming_the_field(api):
    response = api.post("/run_code", json={"code": "int main(){}", "language": "cpp"})
    assert response.status_code == 422
    message = response.json()["message"]
    assert "language" in message and "'cpp'" in message and "python" in message


def test_evaluate_asserts_a_failing_assert_does_not_hide_the_ones_after_it(api):
    answer = post(
        api,
        "/evaluate",
        _asserts(
            "def add(a, b):\n    return a + b if a != 1 else 0",
            ["assert add(2, 2) == 4", "assert add(1, 2) == 3", "assert add(5, 5) == 10"],
        ),
    )
    assert [t["status"] for t in answer["tests"]] == ["Passed", "Failed", "Passed"]
    assert answer["tests"][1]["error_type"] == "AssertionError"
    assert answer["pass_rate"] == pytest.approx(2 / 3) and answer["num_passed"] == 2 and not answer["passed_all"]
    assert answer["tests"][0]["name"] == "assert add(2, 2) == 4"
    assert all(t["time_ms"] is not None and t["time_ms"] >= 0 for t in answer["tests"])


def test_evaluate_mbpp_setup_code_and_imports(api):
    request = {
        "code": "def area(r):\n    return math.pi * r * r",
        "tests": {
            "kind": "asserts",
            "test_imports": ["import math"],
            "test_setup_code": "R = 2",
            "test_list": ["assert abs(area(R) - 4 * math.pi) < 1e-9", "assert area(0) == 0"],
        },
    }
    assert post(api, "/evaluate", request)["passed_all"]


HUMANEVAL_TEST = """
METADATA = {"author": "test"}

def check(candidate):
    assert candidate(1) == 2
    values = [candidate(x) for x in range(3)]
    assert values == [1, 2, 3]
    for x in range(10):
        assert candidate(x) > x
    assert candidate(-1) == 0, "negative"
"""


def test_evaluate_humaneval_one_test_per_assert_statement(api):
    request = {
        "code": "def inc(x):\n    return x + 1 if x >= 0 else 5",
        "tests": {"kind": "humaneval", "test": HUMANEVAL_TEST, "entry_point": "inc"},
    }
    answer = post(api, "/evaluate", request)
    assert [t["status"] for t in answer["tests"]] == ["Passed", "Passed", "Passed", "Failed"]
    assert answer["tests"][3]["error_message"] == "negative"
    assert answer["tests"][2]["name"].startswith("for x in range(10):")
    whole = post(api, "/evaluate", {**request, "tests": {**request["tests"], "split_asserts": False}})
    assert [t["name"] for t in whole["tests"]] == ["check(candidate)"] and not whole["passed_all"]
    missing = post(api, "/evaluate", {**request, "code": "def other(x):\n    return x"})
    assert {t["error_type"] for t in missing["tests"]} == {"NameError"}
    assert "entry point 'inc' is not defined" in missing["tests"][0]["error_message"]


def test_evaluate_reports_syntax_and_import_errors_as_such(api):
    syntax = post(api, "/evaluate", _asserts("def f(:\n    pass", ["assert f() is None", "assert True"]))
    assert syntax["load_error"]["type"] == "SyntaxError" and "line 1" in syntax["load_error"]["message"]
    assert [t["error_type"] for t in syntax["tests"]] == ["SyntaxError", "SyntaxError"]
    assert syntax["pass_rate"] == 0.0
    missing_module = post(api, "/evaluate", _asserts("import no_such_module_xyz\n", ["assert True"]))
    assert missing_module["load_error"]["type"] == "ModuleNotFoundError"
    assert "no_such_module_xyz" in missing_module["load_error"]["message"]
    test_import = post(
        api,
        "/evaluate",
        {
            "code": "x = 1",
            "tests": {"kind": "asserts", "test_imports": ["import nope_mod"], "test_list": ["assert x == 1"]},
        },
    )
    assert test_import["load_error"]["step"] == "test_imports[0]"


def test_evaluate_stdin_stdout_cases(api):
    program = "import sys\nn = int(input())\nprint(sum(map(int, sys.stdin.read().split())) * n)\n"
    cases = [
        {"stdin": "2\n1 2 3\n", "expected_stdout": "12"},
        {"stdin": "1\n5\n", "expected_stdout": "6\n"},
        {"stdin": "oops", "expected_stdout": "1"},
    ]
    answer = post(api, "/evaluate", {"code": program, "tests": {"kind": "stdio", "cases": cases}})
    assert [t["status"] for t in answer["tests"]] == ["Passed", "Failed", "Error"]
    assert "expected '6\\n', got '5\\n'" in answer["tests"][1]["error_message"]
    assert answer["tests"][2]["error_type"] == "ValueError"
    fd_reader = post(
        api,
        "/evaluate",
        {
            "code": "print(open(0).read().upper(), end='')\nexit(0)",
            "tests": {"kind": "stdio", "cases": [{"stdin": "ab\n", "expected_stdout": "AB"}]},
        },
    )
    assert fd_reader["passed_all"]
    exits = post(
        api,
        "/evaluate",
        {
            "code": "import sys\nsys.exit(4)",
            "tests": {"kind": "stdio", "cases": [{"stdin": "", "expected_stdout": ""}]},
        },
    )
    assert exits["tests"][0]["status"] == "Error" and "code 4" in exits["tests"][0]["error_message"]


def test_evaluate_per_test_limits_and_recovery_from_a_dying_process(api):
    code = (
        "import os, time\n"
        "def f(x):\n    return x\n"
        "def hang():\n    while True:\n        pass\n"
        "def die():\n    os._exit(3)\n"
        "def hog():\n    return bytearray(2 ** 34)\n"
        "def stubborn():\n    while True:\n        try:\n            time.sleep(5)\n"
        "        except BaseException:\n            pass\n"
    )
    tests = [
        "assert f(1) == 1",
        "assert hang()",
        "assert die()",
        "assert f(2) == 2",
        "assert hog()",
        "assert stubborn()",
        "assert f(3) == 3",
    ]
    started = time.monotonic()
    answer = post(api, "/evaluate", _asserts(code, tests, timeout_s=1.0, memory_limit_MB=256))
    assert [t["status"] for t in answer["tests"]] == [
        "Passed",
        "TimeLimitExceeded",
        "Crashed",
        "Passed",
        "MemoryLimitExceeded",
        "TimeLimitExceeded",
        "Passed",
    ]
    assert answer["restarts"] == 2 and answer["num_passed"] == 3
    assert time.monotonic() - started < 15


def test_evaluate_batch_keeps_the_order(api):
    items = [_asserts(f"def f():\n    return {i}", [f"assert f() == {i}", "assert f() == 3"]) for i in range(6)]
    results = post(api, "/evaluate/batch", {"items": items})["results"]
    assert [r["num_passed"] for r in results] == [1, 1, 1, 2, 1, 1]


@pytest.mark.parametrize(
    "body, field",
    [
        ('{"code": "print(1)", ', "not valid JSON"),
        ('{"code": "print(1)", "run_timeout": "soon"}', "run_timeout"),
        ('{"run_timeout": 3}', "code"),
        ('{"code": "x", "files": {"../../etc/passwd": "eA=="}}', "files"),
        ('{"code": "x", "files": {"a.txt": "%%%"}}', "base64"),
        ('{"code": "x", "memory_limit_MB": 5}', "memory_limit_MB"),
        ('{"code": "x", "tiemout": 5}', "tiemout"),
    ],
)
def test_malformed_run_code_requests_get_4xx_naming_the_field(api, body, field):
    response = api.post("/run_code", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert field in response.json()["message"]


@pytest.mark.parametrize(
    "tests, field",
    [
        ({"kind": "humaneval", "test": "def check(candidate):\n    assert True", "entry_point": "1abc"}, "entry_point"),
        ({"kind": "humaneval", "test": "assert True", "entry_point": "f"}, "check(candidate)"),
        ({"kind": "asserts", "test_list": ["assert f(1) ==", "assert True"]}, "test_list"),
        ({"kind": "asserts", "test_list": []}, "test_list"),
        ({"kind": "stdio", "cases": [{"stdin": "1"}]}, "expected_stdout"),
        ({"kind": "pytest", "test_list": ["assert True"]}, "kind"),
    ],
)
def test_malformed_evaluate_requests_get_422_naming_the_field(api, tests, field):
    response = api.post("/evaluate", json={"code": "def f(x):\n    return x", "tests": tests})
    assert response.status_code == 422
    assert field in response.json()["message"], response.json()


def test_a_huge_body_gets_413(api):
    response = api.post(
        "/run_code", content=b'{"code": "' + b"x" * (33 << 20) + b'"}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "exceeds" in response.json()["message"]


def test_metrics_count_runs_outcomes_and_latency(api):
    def runs(text: str) -> float:
        line = next(
            (
                line
                for line in text.splitlines()
                if line.startswith('sandbox_runs_total{kind="run_code",outcome="exit_0"}')
            ),
            None,
        )
        return float(line.split()[-1]) if line else 0.0

    before = api.get("/metrics").text
    run_code(api, "print(1)")
    after = api.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    assert runs(after.text) == runs(before) + 1
    for name in (
        "sandbox_queue_depth",
        "sandbox_busy_workers",
        "sandbox_run_seconds_bucket",
        "sandbox_request_seconds_bucket",
        "sandbox_rejected_total",
    ):
        assert name in after.text


def test_queue_full_gets_429_with_retry_after_and_nothing_is_lost():
    with LocalSandbox(workers=1, max_queue=1) as small:
        results: list[httpx.Response] = []

        def send():
            with httpx.Client(timeout=60) as client:
                results.append(client.post(f"{small.url}/run_code", json={"code": "import time\ntime.sleep(1.5)"}))

        threads = [threading.Thread(target=send) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = sorted(r.status_code for r in results)
        assert len(results) == 6 and set(codes) == {200, 429}, codes
        assert codes.count(200) >= 2  # one running and one queued are always admitted
        for response in results:
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1 and "full" in response.json()["message"]
            else:
                assert response.json()["status"] == "Success"
        metrics = httpx.get(f"{small.url}/metrics").text
        assert f'sandbox_rejected_total{{reason="queue_full"}} {codes.count(429)}.0' in metrics


def test_sigterm_drains_in_flight_runs_then_fails_what_is_left():
    with LocalSandbox(workers=2, extra_args=["--drain-timeout", "4"]) as service:
        answers: dict[str, httpx.Response] = {}

        def send(name: str, code: str):
            with httpx.Client(timeout=60) as client:
                answers[name] = client.post(f"{service.url}/run_code", json={"code": code, "run_timeout": 30})

        quick = threading.Thread(target=send, args=("quick", "import time\ntime.sleep(2)\nprint('done')"))
        endless = threading.Thread(target=send, args=("endless", "import time\ntime.sleep(60)"))
        quick.start()
        endless.start()
        while httpx.get(f"{service.url}/health").json()["capacity"]["busy"] < 2:  # both runs are in their jails
            time.sleep(0.05)
        started = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        quick.join()
        endless.join()
        assert service.process.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean drain
        assert (
            answers["quick"].json()["status"] == "Success"
            and answers["quick"].json()["run_result"]["stdout"] == "done\n"
        )
        assert answers["endless"].status_code == 200
        assert answers["endless"].json()["status"] == "SandboxError"
        assert "shutting down" in answers["endless"].json()["message"]
        assert time.monotonic() - started < 12


def test_refuses_to_start_without_isolation_unless_insecure():
    refused = subprocess.run(
        [sys.executable, "-m", "sandbox_service", "--port", "0", "--bwrap", "/nonexistent/bwrap"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "refuses to start" in refused.stderr and "--insecure" in refused.stderr and "bubblewrap" in refused.stderr
    with LocalSandbox(workers=1, insecure=True, extra_args=["--bwrap", "/nonexistent/bwrap"]) as insecure:
        info = httpx.get(f"{insecure.url}/health").json()
        assert info["isolation"]["level"] == "none" and "bubblewrap" in info["isolation"]["reason"]
        answer = httpx.post(f"{insecure.url}/run_code", json={"code": "print(6 * 7)"}).json()
        assert answer["status"] == "Success" and answer["run_result"]["stdout"] == "42\n"


def test_health_still_answers_json_after_everything(api):
    assert json.loads(api.get("/health").text)["status"] == "ok"
