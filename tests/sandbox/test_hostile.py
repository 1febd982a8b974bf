"""Hostile programs against the real service: each must be contained, and /health must answer afterwards.

Rule: no hostile program runs until a harmless probe has shown that the jail holds (its own pid namespace,
a non-root uid as the HOST sees it, process and memory caps). If the probe does not show that, every
hostile test FAILS before sending its program.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

import sandbox_service
from tests.support.sandbox import SANDBOX_SECRET as SECRET
from tests.support.sandbox import health, processes_of, require_jail, run_code, wait_until_no_processes


def _contained(api, sandbox, jail_uids) -> None:
    """After a hostile run: the service answers, is alive, and no jailed process is left on the host."""
    assert sandbox.process.poll() is None, "the service died"
    assert health(api)["status"] == "ok"
    assert wait_until_no_processes(jail_uids) == [], "jailed processes outlived their run"


def _concurrently(api, code: str) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_code(api, code, run_timeout=20)))
    thread.start()
    return thread, result


def test_the_probe_shows_the_jail_holds(jail_check):
    require_jail(jail_check)


def test_fork_bomb(jail_check, api, sandbox, jail_uids):
    require_jail(jail_check)
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    neighbour, neighbour_result = _concurrently(api, "import time\ntime.sleep(0.5)\nprint('fine')")
    started = time.monotonic()
    answer = run_code(api, bomb, run_timeout=3)
    neighbour.join()
    assert answer["run_result"]["status"] == "TimeLimitExceeded"
    assert time.monotonic() - started < 15
    assert neighbour_result["run_result"]["stdout"] == "fine\n", "a fork bomb must not starve the other slot"
    _contained(api, sandbox, jail_uids)


def test_memory_bombs(jail_check, api, sandbox, jail_uids):
    require_jail(jail_check)
    heap = run_code(api, "x = bytearray(8 * 2 ** 30)", memory_limit_MB=256)
    assert heap["status"] == "Failed" and "MemoryError" in heap["run_result"]["stderr"]
    growing = run_code(api, "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2 ** 20))", memory_limit_MB=256)
    assert "MemoryError" in growing["run_result"]["stderr"]
    if health(api)["isolation"]["cgroup"]["memory"]:
        # tmpfs pages escape RLIMIT_AS; the memory cgroup must catch them.
        shm = (
            "i = 0\nwhile True:\n    with open(f'/dev/shm/f{i}', 'wb') as f:\n        f.write(b'x' * (32 << 20))\n"
            "    i += 1\n"
        )
        answer = run_code(api, shm, memory_limit_MB=256, run_timeout=20)
        assert answer["run_result"]["status"] == "Error" and "memory limit" in answer["message"], answer
    _contained(api, sandbox, jail_uids)


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(600)"])
def test_running_past_the_timeout(jail_check, api, sandbox, jail_uids, code):
    require_jail(jail_check)
    started = time.monotonic()
    answer = run_code(api, code, run_timeout=1)
    assert answer["run_result"]["status"] == "TimeLimitExceeded"
    assert time.monotonic() - started < 5
    _contained(api, sandbox, jail_uids)


def test_no_network(jail_check, api, sandbox, jail_uids):
    require_jail(jail_check)
    service_port = httpx.URL(sandbox.url).port
    code = f"""
import json, socket
tried = {{}}
for name, address in [("service", ("127.0.0.1", {service_port})), ("outside", ("192.0.2.1", 80))]:
    try:
        socket.create_connection(address, timeout=3).close()
        tried[name] = "connected"
    except OSError as e:
        tried[name] = type(e).__name__
try:
    socket.getaddrinfo("example.com", 80)
    tried["dns"] = "resolved"
except OSError as e:
    tried["dns"] = type(e).__name__
tried["interfaces"] = [n for _, n in socket.if_nameindex()]
print(json.dumps(tried))
"""
    seen = json.loads(run_code(api, code, run_timeout=20)["run_result"]["stdout"])
    assert seen["service"] == "ConnectionRefusedError", seen
    assert seen["outside"] != "connected" and seen["dns"] != "resolved", seen
    assert seen["interfaces"] == ["lo"]
    _contained(api, sandbox, jail_uids)


def test_cannot_read_the_services_environment_or_files(jail_check, api, sandbox, jail_uids):
    require_jail(jail_check)
    service_file = os.path.abspath(sandbox_service.__file__)
    code = f"""
import json, os
seen = {{"environ": dict(os.environ), "listing": os.listdir("/")}}
for path in ["/proc/1/environ", "/proc/self/environ", "/proc/1/cmdline", {service_file!r}, "/etc/shadow", "/root",
             {os.path.abspath("pyproject.toml")!r}, "/proc/{sandbox.process.pid}/environ"]:
    try:
        seen[path] = open(path, "rb").read().decode(errors="replace")
    except OSError as e:
        seen[path] = "refused: " + type(e).__name__
print(json.dumps(seen))
"""
    answer = run_code(api, code)
    assert SECRET not in json.dumps(answer), "the service's environment leaked into the jail"
    seen = json.loads(answer["run_result"]["stdout"])
    assert set(seen["environ"]) <= {"PATH", "HOME", "LANG", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PWD", "LC_CTYPE"}
    for path in (
        service_file,
        "/etc/shadow",
        "/root",
        os.path.abspath("pyproject.toml"),
        f"/proc/{sandbox.process.pid}/environ",
    ):
        assert seen[path].startswith("refused: "), (path, seen[path][:200])
    assert "work" not in seen["listing"] and "root" not in seen["listing"]
    _contained(api, sandbox, jail_uids)


def test_cannot_write_outside_its_dir(jail_check, api, sandbox, jail_uids, tmp_path):
    require_jail(jail_check)
    name = f"fr_sandbox_escape_{uuid.uuid4().hex}"
    targets = [
        f"/etc/{name}",
        f"/usr/{name}",
        f"/{name}",
        os.path.join(os.getcwd(), name),
        str(tmp_path / name),
        f"/tmp/{name}",
    ]
    code = f"""
import json
done = {{}}
for path in {targets!r} + ["inside.txt"]:
    try:
        with open(path, "w") as f:
            f.write("x")
        done[path] = "written"
    except OSError as e:
        done[path] = type(e).__name__
print(json.dumps(done))
"""
    done = json.loads(run_code(api, code)["run_result"]["stdout"])
    assert done["inside.txt"] == "written"
    for path in targets:
        assert not os.path.exists(path), f"{path} appeared on the host"
        if not path.startswith("/tmp/"):  # /tmp inside is the jail's own tmpfs, gone with the run
            assert done[path] != "written", path
    _contained(api, sandbox, jail_uids)


def test_100_mb_of_stdout_is_capped(jail_check, api, sandbox, jail_uids):
    require_jail(jail_check)
    started = time.monotonic()
    answer = run_code(api, "import sys\nsys.stdout.write('x' * 10 ** 8)\nprint('never reached')")
    assert time.monotonic() - started < 10
    assert answer["status"] == "Failed" and answer["run_result"]["status"] == "Error"
    cap = health(api)["limits"]["max_output_bytes"]
    assert len(answer["run_result"]["stdout"]) == cap and "output exceeded" in answer["message"]
    rss_kb = int(
        next(
            line
            for line in Path(f"/proc/{sandbox.process.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        ).split()[1]
    )
    assert rss_kb < 400_000, f"the service holds {rss_kb} kB after the flood"
    _contained(api, sandbox, jail_uids)


@pytest.mark.parametrize("kill", ["os.kill(os.getppid(), signal.SIGKILL)", "os.kill(-1, signal.SIGKILL)"])
def test_killing_its_parent_or_everything(jail_check, api, sandbox, jail_uids, kill):
    require_jail(jail_check)
    neighbour, neighbour_result = _concurrently(api, "import time\ntime.sleep(1)\nprint('fine')")
    time.sleep(0.2)
    run_code(api, f"import os, signal\n{kill}\nprint('after the kill')")
    neighbour.join()
    assert neighbour_result["run_result"]["stdout"] == "fine\n"
    _contained(api, sandbox, jail_uids)


def test_background_children_do_not_outlive_the_run(jail_check, api, sandbox, jail_uids):
    require_jail(jail_check)
    code = """
import os, subprocess, time
subprocess.Popen(["sleep", "300"])
subprocess.Popen(["sh", "-c", "nohup sleep 300 >/dev/null 2>&1 &"])
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(300)
    os._exit(0)
time.sleep(0.3)
print("leaving")
"""
    started = time.monotonic()
    answer = run_code(api, code)
    assert answer["status"] == "Success" and answer["run_result"]["stdout"] == "leaving\n"
    assert time.monotonic() - started < 5
    _contained(api, sandbox, jail_uids)
    assert processes_of(jail_uids) == []
