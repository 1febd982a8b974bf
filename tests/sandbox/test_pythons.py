"""Named pythons: `python -m sandbox_service --python NAME=PATH` registers interpreters (a virtual environment with
its own libraries, here), a request chooses one by name, never by path; each is tried in the jail at start-up."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from fr_jax.sandbox.client import AssertTests, EvalItem, UnitTests
from fr_jax.sandbox.local import LocalSandbox
from tests.support.sandbox import health, run_code

MARKER = "fr_sandbox_marker"  # a module only the virtual environment has


@pytest.fixture(scope="module")
def venv():
    """A virtual environment of /usr/bin/python3 with one module of its own, where the jail's uid can read it."""
    root = Path(tempfile.mkdtemp(prefix="fr_sandbox_pythons-"))
    root.chmod(0o755)
    try:
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(root / "venv")], check=True)
        (site,) = (root / "venv" / "lib").glob("python3*/site-packages")
        (site / f"{MARKER}.py").write_text("WHERE = 'the venv'\n")
        yield root / "venv"
    finally:
        shutil.rmtree(root)


@pytest.fixture(scope="module")
def alt(venv):
    with LocalSandbox(workers=2, extra_args=["--python", f"alt={venv}/bin/python"]) as service:
        with httpx.Client(base_url=service.url, timeout=120) as api:
            yield service, api


def test_health_lists_the_named_pythons(alt, venv):
    _, api = alt
    assert health(api)["pythons"] == {"default": "/usr/bin/python3", "alt": f"{venv}/bin/python"}


def test_a_request_runs_with_the_python_it_names(alt, venv):
    _, api = alt
    code = f"import shutil, sys\nprint(sys.prefix)\nprint(shutil.which('python'))\nimport {MARKER}\n"
    ran = run_code(api, code, python="alt")
    assert ran["status"] == "Success", ran
    # the venv's own bin/ comes first in PATH, as when it is activated
    assert ran["run_result"]["stdout"].split() == [str(venv), f"{venv}/bin/python"]
    default = run_code(api, code)
    assert default["status"] == "Failed" and f"No module named '{MARKER}'" in default["run_result"]["stderr"]
    assert default["run_result"]["stdout"].split()[0] == "/usr"


def test_evaluate_and_unittest_with_a_named_python(alt):
    service, _ = alt
    uses_marker = f"import {MARKER}\n\ndef where():\n    return {MARKER}.WHERE\n"
    unittest_module = (
        "import unittest\n\nclass TestCases(unittest.TestCase):\n"
        "    def test_where(self):\n        self.assertEqual(where(), 'the venv')\n"
    )
    items = [
        EvalItem(uses_marker, AssertTests(["assert where() == 'the venv'"]), python="alt"),
        EvalItem(uses_marker, UnitTests(unittest_module), python="alt"),
        EvalItem(uses_marker, AssertTests(["assert where() == 'the venv'"])),
    ]

    async def go():
        async with service.client() as client:
            return await client.evaluate_batch(items), await client.health()

    (asserts, unit, default), seen = asyncio.run(go())
    assert asserts.passed_all and unit.passed_all and [t.name for t in unit.tests] == ["test_where"]
    assert default.load_error is not None and default.load_error.type == "ModuleNotFoundError"
    assert set(seen.pythons) == {"default", "alt"}


@pytest.mark.parametrize(
    "path, body, where",
    [
        ("/run_code", {"code": "print(1)", "python": "/usr/bin/python3"}, "python"),
        (
            "/evaluate",
            {"code": "x = 1", "tests": {"kind": "asserts", "test_list": ["assert x"]}, "python": "bcb"},
            "python",
        ),
        (
            "/evaluate/batch",
            {
                "items": [
                    {"code": "x = 1", "tests": {"kind": "asserts", "test_list": ["assert x"]}},
                    {"code": "x = 1", "tests": {"kind": "asserts", "test_list": ["assert x"]}, "python": "bcb"},
                ]
            },
            "items.1.python",
        ),
        (
            "/workflow/run",
            {
                "graph": "class Workflow: pass",
                "problem": {"text": "p", "entry_point": "f"},
                "worker": "w",
                "python": "x",
            },
            "python",
        ),
    ],
)
def test_an_unknown_python_is_a_422_that_lists_the_known_ones(alt, path, body, where):
    _, api = alt
    response = api.post(path, json=body)
    assert response.status_code == 422, response.text
    message = response.json()["message"]
    assert message.startswith(f"{where}: unknown python ") and "this service has alt, default" in message
    assert response.json()["errors"][0]["type"] == "unknown_python"


def _start(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sandbox_service", "--port", "0", "--workers", "1", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_python_the_jail_cannot_run_stops_the_start_with_one_line(tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'this interpreter is broken' >&2\nexit 3\n")
    broken.chmod(0o755)
    # tmp_path lies under a 0700 directory: only root can reach it, and the jail's uid is not root
    started = _start("--python", f"broken={broken}")
    assert started.returncode == 2 and "Traceback" not in started.stderr
    (line,) = started.stderr.strip().splitlines()
    assert f"python 'broken' ({broken}) does not run in the jail" in line
    world = Path(tempfile.mkdtemp(prefix="fr_sandbox_pythons-"))
    try:
        world.chmod(0o755)
        shutil.copy(broken, world / "python")
        (world / "python").chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        started = _start("--python", f"broken={world}/python")
        assert started.returncode == 2 and "this interpreter is broken" in started.stderr.strip().splitlines()[-1]
    finally:
        shutil.rmtree(world)
    if os.geteuid() == 0:
        assert "Permission denied" in line or "Can't find source path" in line
    # an interpreter straight in /tmp: the jail would have to show all of /tmp
    shared = Path(tempfile.gettempdir()) / f"fr_sandbox_python-{os.getpid()}"
    try:
        shutil.copy(broken, shared)
        started = _start("--python", f"shared={shared}")
        assert started.returncode == 2
        assert f"the jail would have to show all of {tempfile.gettempdir()}" in started.stderr.strip().splitlines()[-1]
    finally:
        shared.unlink(missing_ok=True)


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("bcb", "expected NAME=PATH"),
        ("b c=/usr/bin/python3", "the name must be"),
        ("x=usr/bin/python3", "absolute path"),
        ("x=/nonexistent/python", "/nonexistent/python is not an executable file"),
    ],
)
def test_a_bad_python_flag_is_one_line(spec, problem):
    started = _start("--python", spec)
    assert started.returncode == 2 and "Traceback" not in started.stderr
    (line,) = started.stderr.strip().splitlines()
    assert problem in line and spec in line
    twice = _start("--python", "x=/usr/bin/python3", "--python", "x=/usr/bin/python3")
    assert twice.returncode == 2 and "given twice" in twice.stderr
