"""The distillation data: SFT chat records built from the refinement loop's rounds (fr_jax.flow.optimize).

Each line of rounds.jsonl holds one query and all its rounds. Two forms of record (the SFT stage, fr_jax.data.sft,
reads "messages" and carries the other keys along untouched):

- `query` (FlowReasoner's sample {I, q, R, S}, the default): one record per query. The system and user turns are
  the prompt the policy itself gets in GRPO and at inference (WorkflowMode.messages, stored in the query's line as
  `policy_messages` when it was optimised); the assistant turn is `<think>` + every round in order (its reasoning,
  the design it tried in short, the execution feedback it got) + `</think>` + the best round's design:

    {"messages": [{"role": "system", "content": FLOW_SYSTEM_PROMPT},
                  {"role": "user", "content": <the fresh-design prompt: instruction, operators, query>},
                  {"role": "assistant", "content": "<think>\\nRound 1: the seed workflow.\\n...\\n</think>\\n\\n"
                                                   "<modification>...</modification>\\n<graph>...</prompt>"}],
     "scores": {"validation", "seed", "gain", "hidden", "hidden_seed", "best_round", "rounds"},
     "provenance": {"task_id", "dataset", "split", "form", "rounds", "best_round", "designer", "worker", ...}}

- `rounds`: one record per designed round, the exchange the designer had (its refinement prompt in, its reasoning
  and design out).

Every record's answer parses back (parse_design) to exactly the design that was scored; the builder checks it.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import Literal

from fr_jax.flow.feedback import RunRecord, feedback_text
from fr_jax.flow.prompt import design_text, operator_outline, parse_design

RecordForm = Literal["query", "rounds"]
_ERROR_CHARS = 120


@dataclasses.dataclass(frozen=True)
class RecordFilter:
    """Which queries (form query: judged by their best round) or rounds (form rounds) become SFT records."""

    min_score: float = 0.0  # validation score (mean public pass rate over the validation runs) at least this
    min_gain: float | None = None  # score minus the parent's (query form: the seed's) at least this; None: any
    best_per_query: bool = False  # form rounds: keep only the best kept round of each query (earliest on ties)

    def __post_init__(self):
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"filter.min_score must be in [0, 1], got {self.min_score}")
        if self.min_gain is not None and not -1.0 <= self.min_gain <= 1.0:
            raise ValueError(f"filter.min_gain must be in [-1, 1] or null, got {self.min_gain}")


def assistant_content(reasoning: str, modification: str, graph: str, prompt: str) -> str:
    """The reasoning (R1-style <think> block, left out when there is none) followed by the design."""
    answer = design_text(modification, graph, prompt)
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{answer}" if reasoning.strip() else answer


def _checked(messages: list[dict[str, str]], round_: dict, where: str) -> list[dict[str, str]]:
    parsed = parse_design(messages[-1]["content"])
    if (parsed.error, parsed.graph, parsed.prompt) != (None, round_["graph"], round_["prompt"]):
        raise ValueError(
            f"{where}: the record's answer does not parse back to the design that was scored "
            f"({parsed.error or 'the graph or prompt differs'})"
        )
    return messages


def _designer_provenance(setup: dict, rounds: list[dict]) -> dict:
    """The designer's settings and what it spent on these rounds (None: it reports no tokens, e.g. the search)."""

    def total(key: str) -> int | None:
        counts = [r["designer"][key] for r in rounds]
        return None if any(c is None for c in counts) else sum(counts)

    return {
        **setup["designer"],
        "prompt_tokens": total("prompt_tokens"),
        "completion_tokens": total("completion_tokens"),
        "finish_reason": rounds[-1]["designer"]["finish_reason"] if len(rounds) == 1 else None,
    }


def _common_provenance(query: dict) -> dict:
    return {"task_id": query["task_id"], "dataset": query["dataset"], "split": query["split"]}


# ------------------------------------------------------------------------------------------- the query form


def reasoning_trace(query: dict) -> str:
    """Every round of a query in order (reasoning, the design in short, its feedback with failures by kind),
    then which one won."""
    blocks = []
    for r in query["rounds"]:
        if r["parent"] is None:
            lines = [f"Round {r['round']}: the seed workflow."]
        else:
            lines = [f"Round {r['round']}, refining round {r['parent']} (score {r['parent_score']:.3f}):"]
        if r["designer"] is not None and r["designer"]["reasoning"].strip():
            lines.append(r["designer"]["reasoning"].strip())
        outline = operator_outline(r["graph"])
        lines.append(f"Design: {r['modification'] or '(no modification named)'}" + (f" [{outline}]" if outline else ""))
        if r["format_error"] is not None:
            lines.append(f"Feedback: the design could not be used: {r['format_error'][:_ERROR_CHARS]}")
        else:
            runs = [RunRecord.from_json(run) for run in r["runs"]]
            lines.append(f"Feedback: {feedback_text(r['score'], runs, short=True)}.")
        blocks.append("\n".join(lines))
    best = query["rounds"][query["best_round"] - 1]
    blocks.append(f"Round {best['round']} scored best ({best['score']:.3f}), so its design is the answer.")
    return "\n\n".join(blocks)


def _why_query_dropped(query: dict, keep: RecordFilter) -> str | None:
    if all(r["designer"] is None for r in query["rounds"]):
        return "no designed round (loop.rounds is 1)"
    if query["best_score"] < keep.min_score:
        return "best validation score below filter.min_score"
    if keep.min_gain is not None and query["best_score"] - query["rounds"][0]["score"] < keep.min_gain:
        return "gain of the best round over the seed below filter.min_gain"
    return None


def query_record(query: dict) -> dict:
    """FlowReasoner's sample for one query (module docstring)."""
    if "policy_messages" not in query:
        raise ValueError(
            f"{query['task_id']}: rounds.jsonl has no policy_messages (written by an older fr_jax.flow.optimize): "
            "build records.form rounds from it, or run the loop again into a new out_dir"
        )
    best = query["rounds"][query["best_round"] - 1]
    answer = f"<think>\n{reasoning_trace(query)}\n</think>\n\n" + design_text(
        best["modification"], best["graph"], best["prompt"]
    )
    messages = _checked([*query["policy_messages"], {"role": "assistant", "content": answer}], best, query["task_id"])
    hidden, seed = query["hidden"], query["rounds"][0]
    designed = [r for r in query["rounds"] if r["designer"] is not None]
    return {
        "messages": messages,
        "scores": {
            "validation": best["score"],
            "seed": seed["score"],
            "gain": best["score"] - seed["score"],
            "hidden": hidden[str(best["round"])]["score"],
            "hidden_seed": hidden[str(seed["round"])]["score"],
            "best_round": best["round"],
            "rounds": len(query["rounds"]),
        },
        "provenance": {
            **_common_provenance(query),
            "form": "query",
            "rounds": len(query["rounds"]),
            "best_round": best["round"],
            "designer": _designer_provenance(query["setup"], designed),
            "worker": query["setup"]["worker"],
            "validation_runs": len(best["runs"]),
            "created": query["finished_at"],
            "source": query["setup"]["source"],
        },
    }


# ------------------------------------------------------------------------------------------ the rounds form


def _why_round_dropped(round_: dict, keep: RecordFilter) -> str | None:
    if round_["designer"] is None:
        return "seed round (no designer output)"
    if round_["format_error"] is not None:
        return "format failure"
    if round_["score"] < keep.min_score:
        return "validation score below filter.min_score"
    if keep.min_gain is not None and round_["score"] - round_["parent_score"] < keep.min_gain:
        return "gain over the parent below filter.min_gain"
    return None


def round_record(query: dict, round_: dict) -> dict:
    """One designed round as the designer saw it: its refinement prompt in, its reasoning and design out."""
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
    messages = _checked(messages, round_, f"{query['task_id']} round {round_['round']}")
    hidden = query["hidden"].get(str(round_["round"]))
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
            **_common_provenance(query),
            "form": "rounds",
            "round": round_["round"],
            "parent_round": round_["parent"],
            "designer": _designer_provenance(query["setup"], [round_]),
            "worker": query["setup"]["worker"],
            "validation_runs": len(round_["runs"]),
            "created": query["finished_at"],
            "source": query["setup"]["source"],
        },
    }


def _round_records(query: dict, keep: RecordFilter, dropped: collections.Counter) -> list[dict]:
    kept = []
    for round_ in query["rounds"]:
        reason = _why_round_dropped(round_, keep)
        if reason is None:
            kept.append(round_)
        else:
            dropped[reason] += 1
    if keep.best_per_query and len(kept) > 1:
        best = max(kept, key=lambda r: (r["score"], -r["round"]))
        dropped["not the query's best kept round"] += len(kept) - 1
        kept = [best]
    return [round_record(query, round_) for round_ in kept]


def sft_records(
    queries: Iterable[dict], keep: RecordFilter, form: RecordForm = "query"
) -> tuple[list[dict], dict[str, int]]:
    """The records the filter keeps, in query (then round) order, and how many queries (form query) or rounds
    (form rounds) were dropped for each reason."""
    if form not in ("query", "rounds"):
        raise ValueError(f"records.form must be 'query' or 'rounds', got {form!r}")
    records: list[dict] = []
    dropped: collections.Counter[str] = collections.Counter()
    for query in queries:
        if form == "rounds":
            records += _round_records(query, keep, dropped)
            continue
        reason = _why_query_dropped(query, keep)
        if reason is None:
            records.append(query_record(query))
        else:
            dropped[reason] += 1
    return records, dict(dropped)
