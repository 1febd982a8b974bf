"""FlowReasoner's refinement loop and the distillation-data builder (python -m fr_jax.flow.optimize).

Pure parts against hand-computed cases: parent selection and the experience list. Then the whole command on three
queries for two rounds, with the real sandbox and the real fr_jax.serve worker (SmolLM2), and two designers:
- a scripted teacher on a real OpenAI-compatible endpoint, standing in for DeepSeek-R1 (which cannot run here): it
  answers each query with a known design (one that works, one that raises, one with no tags), so every path of
  the bookkeeping is exercised with exact expectations;
- SmolLM2 itself through fr_jax.serve, whose designs are format failures that must be recorded as such.
"""

import json
import math
import threading
import time

import numpy as np
import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request

from fr_jax.data.jsonl import read_jsonl
from fr_jax.flow.chat import split_reasoning
from fr_jax.flow.data import RecordFilter, assistant_content, sft_records
from fr_jax.flow.mode import FLOW_SYSTEM_PROMPT
from fr_jax.flow.optimize import Round, best_round, candidate_rounds, experience_for, main, parent_probabilities
from fr_jax.flow.prompt import SEED_GRAPH, Experience, ParentDesign, build_design_prompt, parse_design
from fr_jax.rollout import free_port
from tests.support.sft import tokenize_sft_file

# ------------------------------------------------------------------------------------------- parent selection


def test_parent_probabilities_hand_computed():
    # a perfect and a failed round: softmax(0.2 * [0, -100]) = [1, e^-20] ~ [1, 0]; p = 0.3/2 + 0.7 * that
    np.testing.assert_allclose(parent_probabilities([1.0, 0.0]), [0.85, 0.15], atol=1e-8)
    np.testing.assert_allclose(parent_probabilities([0.4, 0.4, 0.4]), [1 / 3] * 3)  # ties: uniform
    # 100 * score - max = [-10, 0, -20, 0]; e^(0.2 x) = [e^-2, 1, e^-4, 1]; their sum 2.1536509
    # softmax = [0.0628399, 0.4643278, 0.0085045, 0.4643278]; p = 0.075 + 0.7 * softmax
    expected = [0.1189880, 0.4000295, 0.0809531, 0.4000295]
    np.testing.assert_allclose(parent_probabilities([0.6, 0.7, 0.5, 0.7]), expected, atol=1e-7)
    assert math.isclose(sum(parent_probabilities([0.6, 0.7, 0.5, 0.7])), 1.0)
    with pytest.raises(ValueError, match=r"scores must be in \[0, 1\]"):
        parent_probabilities([0.5, 1.5])


def test_candidates_are_round_one_and_the_best_others():
    scores = {1: 0.2, 2: 0.9, 3: 0.5, 4: 0.9, 5: 0.7, 6: 0.1}
    assert candidate_rounds(scores) == [1, 2, 4, 5]  # round 1 although it is not in the top 4; ties: earlier first
    assert candidate_rounds({1: 0.9, 2: 0.1}) == [1, 2] and candidate_rounds(scores, 2) == [1, 2]
    with pytest.raises(ValueError, match="round 1"):
        candidate_rounds({2: 0.5})


# -------------------------------------------------------------------------------------------- experience list


def a_round(number, parent, score, modification="", format_error=None):
    parent_score = {1: 0.5, 2: 0.75}.get(parent)
    return Round(number, parent, parent_score, modification, SEED_GRAPH, "", score, (), format_error=format_error)


def test_experience_lists_what_each_modification_of_the_parent_did():
    rounds = [
        a_round(1, None, 0.5),
        a_round(2, 1, 0.75, "add a Test step"),
        a_round(3, 2, 0.25, "ensemble of 3"),
        a_round(4, 1, 0.0, "", format_error="no complete <graph>...</graph> in the answer"),
        a_round(5, 1, 0.5, "reword the prompt"),
    ]
    assert experience_for(1, rounds) == [
        Experience("add a Test step", 0.5, 0.75),
        Experience("(no modification named) [unusable design: no complete <graph>...</graph> in the answer]", 0.5, 0.0),
        Experience("reword the prompt", 0.5, 0.5),
    ]
    assert experience_for(2, rounds) == [Experience("ensemble of 3", 0.75, 0.25)]
    assert experience_for(3, rounds) == []
    text = build_design_prompt(
        "def f(): ...", "1. Custom(...)", parent=ParentDesign(SEED_GRAPH, "", 0.5), experience=experience_for(1, rounds)
    )
    assert 'modification "add a Test step" took the score from 0.500 to 0.750' in text
    assert best_round(rounds).round == 2
    assert best_round([*rounds, a_round(6, 2, 1.0, format_error="x"), a_round(7, 3, 0.75)]).round == 2  # ties: earliest


def test_reasoning_comes_from_the_api_field_or_the_think_block():
    assert split_reasoning("<think>plan A</think><graph>...", None) == "plan A"
    assert split_reasoning("<graph>...", "plan B") == "plan B"
    assert split_reasoning("<think>cut off", None) == "cut off" and split_reasoning("<graph>", None) == ""
    answer = assistant_content("  plan A\n", "m", "class Workflow:\n    pass\n", "")
    assert answer.startswith("<think>\nplan A\n</think>\n\n<modification>m</modification>")
    assert assistant_content("", "m", "g\n", "").startswith("<modification>")


# ------------------------------------------------------------------------------------------ the whole command

TASKS = [
    ("toy/add", "add", "Return a + b.", "a, b", ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]),
    ("toy/mul", "mul", "Return a * b.", "a, b", ["assert mul(2, 3) == 6", "assert mul(0, 5) == 0"]),
    ("toy/neg", "neg", "Return -a.", "a", ["assert neg(3) == -3", "assert neg(-1) == 1"]),
]
GOOD_GRAPH = """class Workflow:
    def __init__(self, name, llm_config, dataset):
        self.llm = create_llm_instance(llm_config)
        self.generate = operator.CustomCodeGenerate(self.llm)

    async def __call__(self, problem, entry_point):
        await self.generate(problem=problem, entry_point=entry_point, instruction=prompt_custom.HINT)
        return "def add(a, b):\\n    return a + b\\n", 0.0
"""
RAISING_GRAPH = GOOD_GRAPH.replace("        return", '        raise RuntimeError("no")\n        return')
TEACHER = {  # entry point -> the reply's message (DeepSeek's API puts R1's reasoning in reasoning_content)
    "add": {
        "content": f"<modification>Return the reference sum.</modification>\n<graph>\n{GOOD_GRAPH}</graph>\n"
        '<prompt>\nHINT = """Be brief."""\n</prompt>',
        "reasoning_content": "The seed is fine; a hint keeps the worker brief.",
    },
    "mul": {
        "content": f"<think>Raise early to test the loop.</think>\n<modification>Fail fast.</modification>\n"
        f'<graph>\n{RAISING_GRAPH}</graph>\n<prompt>\nHINT = "x"\n</prompt>'
    },
    "neg": {"content": "I would improve the workflow by adding a test step."},
}


def write_tasks(path):
    lines = [
        {
            "task_id": task_id,
            "split": "validate",
            "prompt": f'def {name}({args}):\n    """{doc}"""\n',
            "entry_point": name,
            "tests": tests,
        }
        for task_id, name, doc, args, tests in TASKS
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def teacher():
    """The scripted teacher: an OpenAI-compatible /v1/chat/completions on a free port, answering by query."""
    app = FastAPI()
    app.state.requests = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.requests.append(body)
        entry = next(name for _, name, *_ in TASKS if f"def {name}(" in body["messages"][-1]["content"])
        return {
            "id": "x",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", **TEACHER[entry]}}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100},
        }

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield app.state, f"http://127.0.0.1:{server.config.port}/v1"
    server.should_exit = True
    thread.join(10)


def config(tmp_path, designer: dict, sandbox_url: str, limit: int | None = None, **sections) -> dict:
    cfg = {
        "out_dir": str(tmp_path / "out"),
        "tasks": {
            "dataset": "jsonl",
            "file": str(write_tasks(tmp_path / "tasks.jsonl")),
            "split": "validate",
            "limit": limit,
        },
        "designer": designer,
        "worker": {"name": "local", "max_tokens": 24, "temperature": 0.7},
        "sandbox": {"launch": "none", "url": sandbox_url},
        "loop": {"rounds": 2, "validation_runs": 2, "final_runs": 1, "concurrency": 3},
        "filter": {"min_score": 0.5},
        "records": {"form": "rounds"},  # these tests read the designer's exchanges; the query form: test_distil.py
    }
    cfg.update(sections)
    path = tmp_path / "optimize.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_rounds_on_three_queries_write_sft_records(tmp_path, teacher, workflow_sandbox, smollm2_dir, capsys):
    state, url = teacher
    path = config(tmp_path, {"url": url, "model": "deepseek-r1-scripted", "max_tokens": 512}, workflow_sandbox.url)
    assert main(["--config", str(path)]) == 0
    assert "3 queries, 3 designed rounds (1 format failures)" in capsys.readouterr().out
    out = tmp_path / "out"
    queries = {q["task_id"]: q for q in read_jsonl(out / "rounds.jsonl")}
    assert sorted(queries) == ["toy/add", "toy/mul", "toy/neg"] and len(state.requests) == 3

    for q in queries.values():
        seed, designed = q["rounds"]
        # the seed: real worker runs, one CustomCodeGenerate each; its score is the mean of its runs' pass rates
        assert seed["graph"] == SEED_GRAPH and len(seed["runs"]) == 2
        assert all(
            run["worker_calls"] == run["operator_calls"] == 1 and run["worker_tokens"] > 0 for run in seed["runs"]
        )
        assert seed["score"] == pytest.approx(np.mean([run["pass_rate"] for run in seed["runs"]]))
        # round 2 refines the only candidate, round 1, with no experience yet
        assert (designed["parent"], designed["parent_score"], designed["candidates"]) == (1, seed["score"], {"1": 1.0})
        assert designed["experience"] == [] and designed["designer"]["system"] == FLOW_SYSTEM_PROMPT
        user = designed["designer"]["user"]
        assert q["query"].strip() in user and SEED_GRAPH.strip() in user and f"scored {seed['score']:.3f}" in user
        assert f"Its validation runs: public pass rate {seed['score']:.3f} over 2 runs" in user
        runnable = [r for r in q["rounds"] if r["format_error"] is None]
        assert q["best_round"] == max(runnable, key=lambda r: (r["score"], -r["round"]))["round"]
        assert set(q["hidden"]) == {"1", str(q["best_round"])}
        assert q["hidden"]["1"]["runs"][0]["hidden_pass_rate"] == q["hidden"]["1"]["score"]

    add, mul, neg = (queries[f"toy/{name}"]["rounds"][1] for name in ("add", "mul", "neg"))
    assert add["score"] == 1.0 and [run["pass_rate"] for run in add["runs"]] == [1.0, 1.0]
    assert add["designer"]["reasoning"] == TEACHER["add"]["reasoning_content"]
    assert mul["score"] == 0.0 and [run["failure"] for run in mul["runs"]] == ["workflow_exception"] * 2
    assert mul["designer"]["reasoning"] == "Raise early to test the loop."
    assert all(run["worker_calls"] == 1 for run in add["runs"] + mul["runs"])  # the graph ran up to its raise
    assert neg["format_error"].startswith("no complete <graph>") and neg["runs"] == [] and neg["score"] == 0.0
    assert queries["toy/add"]["hidden"][str(queries["toy/add"]["best_round"])]["score"] == 1.0

    # the SFT records: only add's round 2 reaches min_score 0.5; loadable by the SFT pipeline
    [record] = read_jsonl(out / "sft.jsonl")
    system, user, assistant = record["messages"]
    assert system == {"role": "system", "content": FLOW_SYSTEM_PROMPT} and user["content"] == add["designer"]["user"]
    assert assistant["content"].startswith(f"<think>\n{TEACHER['add']['reasoning_content']}\n</think>\n\n")
    parsed = parse_design(assistant["content"])
    assert (parsed.modification, parsed.graph, parsed.prompt) == (
        "Return the reference sum.",
        GOOD_GRAPH,
        'HINT = """Be brief."""\n',
    )
    assert record["scores"] == {
        "validation": 1.0,
        "validation_runs": [1.0, 1.0],
        "parent": add["parent_score"],
        "gain": 1.0 - add["parent_score"],
        "seed": add["parent_score"],
        "hidden": queries["toy/add"]["hidden"].get("2", {}).get("score"),
        "best_round": queries["toy/add"]["best_round"] == 2,
    }
    provenance = record["provenance"]
    assert (provenance["task_id"], provenance["round"], provenance["parent_round"]) == ("toy/add", 2, 1)
    assert provenance["designer"]["model"] == "deepseek-r1-scripted"
    assert provenance["designer"]["completion_tokens"] == 100 and provenance["worker"]["name"] == "local"
    report, examples = tokenize_sft_file(out / "sft.jsonl", smollm2_dir, max_seq_len=4096)
    assert report.kept == 1 and examples[0]["loss_mask"].sum() > 100

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["designer_rounds"], summary["format_failures"], summary["sft_records"]) == (3, 1, 1)
    assert summary["sft_dropped"] == {
        "seed round (no designer output)": 3,
        "format failure": 1,
        "validation score below filter.min_score": 1,
    }

    # the filter is re-applied without running anything; a second run resumes: nothing is asked again
    before = (out / "rounds.jsonl").read_text()
    assert main(["--config", str(path), "--sft-only", "filter.min_score=0.0"]) == 0
    assert [r["provenance"]["task_id"] for r in read_jsonl(out / "sft.jsonl")] == ["toy/add", "toy/mul"]
    assert main(["--config", str(path)]) == 0
    assert (out / "rounds.jsonl").read_text() == before and len(state.requests) == 3
    everything = list(queries.values())
    assert len(sft_records(everything, RecordFilter(min_gain=0.01), "rounds")[0]) == (add["parent_score"] < 1.0)
    assert len(sft_records(everything, RecordFilter(best_per_query=True), "rounds")[0]) == 2

    # the query form from a chat teacher: its reasoning and every round's feedback, format failures included
    by_query, dropped = sft_records(everything, RecordFilter(min_score=0.5))
    assert [r["provenance"]["task_id"] for r in by_query] == [
        q["task_id"] for q in everything if q["best_score"] >= 0.5
    ]
    assert sum(dropped.values()) == 3 - len(by_query)
    think = next(r for r in by_query if r["provenance"]["task_id"] == "toy/add")["messages"][-1]["content"]
    assert TEACHER["add"]["reasoning_content"] in think and "Feedback: public pass rate 1.000 over 2 runs" in think
    [neg_record] = sft_records([queries["toy/neg"]], RecordFilter())[0]
    assert "Feedback: the design could not be used: no complete <graph>" in neg_record["messages"][-1]["content"]
    with pytest.raises(ValueError, match="records.form must be 'query' or 'rounds'"):
        sft_records(everything, RecordFilter(), "round")


def test_smollm2_as_designer_gives_recorded_format_failures(tmp_path, workflow_worker, workflow_sandbox):
    path = config(
        tmp_path,
        {"url": f"{workflow_worker.url}/v1", "max_tokens": 24},
        workflow_sandbox.url,
        limit=1,
        loop={"rounds": 2, "validation_runs": 1},
    )
    assert main(["--config", str(path)]) == 0
    [query] = read_jsonl(tmp_path / "out" / "rounds.jsonl")
    seed, designed = query["rounds"]
    assert seed["runs"][0]["worker_calls"] == 1 and 0.0 <= seed["score"] <= 1.0
    reply = designed["designer"]
    assert reply["content"] and 0 < reply["completion_tokens"] <= 24 and reply["prompt_tokens"] > 1000
    assert designed["format_error"] is not None and designed["runs"] == []  # 24 tokens cannot hold a design
    assert read_jsonl(tmp_path / "out" / "sft.jsonl") == []
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["format_failure_rate"] == 1.0
