"""Helpers shared by the sandbox tests: request shortcuts, looks at the host's processes, and the jail probe that
every hostile-code test waits for.

The one real sandbox_service of the session is the `sandbox` fixture in conftest.py.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

# Put in the sandbox services' environments (the `sandbox` and `workflow_sandbox` fixtures): jailed code and
# workflow graphs must never see them.
SANDBOX_SECRET = f"fr-sandbox-secret-{secrets.token_hex(8)}"
WORKFLOW_SECRET = f"fr-flow-secret-{secrets.token_hex(8)}"


def post(api: httpx.Client, path: str, payload: dict, expect: int = 200) -> dict:
    response = api.post(path, json=payload)
    assert response.status_code == expect, (response.status_code, response.text[:2000])
    return response.json()


def run_code(api: httpx.Client, code: str, **fields) -> dict:
    return post(api, "/run_code", {"code": code, "language": "python", **fields})


def health(api: httpx.Client) -> dict:
    response = api.get("/health")
    assert response.status_code == 200, response.text
    return response.json()


def processes_of(uids: list[int]) -> list[int]:
    """Host pids whose real uid is one of `uids` (zombies included: they still hold pids and cgroup slots)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as status:
                    uid_line = next(line for line in status if line.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            if int(uid_line.split()[1]) in uids:
                found.append(int(entry))
    return found


def wait_until_no_processes(uids: list[int], timeout_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_of(uids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


PROBE = """
import json, os, resource, socket, time
open("probe-{token}", "w").close()
print(json.dumps({{"pid": os.getpid(), "uid": os.getuid(),
                  "visible_pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                  "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
                  "as": resource.getrlimit(resource.RLIMIT_AS)[0],
                  "interfaces": [name for _, name in socket.if_nameindex()]}}), flush=True)
time.sleep(1.5)  # long enough for the test to find this process on the host and read its real uid
"""


def _host_uid_of_probe(token: str, deadline: float) -> int | None:
    """The real uid, as the host sees it, of the python process whose working directory holds probe-<token>."""
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:  # /proc/PID/cwd leads into the process's own mount namespace
                if os.path.exists(f"/proc/{entry}/cwd/probe-{token}") and Path(
                    f"/proc/{entry}/cmdline"
                ).read_bytes().split(b"\0")[1:2] == [b"main.py"]:
                    status = Path(f"/proc/{entry}/status").read_text()
                    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
            except OSError:
                continue
        time.sleep(0.05)
    return None


def jail_problems(api: httpx.Client) -> list[str]:
    """Runs a harmless probe through /run_code; returns what is wrong with the jail (empty: it holds). Never raises.

    Hostile-code tests run only after this shows the jail holds: its own pid namespace, a non-root uid as the HOST
    sees it, process and memory caps, no network, and the cgroup limits the host offers."""
    problems: list[str] = []
    token = uuid.uuid4().hex
    answer: dict = {}
    sender = threading.Thread(target=lambda: answer.update(run_code(api, PROBE.format(token=token), run_timeout=10)))
    sender.start()
    host_uid = _host_uid_of_probe(token, time.monotonic() + 10)
    sender.join()
    try:
        seen = json.loads(answer["run_result"]["stdout"])
    except (KeyError, TypeError, ValueError) as e:
        return [f"the probe did not run: {e}: {answer}"]
    if seen["pid"] > 3 or max(seen["visible_pids"]) > 3:
        problems.append(f"no private pid namespace: pid {seen['pid']}, sees {len(seen['visible_pids'])} processes")
    if seen["uid"] == 0 or host_uid in (None, 0):
        problems.append(f"not an unprivileged uid: uid {seen['uid']} inside, {host_uid} on the host")
    if seen["nproc"] == resource.RLIM_INFINITY or seen["as"] == resource.RLIM_INFINITY:
        problems.append(f"no process or memory rlimit: nproc {seen['nproc']}, address space {seen['as']}")
    if seen["interfaces"] != ["lo"]:
        problems.append(f"network interfaces visible: {seen['interfaces']}")
    cgroup = health(api)["isolation"].get("cgroup", {})
    host_offers = os.geteuid() == 0 and os.path.isdir("/sys/fs/cgroup/memory") and os.path.isdir("/sys/fs/cgroup/pids")
    if host_offers and not (cgroup.get("memory") and cgroup.get("pids")):
        problems.append(f"the host offers cgroup v1 memory and pids limits but they are not in force: {cgroup}")
    return problems


def require_jail(problems: list[str]) -> None:
    """Fails the calling test, before it sends any hostile program, unless the probe showed the jail holds."""
    if problems:
        pytest.fail("refusing to run hostile code: the jail does not hold: " + "; ".join(problems))
