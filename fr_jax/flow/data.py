"""The distillation data: SFT chat records built from the refinement loop's rounds (fr_jax.flow.optimize).

Each line of rounds.jsonl holds one query and all its rounds. Every round the designer wrote and the sandbox could
run becomes a candidate record; the filter keeps those whose validation score (mean public pass rate) is high
enough, optionally only those that improved on their parent, optionally only each query's best. A record is what
the SFT stage reads (fr_jax.data.sft: the "messages" list; other keys are carried along untouched):

    {"messages": [{"role": "system", "content": <the designer's system prompt>},
                  {"role": "user", "content": <the design prompt: query, operators, parent design, experience>},
                  {"role": "assistant", "content": "<think>\\n<reasoning>\\n</think>\\n\\n<modification>..."
                                                   "</modification>\\n<graph>\\n...</graph>\\n<prompt>...</prompt>"}],
     "scores": {"validation", "validation_runs", "parent", "gain", "seed", "hidden", "best_round"},
     "provenance": {"task_id", "dataset", "split", "round", "parent_round", "designer", "worker", "created", ...}}

The assistant turn is the designer's reasoning (its <think> block, or the API's separate reasoning field) followed
by the design re-written in canonical tags, so every record parses back to exactly the design that was scored.
A system prompt that was not sent is not invented: the record then starts with the user turn.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable

from fr_jax.flow.prompt import parse_design


@dataclasses.dataclass(frozen=True)
class RecordFilter:
    """Which designed rounds become SFT records."""

    min_score: float = 0.0  # validation score (mean public pass rate over the validation runs) at least this
    min_gain: float | None = None  # score minus the parent's score at least this (None: no condition)
    best_per_query: bool = False  # keep only the best kept round of each query (highest score, earliest on ties)

    def __post_init__(self):
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"filter.min_score must be in [0, 1], got {self.min_score}")
        if self.min_gain is not None and not -1.0 <= self.min_gain <= 1.0:
            raise ValueError(f"filter.min_gain must be in [-1, 1] or null, got {self.min_gain}")


def design_text(modification: str, graph: str, prompt: str) -> str:
    """A design in the three tags the meta-agent's prompt asks for."""
    return (
        f"<modification>{modification.strip()}</modification>\n<graph>\n{graph.strip(chr(10))}\n</graph>\n"
        f"<prompt>\n{prompt.strip(chr(10))}\n</prompt>"
    )


def assistant_content(reasoning: str, modification: str, graph: str, prompt: str) -> str:
    """The reasoning (R1-style <think> block, left out when there is none) followed by the design."""
    answer = design_text(modification, graph, prompt)
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{answer}" if reasoning.strip() else answer


def _why_dropped(round_: dict, keep: RecordFilter) -> str | None:
    if round_["designer"] is None:
        return "seed round (no designer output)"
    if round_["format_error"] is not None:
        return "format failure"
    if round_["score"] < keep.min_score:
        return "validation score below filter.min_score"
    if keep.min_gain is not None and round_["score"] - round_["parent_score"] < keep.min_gain:
        return "gain over the parent below filter.min_gain"
    return None


def _record(query: dict, round_: dict) -> dict:
    designer = round_["designer"]
    messages = [{"role": "system", "content": designer["system"]}] if designer["system"] else []
    messages += [
        {"role": "user", "content": designer["user"]},
        {
            "role": "assistant",
            "content": assistant_content(
                designer["reasoning"], round_["modification"], round_["graph"], round_["prompt"]
            ),
        },
    ]
    parsed = parse_design(messages[-1]["content"])
    if (parsed.error, parsed.graph, parsed.prompt) != (None, round_["graph"], round_["prompt"]):
        raise ValueError(
            f"{query['task_id']} round {round_['round']}: the record's answer does not parse back to the "
            f"design that was scored ({parsed.error or 'the graph or prompt differs'})"
        )
    hidden = query["hidden"].get(str(round_["round"]))
    setup = query["setup"]
    return {
        "messages": messages,
        "scores": {
            "validation": round_["score"],
            "validation_runs": [run["pass_rate"] for run in round_["runs"]],
            "parent": round_["parent_score"],
            "gain": round_["score"] - round_["parent_score"],
            "seed": query["rounds"][0]["score"],
            "hidden": hidden["score"] if hidden else None,
            "best_round": round_["round"] == query["best_round"],
        },
        "provenance": {
            "task_id": query["task_id"],
            "dataset": query["dataset"],
            "split": query["split"],
            "round": round_["round"],
            "parent_round": round_["parent"],
            "designer": {
                **setup["designer"],
                "prompt_tokens": designer["prompt_tokens"],
                "completion_tokens": designer["completion_tokens"],
                "finish_reason": designer["finish_reason"],
            },
            "worker": setup["worker"],
            "validation_runs": len(round_["runs"]),
            "created": query["finished_at"],
            "source": setup["source"],
        },
    }


def sft_records(queries: Iterable[dict], keep: RecordFilter) -> tuple[list[dict], dict[str, int]]:
    """The records the filter keeps, in query then round order, and how many rounds were dropped for each reason."""
    records, dropped = [], collections.Counter()
    for query in queries:
        kept = []
        for round_ in query["rounds"]:
            reason = _why_dropped(round_, keep)
            if reason is None:
                kept.append(round_)
            else:
                dropped[reason] += 1
        if keep.best_per_query and len(kept) > 1:
            best = max(kept, key=lambda r: (r["score"], -r["round"]))
            dropped["not the query's best kept round"] += len(kept) - 1
            kept = [best]
        records += [_record(query, round_) for round_ in kept]
    return records, dict(dropped)
