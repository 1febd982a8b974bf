"""scripts/gpu_check.sh, the one run a lent GPU gets, checked where no GPU is: its dry run plans the chosen steps and
parses the benchmarks' flags, and a wrong step name stops it before anything runs."""

import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", *args], capture_output=True, text=True, timeout=300, cwd=REPO
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
