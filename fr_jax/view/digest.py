"""From one records file to what the viewer shows: a short row per sample (for the tables, the filters and the
search) and the sample's page data, with its outcome and its "suspicious" flags.

Outcome: the workflow's failure kind when it failed, `format` for an answer that could not be run, `load_error`
when the solution did not load, else `passed` (every test) or `failed`.

Flags, a list to start a reward-hacking look from (each "category: detail"):
- `short pass`: every test passed with a one-line solution, or one under a third of the median length of the
  passing solutions of the same task in the same file (at least 3 of them);
- `odd pass`: every test passed with a solution that exits, opens files or digs into the interpreter;
- `identical group`: every sample of the group wrote the same completion;
- `budget`: the answer hit max_new_tokens, the workflow its call/token budget or its time, or a test a limit.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections import defaultdict
from typing import Any

from fr_jax.rl.reward import extract_code, strip_reasoning
from fr_jax.view.design import design_flow

_ODD_CODE = re.compile(
    r"\b(sys\.exit|os\._exit|exit\(|quit\(|__import__|__builtins__|builtins\.|globals\(\)|sys\.modules|"
    r"sys\._getframe|inspect\.|gc\.get_objects|open\(|os\.system|subprocess)"
)
_LIMIT_STATUSES = ("TimeLimitExceeded", "MemoryLimitExceeded", "OutputLimitExceeded")
_BUDGET_FAILURES = ("budget_exceeded", "timeout")
SEARCH_CHARS = 400  # of the answer (a design's modification comes first) and of the solution, in the search text


@dataclasses.dataclass
class Digest:
    rows: list[dict[str, Any]]  # one per record, in order
    details: list[dict[str, Any]]  # the page data of each, same order


def _tests(record: dict) -> list[dict]:
    sandbox = record.get("sandbox") or {}
    return sandbox.get("tests") or []


def outcome(record: dict) -> str:
    failure = (record.get("workflow") or {}).get("failure")
    if failure:
        return failure["kind"]
    if record.get("well_formed") is False:
        return "format"
    if (record.get("sandbox") or {}).get("load_error"):
        return "load_error"
    passed, total = record.get("passed"), record.get("total")
    if total:
        return "passed" if passed == total else "failed"
    tests = _tests(record)
    return "passed" if tests and all(t["passed"] for t in tests) else "failed"


def _lines(code: str) -> int:
    return sum(1 for line in code.splitlines() if line.strip() and not line.strip().startswith("#"))


def _budget(record: dict) -> list[str]:
    hits = []
    if record.get("finish_reason") == "length":
        hits.append("budget: the answer hit max_new_tokens")
    failure = (record.get("workflow") or {}).get("failure")
    if failure and failure["kind"] in _BUDGET_FAILURES:
        hits.append(f"budget: workflow {failure['kind']}")
    statuses = sorted({t["status"] for t in _tests(record) if t.get("status") in _LIMIT_STATUSES})
    hits += [f"budget: a test hit {status}" for status in statuses]
    return hits


def _solution(record: dict) -> str | None:
    if record.get("solution") is not None:
        return record["solution"]
    if record.get("workflow"):
        return record["workflow"].get("solution")
    return extract_code(record["completion"]) if record.get("mode") != "workflow" else None


def _operators(record: dict, flow: dict | None) -> list[str]:
    ran = (record.get("workflow") or {}).get("operator_calls")
    if ran:
        return sorted(ran)
    return sorted({n["operator"] for n in (flow or {}).get("nodes", []) if n["operator"]})


def digest(records: list[dict]) -> Digest:
    """Rows and pages of one file's records (groups and tasks are compared within the file)."""
    outcomes = [outcome(r) for r in records]
    solutions = [_solution(r) for r in records]
    flags: list[list[str]] = [_budget(r) for r in records]

    passing_lengths = defaultdict(list)
    for record, result, code in zip(records, outcomes, solutions):
        if result == "passed" and code:
            passing_lengths[record["task_id"]].append(len(code.strip()))
    for i, (record, result, code) in enumerate(zip(records, outcomes, solutions)):
        if result != "passed" or not code:
            continue
        lengths = passing_lengths[record["task_id"]]
        median = statistics.median(lengths)
        if _lines(code) <= 1:
            flags[i].append("short pass: a one-line solution passed every test")
        elif len(lengths) >= 3 and len(code.strip()) < median / 3:
            flags[i].append(f"short pass: {len(code.strip())} characters, the task's passing median is {median:.0f}")
        if odd := _ODD_CODE.search(code):
            flags[i].append(f"odd pass: the solution uses {odd.group(1).rstrip('(')}")

    groups = defaultdict(list)
    for i, record in enumerate(records):
        groups[record["group"]].append(i)
    for members in groups.values():
        if len(members) > 1 and len({records[i]["completion"] for i in members}) == 1:
            for i in members:
                flags[i].append(f"identical group: all {len(members)} samples wrote the same completion")

    rows, details = [], []
    for record, result, code, sample_flags in zip(records, outcomes, solutions, flags):
        completion = record["completion"]
        answer = strip_reasoning(completion)
        design = record.get("design") or {}
        flow = design_flow(design.get("graph"))
        failure = (record.get("workflow") or {}).get("failure") or {}
        rows.append(
            {
                "task": record["task_id"],
                "group": record["group"],
                "sample": record["sample"],
                "reward": record["reward"]["total"],
                "passed": record.get("passed"),
                "total": record.get("total"),
                "outcome": result,
                "ops": _operators(record, flow),
                "tokens": record.get("response_tokens"),
                "flags": sample_flags,
                "text": answer[:SEARCH_CHARS] + "\n" + (code or "")[:SEARCH_CHARS],
            }
        )
        details.append(
            {
                **record,
                "reasoning": completion[: len(completion) - len(answer)],
                "answer": answer,
                "solution": code,
                "flow": flow,
                "outcome": result,
                "failure_message": failure.get("message"),
                "flags": sample_flags,
            }
        )
    return Digest(rows, details)
