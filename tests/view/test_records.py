"""The rollout record writer: what it writes (docs/records.md), which samples it keeps, that it is atomic and loses
nothing (a full queue makes the caller wait; a failed write is raised), and the reader's checks."""

import asyncio
import gzip
import json
import threading

import numpy as np
import pytest

from fr_jax.flow.prompt import SEED_GRAPH, SEED_MODIFICATION, SEED_PROMPT, parse_design
from fr_jax.sandbox.client import AssertTests, SandboxClient
from fr_jax.trainer.records import (
    FIELDS,
    RecordError,
    RecordPolicy,
    RecordWriter,
    eval_records_path,
    read_prompts,
    read_records,
    record_files,
    rollouts_path,
)

DESIGN = f"<think>one call</think><modification>{SEED_MODIFICATION}</modification><graph>{SEED_GRAPH}</graph>" + (
    f"<prompt>{SEED_PROMPT}</prompt>"
)


def sample(group: int, index: int, **extra) -> dict:
    return {
        "task_id": f"t/{group}",
        "group": group,
        "sample": index,
        "prompt": f"prompt of task {group}",
        "completion": f"answer {group}.{index}",
        "reward": {"performance": 1.0, "total": np.float32(0.5)},
        **extra,
    }


@pytest.fixture(scope="module")
def evaluation(sandbox):
    async def run():
        async with SandboxClient(sandbox.url) as client:
            return await client.evaluate(
                "def f():\n    return 3\n", AssertTests(["assert f() == 3", "assert f() == 4"]), timeout_s=5
            )

    return asyncio.run(run())


def test_records_round_trip_with_dataclasses_and_a_prompts_table(tmp_path, evaluation):
    records = [
        sample(0, 0, design=parse_design(DESIGN), sandbox=evaluation, advantage=np.float64(1.25), seed=7),
        sample(0, 1, group_has_variance=np.bool_(True)),
        sample(1, 0, prompt="another prompt"),
    ]
    with RecordWriter(tmp_path, "all") as writer:
        writer.write_round(3, records)
        writer.write_eval("test", "workflow", [sample(0, 0)], round_index=3)
    got = read_records(rollouts_path(tmp_path, 3))
    assert [list(r) for r in got] == [list(FIELDS)] * 3  # every field, in the documented order
    first = got[0]
    assert (first["format_version"], first["kind"], first["round"], first["method"]) == (1, "grpo", 3, None)
    assert first["reward"] == {"performance": 1.0, "total": 0.5} and first["advantage"] == 1.25 and first["seed"] == 7
    assert first["design"]["graph"] == SEED_GRAPH and first["design"]["error"] is None
    tests = first["sandbox"]["tests"]
    assert [t["passed"] for t in tests] == [True, False] and tests[1]["status"] == "Failed"
    assert "AssertionError" in tests[1]["error_type"] and first["sandbox"]["load_error"] is None
    assert got[1]["group_has_variance"] is True and got[1]["design"] is None
    prompts = read_prompts(tmp_path)
    assert len(prompts) == 2  # the prompt of group 0 is stored once for its two samples
    assert prompts[first["prompt_sha"]] == "prompt of task 0" and prompts[got[2]["prompt_sha"]] == "another prompt"
    [ev] = read_records(eval_records_path(tmp_path, "test", "workflow", 3))
    assert (ev["kind"], ev["round"], ev["method"], ev["split"]) == ("eval", 3, "workflow", "test")
    assert [p.name for p in record_files(tmp_path)] == ["round_00003.jsonl.gz", "test_workflow_round_00003.jsonl.gz"]


def test_sample_policy_keeps_whole_seeded_groups():
    records = [sample(g, i) for g in range(10) for i in range(4)]
    policy = RecordPolicy.parse("sample:6")
    kept = policy.select(records, seed=0, round_index=1)
    groups = {r["group"] for r in kept}
    assert len(groups) == 2 and len(kept) == 8  # ceil(6 / 4) whole groups
    assert kept == policy.select(records, seed=0, round_index=1)  # a rerun keeps the same ones
    others = [{r["group"] for r in policy.select(records, seed=0, round_index=k)} for k in range(2, 12)]
    assert any(g != groups for g in others)  # a different choice each round
    assert len(RecordPolicy.parse("sample:1000").select(records, seed=0, round_index=1)) == 40
    for bad in ("some", "sample:0", "sample:", "sample:-2", "All"):
        with pytest.raises(RecordError, match=rf"policy '{bad}' is not one of all, off, sample:K"):
            RecordPolicy.parse(bad)


def test_off_writes_nothing(tmp_path):
    with RecordWriter(tmp_path / "run", "off") as writer:
        writer.write_round(1, [sample(0, 0)])
        writer.write_eval("test", "direct", [sample(0, 0)])
    assert not (tmp_path / "run").exists()


def test_bad_records_are_refused_at_once_naming_the_field(tmp_path):
    with RecordWriter(tmp_path, "all") as writer:
        broken = sample(0, 1, advantages=1.0)
        del broken["completion"]
        with pytest.raises(
            RecordError,
            match=r"round 2 record 1 \(t/0\): missing fields \['completion'\] unknown fields \['advantages'\] "
            r"\(the fields are listed in docs/records.md\)",
        ):
            writer.write_round(2, [sample(0, 0), broken])
        with pytest.raises(RecordError, match=r"unknown fields \['advantages'\]"):
            writer.write_round(2, [sample(0, 0, advantages=1.0)])
        with pytest.raises(RecordError, match="reward must be a dict with a 'total'"):
            writer.write_round(2, [sample(0, 0, reward=0.5)])
        with pytest.raises(RecordError, match="eval record method 'a/b' must be letters"):
            writer.write_eval("test", "a/b", [sample(0, 0)])
    assert record_files(tmp_path) == []


def test_a_failed_write_is_raised_not_lost(tmp_path):
    writer = RecordWriter(tmp_path, "all")
    writer.write_round(1, [sample(0, 0, solution={"not", "json"})])  # a set has no JSON form
    with pytest.raises(RecordError, match="writing rollout records failed: TypeError: a record holds a set"):
        writer.close()
    assert record_files(tmp_path) == []


def test_a_full_queue_makes_the_caller_wait_and_readers_never_see_half_a_file(tmp_path):
    """Large rounds through a one-slot queue: every round arrives whole, and a reader polling all the while only
    ever opens complete files."""
    big = "x" * 200_000
    rounds = 12
    seen, problems, done = {}, [], threading.Event()

    def reader():
        while not done.is_set():
            for path in record_files(tmp_path):
                try:
                    seen[path.name] = len(read_records(path))
                except (OSError, EOFError, RecordError) as err:
                    problems.append(f"{path.name}: {err}")

    watcher = threading.Thread(target=reader)
    watcher.start()
    writer = RecordWriter(tmp_path, "all", max_pending=1)
    for k in range(1, rounds + 1):
        writer.write_round(k, [sample(g, i, solution=big + str(k)) for g in range(4) for i in range(4)])
        assert writer._queue.qsize() <= 1
    writer.close()
    done.set()
    watcher.join()
    assert problems == []
    assert len(seen) > 0 and all(count == 16 for count in seen.values())
    assert [len(read_records(rollouts_path(tmp_path, k))) for k in range(1, rounds + 1)] == [16] * rounds
    assert not list((tmp_path / "rollouts").glob(".*"))  # no partial file left behind


def test_a_resumed_run_drops_the_records_of_later_rounds(tmp_path):
    with RecordWriter(tmp_path, "all") as writer:
        for k in range(1, 5):
            writer.write_round(k, [sample(0, 0)])
        writer.write_eval("test", "direct", [sample(0, 0)], round_index=4)
        writer.write_eval("test", "direct", [sample(0, 0)])
    (tmp_path / "rollouts" / ".round_00005.jsonl.gz.partial").write_bytes(b"cut")  # a writer killed mid-file
    RecordWriter(tmp_path, "all", start_round=2).close()
    names = [p.name for p in record_files(tmp_path)]
    assert names == ["round_00001.jsonl.gz", "round_00002.jsonl.gz", "test_direct.jsonl.gz"]
    assert not list((tmp_path / "rollouts").glob(".*"))


def test_the_reader_refuses_another_version_naming_it(tmp_path):
    path = tmp_path / "round_00001.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps({"format_version": 2, "task_id": "t"}) + "\n").encode()))
    with pytest.raises(RecordError, match=r"round_00001.jsonl.gz:1: record format version 2; this fr_jax reads"):
        read_records(path)
    path.write_bytes(gzip.compress(b"{not json\n"))
    with pytest.raises(RecordError, match=r"round_00001.jsonl.gz:1: not a JSON record"):
        read_records(path)
