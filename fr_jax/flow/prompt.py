"""The meta-agent's query-level prompt and the parsing of its answer (pure: no I/O, no model, no execution).

The policy reads one coding query and writes a workflow in three tags, as in FlowReasoner:

    <modification>one line on what changed</modification>
    <graph>class Workflow: ...</graph>            # Python: composes operators that call a worker LLM
    <prompt>NAME_PROMPT = \"\"\"...\"\"\"</prompt>     # string constants the graph reads as prompt_custom.NAME

The operator descriptions are not written here: sandbox_service generates them from its operator library
(GET /workflow/operators, field `text`), so what the policy is told always matches what runs.

Parsing copes with reasoning models: everything up to the last </think> is reasoning (drafts of tags in there
are ignored) and an unclosed <think> means no answer. A missing or malformed tag yields a ParsedDesign whose
`error` says what is wrong, never an exception: the reward scores it as a format failure.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import textwrap
from collections.abc import Sequence

from fr_jax.flow.grammar import WorkflowSpec, render
from fr_jax.rl.reward import strip_reasoning

MAX_OPERATOR_CALLS = 10  # FlowReasoner: "the graph complexity should not exceed 10"

# Names the jailed runtime defines for every graph (sandbox_service/workflow_runtime.py), FlowReasoner's
# auto-imports: the prompt promises exactly these.
PROVIDED_NAMES = ("operator", "prompt_custom", "create_llm_instance", "DatasetType")

SEED_MODIFICATION = "Seed workflow: a single CustomCodeGenerate call."
# FlowReasoner's round 1: the root of the operator grammar (fr_jax.flow.grammar), one CustomCodeGenerate call.
SEED_GRAPH, SEED_PROMPT = render(WorkflowSpec())

# The query comes last: every query's prompt then shares the whole instruction as a prefix, which a prefix cache
# (the embedded engine's, SGLang's) can reuse across queries.
_INSTRUCTIONS = """\
You design a workflow that solves ONE coding problem with a worker LLM. It runs on the problem's public tests, \
then is scored on hidden tests, so it must return complete Python code that defines the function the problem \
asks for (its name is passed to the workflow as `entry_point`).

Operators. Build each in `__init__` from the worker, e.g. `self.custom = operator.Custom(self.llm)`, and await \
it in `__call__` with keyword arguments:
{operators}

Answer in three tags:
<modification>one line: what this design does differently</modification>
<graph>
`class Workflow` with `def __init__(self, name: str, llm_config, dataset: DatasetType)`, which sets \
`self.llm = create_llm_instance(llm_config)` and the operators, and \
`async def __call__(self, problem: str, entry_point: str)`, which returns `(solution, cost)`: the solution's \
code and `self.llm.get_usage_summary()["total_cost"]`.
</graph>
<prompt>
String constants the graph reads as `prompt_custom.NAME`, one `NAME = \"\"\"...\"\"\"` each; \
write an empty <prompt></prompt> if the graph uses none.
</prompt>

Rules:
- {provided} are already defined in the graph; import anything else you use yourself.
- The graph complexity should not exceed {max_calls}: at most {max_calls} operator calls per run.
- Custom puts the instruction before the input and supports no placeholders: build the input string in the graph.
- Every `prompt_custom.NAME` the graph reads must be assigned in <prompt>, and nothing else.
- Never return None: every path of `__call__` returns a solution.

<query>
{query}
</query>
"""

_REFINE = """
The current workflow, which scored {score:.3f} on the public tests (1.0 means every test passes):
<graph>
{graph}
</graph>
<prompt>
{prompt}
</prompt>
{feedback}{experience}
Improve it. Change only one detail per round (a few lines at most), name that change in <modification>, and \
do not repeat a modification that did not raise the score.
"""

_FRESH = "\nWrite the first workflow for this problem.\n"


@dataclasses.dataclass(frozen=True)
class Experience:
    """One earlier refinement of the same parent: `modification` took the score from `before` to `after`."""

    modification: str
    before: float
    after: float


@dataclasses.dataclass(frozen=True)
class ParentDesign:
    """The design a refinement round starts from, with its score on the public tests and what its validation runs
    showed (fr_jax.flow.feedback.feedback_text; '' for none)."""

    graph: str
    prompt: str
    score: float
    feedback: str = ""


def build_design_prompt(
    query: str,
    operator_descriptions: str,
    *,
    parent: ParentDesign | None = None,
    experience: Sequence[Experience] = (),
    max_operator_calls: int = MAX_OPERATOR_CALLS,
) -> str:
    """The meta-agent's user message for one query: a fresh design (`parent=None`) or a refinement of `parent`
    informed by what earlier modifications did. R1-distilled policies take every instruction in the user turn."""
    if not query.strip():
        raise ValueError("query is empty")
    if not operator_descriptions.strip():
        raise ValueError("operator_descriptions is empty: fetch them from sandbox_service GET /workflow/operators")
    if max_operator_calls < 1:
        raise ValueError(f"max_operator_calls must be >= 1, got {max_operator_calls}")
    if experience and parent is None:
        raise ValueError("experience describes refinements of a parent design, but parent is None")
    text = _INSTRUCTIONS.format(
        query=query.strip(),
        operators=operator_descriptions.strip(),
        provided=", ".join(f"`{name}`" for name in PROVIDED_NAMES),
        max_calls=max_operator_calls,
    )
    if parent is None:
        return text + _FRESH
    _check_score("parent.score", parent.score)
    return text + _REFINE.format(
        score=parent.score,
        graph=parent.graph.strip("\n"),
        prompt=parent.prompt.strip("\n"),
        feedback=f"Its validation runs: {parent.feedback.strip()}.\n" if parent.feedback.strip() else "",
        experience=format_experience(experience),
    )


def format_experience(experience: Sequence[Experience]) -> str:
    """The experience list as the prompt shows it ('' when empty)."""
    if not experience:
        return ""
    lines = []
    for i, item in enumerate(experience):
        _check_score(f"experience[{i}].before", item.before)
        _check_score(f"experience[{i}].after", item.after)
        lines.append(
            f'- modification "{item.modification.strip()}" took the score from {item.before:.3f} to {item.after:.3f}'
        )
    return "\nWhat earlier modifications of this workflow did:\n" + "\n".join(lines) + "\n"


def _check_score(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a score in [0, 1], got {value!r}")


def design_text(modification: str, graph: str, prompt: str) -> str:
    """A design in the three tags the prompt asks for (parse_design reads it back to the same graph and prompt)."""
    return (
        f"<modification>{modification.strip()}</modification>\n<graph>\n{graph.strip(chr(10))}\n</graph>\n"
        f"<prompt>\n{prompt.strip(chr(10))}\n</prompt>"
    )


# --------------------------------------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class ParsedDesign:
    """What the meta-agent wrote. `error` is None exactly when `graph` and `prompt` can be sent to
    /workflow/run; `warnings` flags answers that were usable but not clean (e.g. two <graph> blocks)."""

    modification: str
    graph: str
    prompt: str
    error: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_design(completion: str) -> ParsedDesign:
    """Read <modification>, <graph> and <prompt> from a completion (reasoning stripped first) and check that
    the graph and prompt are Python of the expected shape. Never raises on bad model output."""
    answer = strip_reasoning(completion)
    warnings: list[str] = []
    if answer == "" and "<think>" in completion:
        return _failed("the completion ended inside an unclosed <think> block: there is no answer", warnings)
    modification = _read_tag(answer, "modification", warnings)
    graph = _read_tag(answer, "graph", warnings)
    prompt = _read_tag(answer, "prompt", warnings)
    if graph is None:
        return _failed("no complete <graph>...</graph> in the answer", warnings, modification or "")
    if prompt is None:
        return _failed(
            "no complete <prompt>...</prompt> in the answer (write <prompt></prompt> if the graph uses "
            "no prompt constants)",
            warnings,
            modification or "",
            graph,
        )
    if modification is None or not modification.strip():
        warnings.append("no <modification> (or it is empty)")
    error = check_graph(graph) or check_prompt(prompt) or _check_prompt_names(graph, prompt)
    return ParsedDesign((modification or "").strip(), graph, prompt, error, tuple(warnings))


def _failed(error: str, warnings: list[str], modification: str = "", graph: str = "") -> ParsedDesign:
    return ParsedDesign(modification.strip(), graph, "", error, tuple(warnings))


def _read_tag(answer: str, tag: str, warnings: list[str]) -> str | None:
    """The last complete <tag>...</tag> (code fences inside are unwrapped); None if there is none. A body never
    holds another <tag>, so a stray mention of <tag> (in the modification, say) does not swallow the real one."""
    bodies = re.findall(rf"<{tag}>((?:(?!<{tag}>).)*?)</{tag}>", answer, re.DOTALL)
    if answer.count(f"<{tag}>") > len(bodies):
        warnings.append(f"an unterminated <{tag}> was ignored")
    if not bodies:
        return None
    if len(bodies) > 1:
        warnings.append(f"{len(bodies)} <{tag}> blocks: used the last complete one")
    body = textwrap.dedent(_unfence(bodies[-1])).strip("\n").rstrip()
    return body + "\n" if body else ""


_FENCE = "```"


def _unfence(body: str) -> str:
    """A tag body wrapped in a code fence, unwrapped (fences inside the code, e.g. in a prompt string, stay)."""
    stripped = body.strip()
    if not stripped.startswith(_FENCE):
        return body
    inner = stripped.split("\n", 1)[1] if "\n" in stripped else ""  # drop the ```python line
    return inner.removesuffix(_FENCE)  # an unclosed fence (cut-off answer) keeps what is there


def check_graph(graph: str) -> str | None:
    """Why `graph` cannot be a workflow (None if it can): it must parse and define class Workflow with an
    async __call__."""
    module, error = _parse_python(graph, "<graph>")
    if module is None:
        return error
    workflow = next((node for node in module.body if isinstance(node, ast.ClassDef) and node.name == "Workflow"), None)
    if workflow is None:
        return "<graph> does not define class Workflow at top level"
    call = next(
        (
            node
            for node in workflow.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "__call__"
        ),
        None,
    )
    if not isinstance(call, ast.AsyncFunctionDef):
        return "class Workflow in <graph> has no `async def __call__(self, problem, entry_point)`"
    return None


def check_prompt(prompt: str) -> str | None:
    """Why `prompt` is not a module of string constants (None if it is; an empty prompt is fine)."""
    module, error = _parse_python(prompt, "<prompt>")
    if module is None:
        return error
    for node in module.body:
        is_docstring = isinstance(node, ast.Expr) and _is_str(node.value)
        is_assignment = (
            isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets) and _is_str(node.value)
        )
        if not (is_docstring or is_assignment):
            return f'<prompt> line {node.lineno}: only `NAME = "..."` string assignments are allowed'
    return None


def _check_prompt_names(graph: str, prompt: str) -> str | None:
    """A graph reading prompt_custom.X that <prompt> does not define would fail at run time on every query."""
    defined = {target.id for node in ast.parse(prompt).body if isinstance(node, ast.Assign) for target in node.targets}
    used = {
        node.attr
        for node in ast.walk(ast.parse(graph))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "prompt_custom"
    }
    missing = sorted(used - defined)
    if missing:
        return f"<graph> uses prompt_custom.{', prompt_custom.'.join(missing)}, which <prompt> does not define"
    return None


def _parse_python(source: str, where: str) -> tuple[ast.Module | None, str | None]:
    try:
        return ast.parse(source), None
    except SyntaxError as err:
        return None, f"{where} is not valid Python: {err.msg} (line {err.lineno})"
    except (ValueError, RecursionError, MemoryError) as err:  # null bytes, absurd nesting
        return None, f"{where} is not valid Python: {type(err).__name__}: {err}"


def _is_str(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def operator_outline(graph: str) -> str:
    """The operators a graph calls, in the order of its call sites ('Custom -> CustomCodeGenerate -> Test'), read
    from `self.x = operator.Name(...)` in __init__ and `self.x(...)` elsewhere; '' for a graph that does not parse."""
    module, _ = _parse_python(graph, "<graph>")
    if module is None:
        return ""
    names: dict[str, str] = {}
    calls: list[ast.Call] = []
    for cls in (node for node in module.body if isinstance(node, ast.ClassDef)):
        for node in ast.walk(cls):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute)
                and isinstance(node.value.func.value, ast.Name)
                and node.value.func.value.id == "operator"
            ):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                        names[target.attr] = node.value.func.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "self"
            ):
                calls.append(node)
    ordered = sorted(calls, key=lambda call: (call.lineno, call.col_offset))
    return " -> ".join(names[call.func.attr] for call in ordered if call.func.attr in names)
