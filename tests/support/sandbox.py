"""Helpers shared by the sandbox tests: request shortcuts and looks at the host's processes.

The one real sandbox_service of the session is the `sandbox` fixture in conftest.py.
"""

from __future__ import annotations

import os
import secrets
import time

import httpx

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
