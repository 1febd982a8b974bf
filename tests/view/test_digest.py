"""What the viewer derives from records: each sample's outcome, its operators, the reasoning split from the answer,
and the suspicious-sample flags."""

from fr_jax.flow.prompt import SEED_GRAPH
from fr_jax.view.digest import digest

LONG = "def f(x):\n" + "".join(f"    y{k} = x + {k}\n" for k in range(12)) + "    return y0\n"


def record(group, sample, completion, *, passed=1, total=1, **extra):
    tests = [
        {"name": f"t{k}", "passed": k < passed, "status": "Passed" if k < passed else "Failed"} for k in range(total)
    ]
    return {
        "task_id": extra.pop("task_id", "t/1"),
        "group": group,
        "sample": sample,
        "mode": "direct",
        "completion": completion,
        "well_formed": True,
        "passed": passed,
        "total": total,
        "sandbox": {"status": "Finished", "tests": tests, "load_error": None},
        "reward": {"total": passed / total if total else -1.0},
        **extra,
    }


def fenced(code):
    return f"<think>plan</think>```python\n{code}```"


def test_outcomes_and_what_a_page_shows():
    records = [
        record(0, 0, fenced(LONG)),
        record(0, 1, fenced(LONG.replace("y0", "y1")), passed=1, total=2),
        record(0, 2, "no code at all", passed=0, total=0, well_formed=False),
        record(0, 3, fenced(LONG), passed=0, total=2, sandbox={"status": "Finished", "tests": [], "load_error": {}}),
        record(
            1,
            0,
            "<think>one call</think><graph>...</graph>",
            mode="workflow",
            design={"graph": SEED_GRAPH},
            workflow={"failure": {"kind": "workflow_exception", "message": "boom"}, "operator_calls": {"Custom": 2}},
        ),
    ]
    rows, pages = digest(records).rows, digest(records).details
    assert [r["outcome"] for r in rows] == ["passed", "failed", "format", "failed", "workflow_exception"]
    records[3]["sandbox"]["load_error"] = {"type": "SyntaxError", "message": "x", "step": "<solution>"}
    assert digest(records).rows[3]["outcome"] == "load_error"
    assert pages[0]["reasoning"] == "<think>plan</think>" and pages[0]["solution"] == LONG.rstrip("\n")
    assert pages[2]["solution"] is None
    assert rows[4]["ops"] == ["Custom"]  # what ran, when there is a run
    assert pages[4]["failure_message"] == "boom" and [n["operator"] for n in pages[4]["flow"]["nodes"]] == [
        None,
        "CustomCodeGenerate",
        None,
    ]
    assert all(not r["flags"] for r in rows)


def test_suspicious_samples_are_flagged_with_the_reason():
    short = "f = lambda x: x"
    records = [
        *(record(0, k, fenced(LONG.replace("y0", f"y{k}"))) for k in range(3)),
        record(0, 3, fenced("def f(x):\n    return x\n")),  # passes, far shorter than the others
        record(1, 0, fenced(short), task_id="t/2"),
        record(1, 1, fenced("import sys\ndef f(x):\n    sys.exit(0)\n"), task_id="t/2"),
        *(record(2, k, "same answer", passed=0, total=1, task_id="t/3") for k in range(3)),
        record(3, 0, "cut", passed=0, total=1, finish_reason="length", task_id="t/4"),
        record(3, 1, fenced(LONG), passed=0, total=1, workflow={"failure": {"kind": "budget_exceeded", "message": ""}}),
        record(3, 2, fenced(LONG), passed=0, total=2, task_id="t/4"),
    ]
    records[-1]["sandbox"]["tests"][1]["status"] = "TimeLimitExceeded"
    flags = [r["flags"] for r in digest(records).rows]
    assert flags[:3] == [[], [], []]
    assert flags[3] == ["short pass: 22 characters, the task's passing median is 207"]
    assert flags[4] == ["short pass: a one-line solution passed every test"]
    assert flags[5] == ["odd pass: the solution uses sys.exit"]
    assert flags[6:9] == [["identical group: all 3 samples wrote the same completion"]] * 3
    assert flags[9] == ["budget: the answer hit max_new_tokens"]
    assert flags[10] == ["budget: workflow budget_exceeded"]
    assert flags[11] == ["budget: a test hit TimeLimitExceeded"]
