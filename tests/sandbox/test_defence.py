"""Defence in depth (issue 14): the seccomp filter every run gets, cgroup limits, the start-up probe's layers as
/health reports them and --require, and the optional bearer token. Hostile programs run behind the jail probe.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fr_jax.sandbox.client import SandboxClient, SandboxRequestError
from fr_jax.sandbox.local import LocalSandbox
from sandbox_service.probe import LAYERS
from tests.support.sandbox import health, post, require_jail, run_code

SYSCALLS = """
import ctypes, errno, json, os, threading, subprocess
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(result):
    return 0 if result == 0 else ctypes.get_errno()
seen = {
    "ptrace": errno_of(libc.ptrace(0, 0, 0, 0)),  # PTRACE_TRACEME
    "unshare_user": errno_of(libc.unshare(0x10000000)),
    "unshare_mount": errno_of(libc.unshare(0x00020000)),
    "mount": errno_of(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
    "keyctl": errno_of(libc.syscall(250, 0, 0, 0, 0, 0)),
    "bpf": errno_of(libc.syscall(321, 0, 0, 0)),
    "perf_event_open": errno_of(libc.syscall(298, 0, 0, -1, -1, 0)),
    "userfaultfd": errno_of(libc.syscall(323, 0)),
    "init_module": errno_of(libc.syscall(175, 0, 0, 0)),
    "kexec_load": errno_of(libc.syscall(246, 0, 0, 0, 0)),
    "clone_newpid": errno_of(libc.syscall(56, 0x20000000 | 17, 0, 0, 0, 0)),  # clone(CLONE_NEWPID | SIGCHLD)
    "process_vm_readv": errno_of(libc.syscall(310, os.getppid(), 0, 0, 0, 0, 0)),
}
thread = threading.Thread(target=lambda: None)
thread.start()
thread.join()
seen["threads_and_processes"] = subprocess.run(["echo", "ok"], capture_output=True, text=True).stdout.strip()
seen["seccomp"] = open("/proc/self/status").read().split("Seccomp:")[1].split()[0]
print(json.dumps(seen))
"""


def test_the_seccomp_filter_denies_what_a_program_has_no_use_for(jail_check, api):
    require_jail(jail_check)
    seen = json.loads(run_code(api, SYSCALLS)["run_result"]["stdout"])
    assert seen.pop("threads_and_processes") == "ok" and seen.pop("seccomp") == "2"
    assert seen == {name: 1 for name in seen}, seen  # every one EPERM
    # the judge's supervisor is out of reach too: the runner, its child, cannot open its memory
    probe = (
        "import os\ndef parent():\n    try:\n        open(f'/proc/{os.getppid()}/mem', 'rb').close()\n"
        "        return 'opened'\n    except OSError as e:\n        return type(e).__name__\n"
    )
    request = {"code": probe, "tests": {"kind": "asserts", "test_list": ["assert parent() == 'PermissionError'"]}}
    answer = post(api, "/evaluate", request)
    assert answer["passed_all"], answer["tests"][0]["error_message"]


def test_health_reports_every_layer_and_cgroups_limit_cpu(api):
    isolation = health(api)["isolation"]
    assert set(isolation["layers"]) == set(LAYERS)
    assert all(layer["ok"] for layer in isolation["layers"].values()), isolation["layers"]
    cgroup = isolation["cgroup"]
    if cgroup["version"] == "v1" and cgroup["cpu"]:
        run_code(api, "print(1)")
        slots = list(Path("/sys/fs/cgroup/cpu").glob("fr_sandbox-*/slot-*"))
        quotas = {int((slot / "cpu.cfs_quota_us").read_text()) for slot in slots if (slot / "tasks").exists()}
        assert 100_000 in quotas  # one CPU per run


def test_require_refuses_to_start_without_a_layer_or_with_an_unknown_one():
    unknown = subprocess.run(
        [sys.executable, "-m", "sandbox_service", "--workers", "1", "--require", "seccomp,magic"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2 and "--require magic: the layers are uid, namespaces" in unknown.stderr
    # --insecure waives the default layers, never one the operator asked for
    waived = subprocess.run(
        [sys.executable, "-m", "sandbox_service", "--workers", "1", "--port", "0", "--insecure"]
        + ["--bwrap", "/nonexistent/bwrap", "--require", "seccomp"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert waived.returncode == 2, waived.stderr
    assert "refuses to start: seccomp required, but the jail does not run" in waived.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def guarded():
    token = secrets.token_hex(16)
    env = {**os.environ, "SANDBOX_AUTH_TOKEN": token}
    with LocalSandbox(workers=1, env=env) as service:
        yield service, token


def test_a_bearer_token_guards_every_route_but_health(guarded):
    service, token = guarded
    assert httpx.get(f"{service.url}/health").status_code == 200
    for method, path in [
        ("POST", "/run_code"),
        ("POST", "/evaluate"),
        ("GET", "/metrics"),
        ("GET", "/workflow/operators"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            response = httpx.request(method, f"{service.url}{path}", json={"code": "print(1)"}, headers=headers)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"

    async def with_and_without_the_token():
        async with SandboxClient(service.url, token=token) as client:
            ran = await client.run_code("import os, json\nprint(json.dumps(dict(os.environ)))")
        async with SandboxClient(service.url, token="nope") as client:
            with pytest.raises(SandboxRequestError, match="HTTP 401"):
                await client.run_code("print(1)")
        return ran

    ran = asyncio.run(with_and_without_the_token())
    assert ran.status == "Success" and token not in ran.stdout  # and the jail never sees it
