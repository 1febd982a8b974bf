"""The operator grammar the search teacher walks and the fixed baselines live in: a workflow as four choices.

A `WorkflowSpec` is (generation instruction, an analysis call or not, how many candidates, a Test step or not);
`render` writes it as the real `<graph>` and `<prompt>` that POST /workflow/run executes, built from the operators
sandbox_service serves (Custom, CustomCodeGenerate, ScEnsemble, Test). The root of the grammar, `WorkflowSpec()`,
renders FlowReasoner's seed workflow (one CustomCodeGenerate call), so every design of the search is the seed
changed step by step. `spec_of` reads a rendered design back, which is how the teacher knows what it is refining.

The graph the spec renders, in order: [Custom analysis] -> CustomCodeGenerate (once, or `samples` times at once,
then ScEnsemble picks one) -> [Test, which runs the public tests and asks the worker to repair, up to 3 times].
Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import functools

# The generation instructions a design chooses among. "direct" is the seed's; the others ask for one kind of
# thinking before the code (CustomCodeGenerate extracts the function from whatever the worker writes around it).
_CODE_RULES = (
    "Keep the function name and signature exactly\nas given, include every import it needs, and reply with the "
    "code in one ```python block."
)
STRATEGIES: dict[str, str] = {
    "direct": f"Write a complete, correct Python solution to the problem below. {_CODE_RULES}",
    "step_by_step": "Think step by step: explain in a few sentences how to solve the problem below, then write a\n"
    f"complete, correct Python solution. {_CODE_RULES}",
    "plan_first": "First write a short numbered plan of the algorithm for the problem below, then implement the "
    f"plan as a\ncomplete, correct Python solution. {_CODE_RULES}",
    "edge_cases": "First list the edge cases the function below must handle (empty inputs, zero, negative "
    "numbers,\nduplicates, a single element), then write a complete, correct Python solution that handles each of "
    f"them. {_CODE_RULES}",
    "restate_examples": "First restate every example and test in the problem below as input -> expected output, "
    "then write a\ncomplete, correct Python solution that reproduces each of them. "
    f"{_CODE_RULES}",
}
STRATEGY_NAMES: dict[str, str] = {  # how reasoning and descriptions name them
    "direct": "the direct instruction",
    "step_by_step": "the think-step-by-step instruction",
    "plan_first": "the plan-first instruction",
    "edge_cases": "the handle-edge-cases instruction",
    "restate_examples": "the restate-the-examples instruction",
}
ANALYSIS_PROMPT = (
    "Read the coding problem below. Do not write code. In a few short lines, say what the function must return,\n"
    "the algorithm to use, and the edge cases it must handle."
)
MAX_SAMPLES = 26  # ScEnsemble names the candidates A..Z


@dataclasses.dataclass(frozen=True)
class WorkflowSpec:
    strategy: str = "direct"  # a key of STRATEGIES
    analysis: bool = False  # a Custom call analyses the problem first; its notes go to code generation
    samples: int = 1  # candidates generated at once; more than 1 adds ScEnsemble to pick one
    test: bool = False  # a Test step runs the public tests and repairs the solution

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; known: {sorted(STRATEGIES)}")
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise ValueError(f"samples must be in [1, {MAX_SAMPLES}] (ScEnsemble's letters), got {self.samples}")

    @property
    def call_sites(self) -> int:
        """Operator call sites in the graph (what the reward's complexity term and the prompt's limit count)."""
        return int(self.analysis) + 1 + int(self.samples > 1) + int(self.test)

    @property
    def operator_calls(self) -> int:
        """Operator calls of one run (what budgets.max_operator_calls counts)."""
        return int(self.analysis) + self.samples + int(self.samples > 1) + int(self.test)

    def describe(self) -> str:
        """The design in a few words, e.g. 'analysis, then 3 candidates (plan-first instruction) + ScEnsemble'."""
        steps = ["a Custom analysis call"] if self.analysis else []
        generation = STRATEGY_NAMES[self.strategy].removeprefix("the ")
        if self.samples > 1:
            steps.append(f"{self.samples} CustomCodeGenerate candidates ({generation}) picked by ScEnsemble")
        else:
            steps.append(f"one CustomCodeGenerate call ({generation})")
        if self.test:
            steps.append("a Test-and-repair step")
        return ", then ".join(steps)


def render(spec: WorkflowSpec) -> tuple[str, str]:
    """The spec's (graph, prompt), exactly as /workflow/run takes them."""
    init = ["self.name = name", "self.dataset = dataset", "self.llm = create_llm_instance(llm_config)"]
    body: list[str] = []
    source = "problem"
    if spec.analysis:
        init.append("self.custom = operator.Custom(self.llm)")
        body += [
            "analysis = await self.custom(input=problem, instruction=prompt_custom.ANALYSIS_PROMPT)",
            'notes = problem + "\\n\\nNotes from an analysis of the problem:\\n" + analysis["response"]',
        ]
        source = "notes"
    init.append("self.custom_code_generate = operator.CustomCodeGenerate(self.llm)")
    if spec.samples == 1:
        body += [
            "solution = await self.custom_code_generate(",
            f"    problem={source}, entry_point=entry_point, instruction=prompt_custom.CODE_GENERATE_PROMPT",
            ")",
        ]
    else:
        # different instructions per candidate: the worker calls of one run share its sampling seed
        init.append("self.sc_ensemble = operator.ScEnsemble(self.llm)")
        body += [
            "candidates = await asyncio.gather(",
            "    *(",
            "        self.custom_code_generate(",
            f"            problem={source},",
            "            entry_point=entry_point,",
            "            instruction=prompt_custom.CODE_GENERATE_PROMPT",
            f'            + f"(Candidate {{i + 1}} of {spec.samples}: solve it your own way.)\\n",',
            "        )",
            f"        for i in range({spec.samples})",
            "    )",
            ")",
            'solution = await self.sc_ensemble(solutions=[c["response"] for c in candidates], problem=problem)',
        ]
    result = 'solution["response"]'
    if spec.test:
        init.append("self.test = operator.Test(self.llm)")
        body.append(f"checked = await self.test(problem=problem, solution={result}, entry_point=entry_point)")
        result = 'checked["solution"]'
    body.append(f'return {result}, self.llm.get_usage_summary()["total_cost"]')
    graph = (
        ("import asyncio\n\n\n" if spec.samples > 1 else "")
        + "class Workflow:\n    def __init__(self, name: str, llm_config, dataset: DatasetType) -> None:\n"
        + "".join(f"        {line}\n" for line in init)
        + "\n    async def __call__(self, problem: str, entry_point: str):\n"
        + "".join(f"        {line}\n" for line in body)
    )
    prompt = _constant("CODE_GENERATE_PROMPT", STRATEGIES[spec.strategy])
    if spec.analysis:
        prompt = _constant("ANALYSIS_PROMPT", ANALYSIS_PROMPT) + "\n" + prompt
    return graph, prompt


def _constant(name: str, text: str) -> str:
    return f'{name} = """\n{text}\n"""\n'


@functools.cache
def _rendered() -> dict[tuple[str, str], WorkflowSpec]:
    specs = [
        WorkflowSpec(strategy, analysis, samples, test)
        for strategy in STRATEGIES
        for analysis in (False, True)
        for samples in range(1, MAX_SAMPLES + 1)
        for test in (False, True)
    ]
    return {render(spec): spec for spec in specs}


def spec_of(graph: str, prompt: str) -> WorkflowSpec | None:
    """The spec that renders exactly this design, None for a design from outside the grammar."""
    return _rendered().get((graph, prompt))
