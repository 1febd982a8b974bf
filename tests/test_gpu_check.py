"""scripts/gpu_check.sh, the one run a lent GPU gets, checked where no GPU is: its dry run plans the chosen steps and
parses the benchmarks' flags, offline it installs only the carried wheels, and a wrong step name or a request it
cannot serve stops it before anything runs."""

import os
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]


def gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )


def test_dry_run_plans_only_the_steps_asked_for(tmp_path):
    result = gpu_check(str(tmp_path), "--dry-run", "--only", "arrivals")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1/6 card" in result.stdout and "2/6 install" in result.stdout
    assert "bench/rollout.py --workload arrivals" in result.stdout
    for skipped in ("3/6", "4/6", "5/6", "pytest -m gpu", "model_step.py", "rollout_servers.py"):
        assert skipped not in result.stdout, skipped


def test_an_unknown_step_is_named(tmp_path):
    result = gpu_check(str(tmp_path), "--dry-run", "--only", "arrivals,speed")
    assert result.returncode == 2
    assert "unknown step 'speed'" in result.stderr
    assert "install" not in result.stdout  # stopped before the first step


def test_offline_mode_installs_the_carried_wheels_beside_the_machines_python(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "pydantic-2.0-py3-none-any.whl").touch()
    env = {**os.environ, "FR_JAX_WHEELS": str(wheels), "FR_JAX_PYTHON": str(REPO / ".venv/bin/python")}
    result = gpu_check(str(tmp_path / "out"), "--dry-run", "--only", "mfu,arrivals", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"--no-index --no-deps --no-compile --upgrade --target .gpu_site {wheels}/pydantic-2.0" in result.stdout
    assert ".[sglang]" not in result.stdout  # nothing from the network
    assert "bench/rollout.py --workload arrivals --no-transformers --random-weights" in result.stdout


def test_offline_mode_names_what_it_cannot_do(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    env = {**os.environ, "FR_JAX_WHEELS": str(empty)}
    result = gpu_check(str(tmp_path / "out"), "--dry-run", "--only", "arrivals", env=env)
    assert result.returncode == 1
    assert f"FR_JAX_WHEELS={empty} holds no wheels" in result.stderr
    result = gpu_check(str(tmp_path / "out"), "--dry-run", "--only", "tests,arrivals", env=env)
    assert result.returncode == 1
    assert "need SGLang, which carried wheels cannot hold; run --only mfu,arrivals" in result.stderr
