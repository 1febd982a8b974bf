"""The meta-agent's prompt and the parsing of its answers (fr_jax/flow/prompt.py), on reasoning-model outputs."""

import pytest

from fr_jax.flow import SEED_GRAPH, SEED_PROMPT, Experience, ParentDesign, build_design_prompt, parse_design
from sandbox_service.operators import OPERATORS, operators_text

QUERY = 'def add(a: int, b: int) -> int:\n    """Return a + b. {not a placeholder}"""\n'

GRAPH_TWO_CALLS = """class Workflow:
    def __init__(self, name: str, llm_config, dataset: DatasetType) -> None:
        self.llm = create_llm_instance(llm_config)
        self.custom_code_generate = operator.CustomCodeGenerate(self.llm)
        self.test = operator.Test(self.llm)

    async def __call__(self, problem: str, entry_point: str):
        code = await self.custom_code_generate(problem=problem, entry_point=entry_point,
                                               instruction=prompt_custom.GEN_PROMPT)
        checked = await self.test(problem=problem, solution=code["response"], entry_point=entry_point)
        return checked["solution"], self.llm.get_usage_summary()["total_cost"]
"""
PROMPT_ONE = 'GEN_PROMPT = """Write the function. Use ```python fences."""\n'


def answer(graph: str = GRAPH_TWO_CALLS, prompt: str = PROMPT_ONE, modification: str = "Add a Test step.") -> str:
    return f"<modification>{modification}</modification>\n<graph>\n{graph}</graph>\n<prompt>\n{prompt}</prompt>"


# ------------------------------------------------------------------------------------------------ the prompt


def test_fresh_prompt_holds_query_operators_format_and_rules():
    text = build_design_prompt(QUERY, operators_text())
    assert QUERY.strip() in text  # braces in the query are kept verbatim, not treated as a format field
    for name in OPERATORS:  # the descriptions generated from the library itself
        assert f"{name}(" in text
    for tag in ("<modification>", "<graph>", "<prompt>"):
        assert tag in text
    assert "should not exceed 10" in text and "Never return None" in text
    assert "Write the first workflow" in text and "The current workflow" not in text


def test_refinement_prompt_holds_parent_score_and_experience():
    parent = ParentDesign(SEED_GRAPH, SEED_PROMPT, score=0.5)
    experience = [Experience("Add a Test step.", 0.5, 0.75), Experience("Ensemble of 3 generations.", 0.5, 0.25)]
    text = build_design_prompt(QUERY, operators_text(), parent=parent, experience=experience, max_operator_calls=6)
    assert "scored 0.500" in text
    assert SEED_GRAPH.strip() in text and SEED_PROMPT.strip() in text
    assert '"Add a Test step." took the score from 0.500 to 0.750' in text
    assert '"Ensemble of 3 generations." took the score from 0.500 to 0.250' in text
    assert "should not exceed 6" in text and "only one detail" in text
    assert "Its validation runs" not in text  # no feedback given, none invented
    fed = ParentDesign(SEED_GRAPH, SEED_PROMPT, 0.5, "public pass rate 0.500 over 2 runs (0.000, 1.000)")
    text = build_design_prompt(QUERY, operators_text(), parent=fed, experience=experience)
    assert "</prompt>\nIts validation runs: public pass rate 0.500 over 2 runs (0.000, 1.000).\n\nWhat earlier" in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(query="  "), "query is empty"),
        (dict(operator_descriptions=""), "operator_descriptions is empty"),
        (dict(parent=ParentDesign("g", "", 1.5)), "parent.score"),
        (dict(parent=ParentDesign("g", "", float("nan"))), "parent.score"),
        (dict(experience=[Experience("m", 0.1, 0.2)]), "parent is None"),
        (dict(parent=ParentDesign("g", "", 0.5), experience=[Experience("m", 0.1, -0.2)]), r"experience\[0\].after"),
        (dict(max_operator_calls=0), "max_operator_calls"),
    ],
)
def test_prompt_refuses_bad_input_by_name(kwargs, message):
    args = dict(query=QUERY, operator_descriptions=operators_text()) | kwargs
    with pytest.raises(ValueError, match=message):
        build_design_prompt(args.pop("query"), args.pop("operator_descriptions"), **args)


# ------------------------------------------------------------------------------------------------ parsing


def test_seed_design_parses():
    parsed = parse_design(answer(SEED_GRAPH, SEED_PROMPT, "seed"))
    assert parsed.ok and parsed.warnings == ()
    assert parsed.graph == SEED_GRAPH and parsed.prompt == SEED_PROMPT


def test_tags_drafted_inside_think_are_ignored():
    # R1 template: the generation prompt already opened <think>, so the completion only closes it.
    draft = "Let me sketch it.\n<graph>\nclass Workflow:\n    pass\n</graph>\nNo - it needs a Test.\n"
    parsed = parse_design(draft + "</think>\n\n" + answer())
    assert parsed.ok, parsed.error
    assert parsed.graph == GRAPH_TWO_CALLS and parsed.modification == "Add a Test step."
    full_block = parse_design("<think>\n" + draft + "</think>\n" + answer())
    assert full_block.ok and full_block.graph == GRAPH_TWO_CALLS


def test_answer_cut_off_inside_think_is_a_format_failure():
    parsed = parse_design("<think>\nI will use <graph>class Workflow: ...</graph> and then")
    assert not parsed.ok and "unclosed <think>" in parsed.error


def test_code_fences_inside_tags_are_unwrapped_but_fences_in_prompt_strings_stay():
    text = (
        f"</think><modification>m</modification><graph>\n```python\n{GRAPH_TWO_CALLS}```\n</graph>"
        f"<prompt>```python\n{PROMPT_ONE}```</prompt>"
    )
    parsed = parse_design(text)
    assert parsed.ok, parsed.error
    assert parsed.graph == GRAPH_TWO_CALLS and parsed.prompt == PROMPT_ONE  # the ```python inside the string kept


def test_two_graphs_take_the_last_complete_one_and_flag_it():
    first = GRAPH_TWO_CALLS.replace("self.test(", "self.test(test_loop=1, ")
    text = f"</think><graph>\n{first}</graph>\nOn second thought:\n" + answer()
    parsed = parse_design(text)
    assert parsed.ok and parsed.graph == GRAPH_TWO_CALLS
    assert any("2 <graph> blocks" in w for w in parsed.warnings)
    truncated = parse_design(answer() + "\n<graph>\nclass Workflow:\n    def __init__(self")
    assert truncated.ok and truncated.graph == GRAPH_TWO_CALLS
    assert any("unterminated <graph>" in w for w in truncated.warnings)


@pytest.mark.parametrize(
    "text, error",
    [
        ("</think>I think a single generate call is enough.", "no complete <graph>"),
        ("<modification>m</modification><graph>\n" + GRAPH_TWO_CALLS + "</graph>", "no complete <prompt>"),
        (
            answer(graph="class Workflow:\n    async def __call__(self, problem, entry_point)\n        return 1\n"),
            "<graph> is not valid Python: expected ':' (line 2)",
        ),
        (answer(graph="def solve(problem):\n    return problem\n"), "does not define class Workflow"),
        (
            answer(graph="class Workflow:\n    def __call__(self, problem, entry_point):\n        return ''\n"),
            "no `async def __call__",
        ),
        (answer(prompt="GEN = 'a'\nimport os\n"), '<prompt> line 2: only `NAME = "..."` string assignments'),
        (answer(prompt='OTHER_PROMPT = "x"\n'), "uses prompt_custom.GEN_PROMPT, which <prompt> does not define"),
    ],
)
def test_bad_answers_are_format_failures_not_crashes(text, error):
    parsed = parse_design(text)
    assert not parsed.ok
    assert error in parsed.error


def test_a_tag_mentioned_in_the_modification_does_not_swallow_the_real_one():
    parsed = parse_design(answer(modification="Wrap the <graph> call in a Test step."))
    assert parsed.ok, parsed.error
    assert parsed.graph == GRAPH_TWO_CALLS and parsed.modification == "Wrap the <graph> call in a Test step."


def test_missing_modification_is_only_a_warning_and_empty_prompt_is_fine():
    graph = GRAPH_TWO_CALLS.replace("prompt_custom.GEN_PROMPT", '""')
    parsed = parse_design(f"<graph>{graph}</graph>\n<prompt></prompt>")
    assert parsed.ok and parsed.prompt == "" and parsed.modification == ""
    assert parsed.warnings == ("no <modification> (or it is empty)",)
