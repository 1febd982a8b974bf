"""GRPO survives kill -9 (issue 14): `python -m fr_jax.train` with the tiny policy of tests/support/grpo.py, its
local rollout server and the real sandbox, killed with SIGKILL while the sandbox scores a round and again while a
checkpoint is being written, then resumed. Every round's reward, loss and gradient norm equal those of the run that
was never killed, and nothing is left behind: no rollout server, sandbox service or jail process, no sandbox run
directory, no orbax temporary directory. Direct mode, and workflow mode (the policy writes one of two whole
designs, which run in the sandbox's jail).
"""

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fr_jax.trainer.metrics import read_metrics
from tests.support.grpo import KNOWS_THE_FORMAT, build_tokenizer, grpo_config, write_bigram_model, write_tasks
from tests.support.runs import start_train

ROUNDS = 2
pytestmark = pytest.mark.slow  # four runs of the trainer per mode: about 3 minutes each on a loaded 2-core machine
FIGURES = ("reward/total", "train/loss", "train/grad_norm")
IN_THE_JAIL = b"runs INSIDE the jail"  # the first line of the harness's and the workflow runtime's source

DESIGN = '''<modification>{what}</modification>
<graph>
class Workflow:
    def __init__(self, name, llm_config, dataset):
        pass

    async def __call__(self, problem, entry_point):
        answer = {answer}
        return "def f():\\n    return " + str(answer) + "\\n", 0.0
</graph>
<prompt>
NOTE = """no worker call"""
</prompt>'''
GOOD = DESIGN.format(what="the answer", answer='3 if "three" in problem else 7')
BAD = DESIGN.format(what="a guess", answer="5")
DESIGNS = ["<pad>", "</s>", "<unk>", GOOD, BAD]
WRITES_A_DESIGN = {"<unk>": {GOOD: 4.0, BAD: 4.0}, GOOD: {"</s>": 6.0}, BAD: {"</s>": 6.0}}


def _config(mode: str, root: Path, run_dir: Path) -> dict:
    tasks = write_tasks(root / "tasks.jsonl")
    if mode == "direct":
        model = write_bigram_model(root / "policy", build_tokenizer(root / "tokenizer"), KNOWS_THE_FORMAT)
        cfg = grpo_config(run_dir, model, tasks, rounds=ROUNDS)
    else:
        tokenizer = build_tokenizer(root / "tokenizer", DESIGNS)
        model = write_bigram_model(
            root / "policy", tokenizer, WRITES_A_DESIGN, vocab=DESIGNS, max_position_embeddings=1024
        )
        cfg = grpo_config(
            run_dir,
            model,
            tasks,
            rounds=ROUNDS,
            mode="workflow",
            data={"max_prompt_tokens": 1000},
            rollout={"n": 4},
            workflow={"worker": "policy", "worker_url": "rollout", "max_tokens": 8},
            reward={"w_efficiency": 0.0},  # the efficiency term reads wall times, which no two runs share
        )
        cfg["train"].update(batch_size=8, micro_batches=1)
    cfg["train"]["export_hf"] = False
    cfg["monitor"]["tensorboard"] = False
    return cfg


def _finish(proc: subprocess.Popen, log: Path) -> None:
    proc.wait(timeout=600)
    assert proc.returncode == 0, log.read_text()[-4000:]


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process on the host."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            found[int(entry)] = (int(stat.rsplit(b")", 1)[1].split()[1]), cmdline)
    return found


def _descendants(pid: int) -> dict[int, bytes]:
    processes = _processes()
    found, frontier = {}, {pid}
    while frontier:
        children = {p for p, (parent, _) in processes.items() if parent in frontier and p not in found}
        found.update({p: processes[p][1] for p in children})
        frontier = children
    return found


def _rounds_done(run_dir: Path) -> int:
    return max((m["step"] for m in read_metrics(run_dir) if "reward/total" in m), default=0) if run_dir.exists() else 0


def _kill_when(proc: subprocess.Popen, log: Path, moment, what: str) -> dict[int, bytes]:
    """SIGKILL the trainer as soon as `moment()` holds; returns what it had started."""
    deadline = time.monotonic() + 300
    while not moment():
        assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"never saw {what}"
    started = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return started


def _left_behind(started: dict[int, bytes], timeout_s: float = 30) -> list[bytes]:
    deadline = time.monotonic() + timeout_s
    while (left := [cmd for pid, cmd in started.items() if _alive(pid, cmd)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _alive(pid: int, cmdline: bytes) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return stat.rsplit(b")", 1)[1].split()[0] != b"Z" and Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline
    except OSError:
        return False


def _run_dirs_of(started: dict[int, bytes]) -> list[Path]:
    """The sandbox services' run directories, and the folders their port files were in, that still exist."""
    services = {pid: cmd.split(b"\0") for pid, cmd in started.items() if b"sandbox_service" in cmd}
    port_files = [Path(args[args.index(b"--port-file") + 1].decode()) for args in services.values()]
    assert port_files, "a sandbox_service started by the trainer reports its port through a file"
    left = [p for pid in services for p in Path(tempfile.gettempdir()).glob(f"fr_sandbox-{pid}-*")]
    return left + [f.parent for f in port_files if f.parent.exists()]


@pytest.mark.parametrize("mode", ["direct", "workflow"])
def test_grpo_survives_kill_9_in_the_sandbox_phase_and_while_checkpointing(mode, tmp_path):
    cache = tmp_path / "xla_cache"
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference_cfg, cfg = _config(mode, tmp_path, reference_dir), _config(mode, tmp_path, run_dir)
    _finish(start_train(reference_cfg, tmp_path / "reference.log", cache), tmp_path / "reference.log")
    reference = {m["step"]: m for m in read_metrics(reference_dir) if "reward/total" in m}
    assert sorted(reference) == list(range(1, ROUNDS + 1))

    # 1. while the sandbox scores round 2: a process of the trainer's runs the harness or a workflow in a jail
    proc = start_train(cfg, tmp_path / "killed.log", cache)
    started = _kill_when(
        proc,
        tmp_path / "killed.log",
        lambda: _rounds_done(run_dir) >= 1 and any(IN_THE_JAIL in cmd for cmd in _descendants(proc.pid).values()),
        "round 2's sandbox phase",
    )
    assert any(b"sandbox_service" in cmd for cmd in started.values())
    assert any(b"fr_jax.serve" in cmd for cmd in started.values())
    assert _left_behind(started) == [], "a rollout server, sandbox or jail outlived the trainer"
    assert _rounds_done(run_dir) == 1

    # 2. while a checkpoint is being written (orbax writes a temporary directory, then renames it)
    checkpoints = run_dir / "checkpoints"
    proc = start_train(cfg, tmp_path / "resumed.log", cache)
    started_again = _kill_when(
        proc,
        tmp_path / "resumed.log",
        lambda: checkpoints.is_dir() and any("tmp" in name for name in os.listdir(checkpoints)),
        "a checkpoint being written",
    )
    assert _left_behind(started_again) == []

    _finish(start_train(cfg, tmp_path / "finished.log", cache), tmp_path / "finished.log")
    resumed = {m["step"]: m for m in read_metrics(run_dir) if "reward/total" in m}
    assert sorted(resumed) == list(range(1, ROUNDS + 1))  # each round once: lines of rounds redone were replaced
    for round_index in resumed:
        for key in FIGURES:
            assert resumed[round_index][key] == reference[round_index][key], (round_index, key)
    assert [p.name for p in checkpoints.iterdir() if "tmp" in p.name] == []
    assert _run_dirs_of(started) + _run_dirs_of(started_again) == []
