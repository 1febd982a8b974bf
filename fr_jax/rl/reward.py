"""FlowReasoner's multi-purpose reward, as pure functions of what execution reported.

    r = w_performance * performance + w_complexity * complexity + w_efficiency * efficiency + w_format * format

The paper names the three aspects (performance, complexity, efficiency) but publishes no formula or weights;
the terms and defaults below are ours and are justified in docs/rl.md. Conventions, so that the weights mean
something: performance is in [0, 1] (+ an optional all-pass bonus); complexity, efficiency and format are
penalties in [-1, 0]. A perfect, cheap, well-formed answer scores w_performance (+ bonus).

Also here: the code extraction and format checks that decide whether a completion can be run at all, and
the unbiased pass@k estimator used in evaluation.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re

from fr_jax.config import RewardConfig

DEFAULT_REWARD = RewardConfig()

EXECUTION_STATUSES = ("ok", "timeout", "error")


@dataclasses.dataclass(frozen=True)
class RewardBreakdown:
    """Each term before weighting, and the weighted total; the loop logs every one."""

    performance: float
    complexity: float
    efficiency: float
    format: float
    total: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- the terms


def performance_term(passed: int, total: int, *, status: str = "ok", all_pass_bonus: float = 0.0) -> float:
    """Pass rate over the tests, FlowReasoner's score: 1.0 if all pass, else passed/total; a timeout or an
    exception of the whole run (status "timeout"/"error") scores 0. `all_pass_bonus` is added on a full pass."""
    if status not in EXECUTION_STATUSES:
        raise ValueError(f"execution status must be one of {EXECUTION_STATUSES}, got {status!r}")
    if total <= 0:
        raise ValueError(f"cannot score a solution against {total} tests: total must be >= 1")
    if not 0 <= passed <= total:
        raise ValueError(f"passed={passed} must be between 0 and total={total}")
    if status != "ok":
        return 0.0
    if passed == total:
        return 1.0 + all_pass_bonus
    return passed / total


def complexity_term(
    *, operator_calls: int | None = None, code_tokens: int | None = None, config: RewardConfig = DEFAULT_REWARD
) -> float:
    """Size penalty in [-1, 0]: -min(operator_calls / max_operator_calls, 1) for a workflow, or
    -min(code_tokens / max_code_tokens, 1) for a plain-code answer. Give exactly one of the two."""
    if (operator_calls is None) == (code_tokens is None):
        raise ValueError("complexity_term needs exactly one of operator_calls (workflow) or code_tokens (plain code)")
    if operator_calls is not None:
        return -_saturating(operator_calls, config.max_operator_calls, "operator_calls")
    assert code_tokens is not None
    return -_saturating(code_tokens, config.max_code_tokens, "code_tokens")


def efficiency_term(
    *, worker_calls: int, worker_tokens: int, latency_s: float, config: RewardConfig = DEFAULT_REWARD
) -> float:
    """Cost penalty in [-1, 0] of running a workflow: the mean of worker calls, worker tokens and latency,
    each divided by its normaliser and capped at 1. (Plain code has no worker: the reward gives it 0.)"""
    parts = (
        _saturating(worker_calls, config.max_worker_calls, "worker_calls"),
        _saturating(worker_tokens, config.max_worker_tokens, "worker_tokens"),
        _saturating(latency_s, config.max_latency_s, "latency_s"),
    )
    return -sum(parts) / len(parts)


def format_term(well_formed: bool) -> float:
    """0 when the answer could be parsed and run, -1 when it could not."""
    return 0.0 if well_formed else -1.0


def _saturating(value: float, cap: float, name: str) -> float:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return min(value / cap, 1.0)


def multi_purpose_reward(
    *,
    well_formed: bool,
    passed: int = 0,
    total: int = 0,
    status: str = "ok",
    operator_calls: int | None = None,
    code_tokens: int | None = None,
    worker_calls: int = 0,
    worker_tokens: int = 0,
    latency_s: float = 0.0,
    config: RewardConfig = DEFAULT_REWARD,
) -> RewardBreakdown:
    """The reward of one completion.

    A workflow answer gives `operator_calls` (see `count_operator_calls`) and its run's worker usage; a
    plain-code answer gives `code_tokens` and no worker usage (its efficiency is 0). A malformed answer
    (`well_formed=False`) was not run: it scores only the format penalty, whatever else is passed.
    """
    if not well_formed:
        terms = dict(performance=0.0, complexity=0.0, efficiency=0.0, format=format_term(False))
    else:
        is_workflow = operator_calls is not None
        terms = dict(
            performance=performance_term(passed, total, status=status, all_pass_bonus=config.all_pass_bonus),
            complexity=complexity_term(operator_calls=operator_calls, code_tokens=code_tokens, config=config),
            efficiency=efficiency_term(
                worker_calls=worker_calls, worker_tokens=worker_tokens, latency_s=latency_s, config=config
            )
            if is_workflow
            else 0.0,
            format=format_term(True),
        )
    total_reward = (
        config.w_performance * terms["performance"]
        + config.w_complexity * terms["complexity"]
        + config.w_efficiency * terms["efficiency"]
        + config.w_format * terms["format"]
    )
    return RewardBreakdown(**terms, total=total_reward)


# ------------------------------------------------------------------------------- parsing the completion

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_FENCE_LANGUAGES = ("", "python", "py", "python3")


def strip_reasoning(text: str) -> str:
    """The answer part of an R1-style completion: what follows the last </think>. A completion that opened a
    <think> block and never closed it (cut off while thinking) has no answer."""
    if _THINK_CLOSE in text:
        return text.rsplit(_THINK_CLOSE, 1)[1]
    if _THINK_OPEN in text:
        return ""
    return text


def extract_code(text: str) -> str | None:
    """Python code of a plain-code completion: the last ```python (or unlabelled) fenced block of the answer,
    or the whole answer if it is itself Python code; None if there is none. Reasoning is ignored."""
    answer = strip_reasoning(text)
    blocks = [body for language, body in _FENCE.findall(answer) if language.lower() in _PYTHON_FENCE_LANGUAGES]
    if blocks:
        return blocks[-1].strip("\n") or None
    stripped = answer.strip()
    return stripped if _is_python_code(stripped) else None


def _is_python_code(text: str) -> bool:
    """Parses, and is more than bare expressions (a lone word of prose parses as a Name)."""
    try:
        module = ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return any(not isinstance(node, ast.Expr) for node in module.body)


def count_operator_calls(graph_source: str) -> int:
    """Static size of a workflow: the call sites `self.<name>(...)` in its classes' methods other than
    __init__ (operator and worker-LLM calls; a call inside a loop counts once - the run-time count is the
    efficiency term's business)."""
    try:
        module = ast.parse(graph_source)
    except SyntaxError as err:
        raise ValueError(f"workflow source does not parse: {err}") from err
    count = 0
    for cls in (node for node in ast.walk(module) if isinstance(node, ast.ClassDef)):
        for method in cls.body:
            if not isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef) or method.name == "__init__":
                continue
            count += sum(
                1
                for node in ast.walk(method)
                if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "self"
            )
    return count


# ---------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
