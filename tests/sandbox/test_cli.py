"""`python -m sandbox_service` with a user's mistakes: one line on stderr naming the problem and the fix, exit code
2, and a traceback only under --debug."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest


def _start(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sandbox_service", "--workers", "1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line(started: subprocess.CompletedProcess) -> str:
    assert started.returncode == 2, started.stderr
    assert "Traceback" not in started.stderr
    (line,) = started.stderr.strip().splitlines()
    return line


@pytest.fixture
def taken_port():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_port_in_use_is_one_line_before_anything_slow(taken_port):
    started = time.monotonic()
    line = _one_line(_start("--port", str(taken_port)))
    assert line == (
        f"sandbox_service: port {taken_port} on 127.0.0.1 is in use (by another sandbox_service?): stop that "
        "process, or choose another --port (0 picks a free one)"
    )
    assert time.monotonic() - started < 10  # no jail probe was waited for


def test_debug_adds_the_traceback(taken_port):
    started = _start("--port", str(taken_port), "--debug")
    assert started.returncode == 2 and "Traceback" in started.stderr and "OSError" in started.stderr
    assert started.stderr.strip().splitlines()[-1].startswith(f"sandbox_service: port {taken_port} on 127.0.0.1")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--port", "70000"], "sandbox_service: --port 70000 is out of range: give 1-65535, or 0 for a free port"),
        (["--port", "-5"], "sandbox_service: --port -5 is out of range"),
        (["--port", "eighty"], "sandbox_service: argument --port: invalid int value: 'eighty'; see python -m"),
        (
            ["--host", "192.0.2.1", "--port", "0"],
            "cannot listen on 192.0.2.1:0 (Cannot assign requested address): give",
        ),
        (["--portt", "8080"], "sandbox_service: unrecognized arguments: --portt 8080; see"),
        (["--workers", "0"], "give at least 1 worker"),
        (["--worker", "local"], "bad worker allowlist (--worker/--workers-file, or $SANDBOX_WORKERS/"),
        (["--worker", "local=http://127.0.0.1:1/v1,temperature=0"], "unknown option 'temperature=0'"),
        (["--python", "bcb"], "sandbox_service: bad python: --python 'bcb': expected NAME=PATH"),
    ],
)
def test_user_mistakes_are_one_line(args, expected):
    assert expected in _one_line(_start(*args))


def test_a_bad_workers_file_entry_is_one_line(tmp_path):
    workers = tmp_path / "workers.json"
    workers.write_text(json.dumps({"local": {"model": "m"}, "other": {"url": "http://127.0.0.1:1/v1"}}))
    line = _one_line(_start("--workers-file", str(workers)))
    assert f"worker file {workers}: entry 'local': url: Field required" in line


def test_refusing_to_start_without_isolation_is_one_line_with_code_2():
    line = _one_line(_start("--port", "0", "--bwrap", "/nonexistent/bwrap"))
    assert line.startswith("sandbox_service: refuses to start: bubblewrap ('/nonexistent/bwrap') is not installed")
    assert "--insecure" in line
