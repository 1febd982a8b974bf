"""The shipped benchmark files are the documented bytes, install with the package, and nothing reads outside the
repository."""

import hashlib
import os
import pathlib
import re
import subprocess
import sys
import zipfile

from fr_jax.data.tasks import BENCHMARK_DIR, load_tasks

REPO = pathlib.Path(__file__).resolve().parents[2]


def _documented_hashes() -> dict[str, str]:
    table = (BENCHMARK_DIR / "README.md").read_text()
    return dict(re.findall(r"^\| `([^`]+)` \| [^|]+ \| [^|]+ \| `([0-9a-f]{64})` \|$", table, flags=re.M))


def test_every_data_file_has_its_documented_sha256():
    documented = _documented_hashes()
    assert len(documented) == 10
    data_files = {
        str(p.relative_to(BENCHMARK_DIR))
        for p in BENCHMARK_DIR.rglob("*")
        if p.is_file() and p.suffix in (".jsonl", ".gz")
    }
    assert data_files == set(documented)
    for name, digest in documented.items():
        assert hashlib.sha256((BENCHMARK_DIR / name).read_bytes()).hexdigest() == digest, name


def test_task_counts():
    counts = {
        name: len(load_tasks(name, "all"))
        for name in ("humaneval", "mbpp", "mbpp-sanitized", "aflow-mbpp", "bigcodebench")
    }
    assert counts == {"humaneval": 164, "mbpp": 974, "mbpp-sanitized": 427, "aflow-mbpp": 427, "bigcodebench": 1140}


def test_no_tracked_file_reads_the_folder_beside_the_repository():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    outside = ".." + "/shared"  # split, so this file does not match itself
    offenders = [
        name
        for name in tracked.decode().split("\0")
        if name and (REPO / name).is_file() and outside in (REPO / name).read_text(errors="replace")
    ]
    assert offenders == []


def test_a_non_editable_install_carries_the_data(tmp_path):
    """Build the wheel, unpack it and load every set from it, in a folder far from the checkout."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "wheel"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "wheel").glob("fr_jax-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = (
        "import fr_jax.data.tasks as t; print(t.BENCHMARK_DIR); "
        "print(*(len(t.load_tasks(n, 'all')) for n in ('humaneval', 'mbpp', 'mbpp-sanitized', 'bigcodebench')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "FR_JAX_DATA"}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(tmp_path / "site")},
    ).stdout.split("\n")
    assert out[0] == str(tmp_path / "site" / "fr_jax" / "data" / "benchmarks")
    assert out[1] == "164 974 427 1140"
