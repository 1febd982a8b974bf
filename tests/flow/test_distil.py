"""Distillation with the offline search teacher, for real: python -m fr_jax.flow.optimize with designer.kind search on
two queries for three rounds, every design run by the real sandbox (POST /workflow/run) with the real SmolLM2 worker.

- the teacher's designs are runnable Workflow code, one grammar move from their parent, and the recorded rounds
  replay: the teacher asked again with each round's request and seed writes the same design and reasoning;
- the query-form SFT record's system and user turns are, byte for byte, what the GRPO/eval workflow mode (built from
  a grpo: section and prepared on the same sandbox) gives the policy; its answer parses back to the best design;
- the per-round form on request; best_fixed picked from the run; config mistakes in one line.
"""

import asyncio
import contextlib
import io
import json

import pytest
import yaml

from fr_jax.cli import MODES
from fr_jax.config import GRPOSection
from fr_jax.data.jsonl import read_jsonl
from fr_jax.data.task_file import load_task_set
from fr_jax.flow.baselines import load_best_fixed
from fr_jax.flow.feedback import RunRecord
from fr_jax.flow.grammar import spec_of
from fr_jax.flow.optimize import derived_seed, main
from fr_jax.flow.prompt import Experience, design_text, parse_design
from fr_jax.flow.teacher import DesignRequest, SearchDesigner, moves
from fr_jax.rl.setup import build_mode
from fr_jax.sandbox.client import SandboxClient
from tests.support.sft import tokenize_sft_file

TASKS = [
    {
        "task_id": "toy/add",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "entry_point": "add",
        "tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"],
        "public_tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
    },
    {
        "task_id": "toy/count_zeros",
        "prompt": 'def count_zeros(xs):\n    """Return how many items of the list xs are 0."""\n',
        "entry_point": "count_zeros",
        "tests": ["assert count_zeros([0, 1, 0]) == 2", "assert count_zeros([]) == 0", "assert count_zeros([4]) == 0"],
        "public_tests": ["assert count_zeros([]) == 0", "assert count_zeros([0, 1, 0]) == 2"],
    },
]
TOLD = 7  # loop.max_operator_calls_told and grpo.reward.max_operator_calls: not the default 10, so it must be passed
LIMITS = dict(max_call_sites=TOLD, max_operator_calls=20)  # budgets.max_operator_calls keeps its default


@pytest.fixture(scope="module")
def search_run(tmp_path_factory, workflow_sandbox):
    root = tmp_path_factory.mktemp("distil")
    tasks_file = root / "tasks.jsonl"
    tasks_file.write_text("".join(json.dumps({**task, "split": "train"}) + "\n" for task in TASKS))
    cfg = {
        "out_dir": str(root / "out"),
        "tasks": {"dataset": "jsonl", "file": str(tasks_file), "split": "train"},
        "designer": {"kind": "search"},
        "worker": {"name": "local", "max_tokens": 48, "temperature": 0.7},
        "budgets": {"wall_s": 300},
        "sandbox": {"launch": "none", "url": workflow_sandbox.url},
        "loop": {"rounds": 3, "validation_runs": 2, "concurrency": 2, "max_operator_calls_told": TOLD},
    }
    path = root / "optimize.yaml"
    path.write_text(yaml.safe_dump(cfg))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--config", str(path)]) == 0
    queries = sorted(read_jsonl(root / "out" / "rounds.jsonl"), key=lambda q: q["index"])
    return path, root / "out", tasks_file, queries, printed.getvalue()


def test_search_teacher_designs_run(search_run):
    _, _, _, queries, printed = search_run
    assert "2 queries, 4 designed rounds (0 format failures)" in printed
    for q in queries:
        for r in q["rounds"][1:]:
            design = parse_design(r["designer"]["content"])
            assert (design.modification, design.graph, design.prompt) == (r["modification"], r["graph"], r["prompt"])
            assert r["format_error"] is None and r["designer"]["reasoning"].strip()
            parent = q["rounds"][r["parent"] - 1]
            child, parent_spec = spec_of(r["graph"], r["prompt"]), spec_of(parent["graph"], parent["prompt"])
            assert child in [m.child for m in moves(parent_spec, **LIMITS)]  # one documented move of its parent
            assert child.call_sites <= TOLD
            for run in r["runs"]:  # real runs of real Workflow code: every operator call it makes was made
                assert run["failure"] is None, run
                assert run["operator_calls"] == child.operator_calls
                assert run["worker_calls"] >= child.operator_calls - child.test  # Test asks only on failures
        assert set(q["hidden"]) == {"1", str(q["best_round"])}


def test_search_teacher_replays_its_rounds(search_run):
    """The same requests and seeds give the same designs and the same reasoning, whatever the worker did."""
    _, _, _, queries, _ = search_run
    teacher = SearchDesigner(**LIMITS)
    replayed = 0
    for q in queries:
        for r in q["rounds"][1:]:
            parent = q["rounds"][r["parent"] - 1]
            request = DesignRequest(
                messages=[],
                parent_round=parent["round"],
                parent_graph=parent["graph"],
                parent_prompt=parent["prompt"],
                parent_score=parent["score"],
                parent_runs=tuple(RunRecord.from_json(run) for run in parent["runs"]),
                experience=tuple(Experience(**e) for e in r["experience"]),
                tried=tuple((e["graph"], e["prompt"]) for e in q["rounds"][: r["round"] - 1]),
                seed=derived_seed(0, q["index"], r["round"]),
            )
            reply = asyncio.run(teacher.design(request))
            assert (reply.content, reply.reasoning) == (r["designer"]["content"], r["designer"]["reasoning"])
            replayed += 1
    assert replayed == 4


def test_query_records_are_the_policy_prompt_then_the_rounds(search_run, workflow_sandbox, smollm2_dir):
    _, out, tasks_file, queries, _ = search_run
    grpo = GRPOSection(
        mode="workflow",
        reward={"max_operator_calls": TOLD},
        sandbox={"launch": "none", "url": workflow_sandbox.url},
        workflow={"worker": "local", "worker_url": "rollout"},
    )
    mode = build_mode(grpo, None, MODES)  # as fr_jax.train (grpo.mode: workflow) and fr_jax.eval --mode workflow do

    async def prepare():
        async with SandboxClient(workflow_sandbox.url) as sandbox:
            await mode.prepare(sandbox)

    asyncio.run(prepare())
    tasks = {task.task_id: task for task in load_task_set("jsonl", "train", file=str(tasks_file))}
    records = read_jsonl(out / "sft.jsonl")
    assert [r["provenance"]["task_id"] for r in records] == [q["task_id"] for q in queries]
    for record, q in zip(records, queries):
        system, user, assistant = record["messages"]
        policy = mode.messages(tasks[q["task_id"]])
        assert json.dumps([system, user]).encode() == json.dumps(policy).encode()
        assert f"should not exceed {TOLD}" in user["content"] and "Write the first workflow" in user["content"]

        best = q["rounds"][q["best_round"] - 1]
        think, answer = assistant["content"].split("\n</think>\n\n")
        assert answer == design_text(best["modification"], best["graph"], best["prompt"])
        parsed = parse_design(assistant["content"])
        assert (parsed.error, parsed.graph, parsed.prompt) == (None, best["graph"], best["prompt"])
        assert think.startswith("<think>\nRound 1: the seed workflow.\nDesign: Seed workflow")
        position = 0
        for r in q["rounds"]:  # every round in order: its reasoning, its design, its feedback
            for part in [
                r["designer"]["reasoning"] if r["designer"] else None,
                f"Design: {r['modification']}",
                f"Feedback: public pass rate {r['score']:.3f} over 2 runs",
            ]:
                if part is not None:
                    position = think.index(part, position) + len(part)
        assert think.endswith(f"Round {best['round']} scored best ({best['score']:.3f}), so its design is the answer.")
        assert record["scores"]["validation"] == q["best_score"] and record["scores"]["rounds"] == 3
        assert record["provenance"]["designer"]["kind"] == "search" and record["provenance"]["form"] == "query"

    report, examples = tokenize_sft_file(out / "sft.jsonl", smollm2_dir, max_seq_len=8192)
    assert report.kept == 2 and all(example["loss_mask"].sum() > 200 for example in examples)


def test_rounds_form_on_request(search_run):
    path, out, _, queries, _ = search_run
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--config", str(path), "--sft-only", "--form", "rounds"]) == 0
    records = read_jsonl(out / "sft.jsonl")
    designed = [(q, r) for q in queries for r in q["rounds"][1:]]
    assert len(records) == len(designed) == 4
    for record, (q, r) in zip(records, designed):
        assert record["messages"][1]["content"] == r["designer"]["user"]  # the refinement prompt the teacher had
        provenance = record["provenance"]
        assert (provenance["form"], provenance["task_id"], provenance["round"]) == ("rounds", q["task_id"], r["round"])
        assert parse_design(record["messages"][-1]["content"]).graph == r["graph"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--config", str(path), "--sft-only"]) == 0
    assert [r["provenance"]["form"] for r in read_jsonl(out / "sft.jsonl")] == ["query", "query"]


def test_best_fixed_from_the_run(search_run):
    path, out, _, queries, _ = search_run
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--config", str(path), "--best-fixed", "best_fixed.candidates=2"]) == 0
    choice = json.loads((out / "best_fixed.json").read_text())
    assert printed.getvalue().startswith("best_fixed over 2 queries: ")
    assert set(choice["scores"]) == {"toy/add", "toy/count_zeros"}
    assert choice["score"] == pytest.approx(sum(choice["scores"].values()) / 2)
    assert len(choice["candidates"]) == 2 and choice["score"] == max(c["score"] for c in choice["candidates"])
    design = load_best_fixed(out / "best_fixed.json")
    assert (design.graph, design.prompt) in {(r["graph"], r["prompt"]) for q in queries for r in q["rounds"]}


def test_config_mistakes_are_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    base = {"out_dir": str(tmp_path), "tasks": {"dataset": "mbpp", "split": "train"}}
    for designer, message in [
        ({"kind": "chat"}, "designer.url is required with designer.kind chat"),
        ({"kind": "search", "url": "local"}, "designer.url, model and api_key_env are for designer.kind chat"),
    ]:
        path.write_text(yaml.safe_dump({**base, "designer": designer, "sandbox": {"launch": "none", "url": "x"}}))
        assert main(["--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("config error: ") and message in err and err.count("\n") == 1
