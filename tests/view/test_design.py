"""The design graph read from a <graph> with ast: operator calls as nodes, data flow along names as edges."""

from fr_jax.flow.prompt import SEED_GRAPH
from fr_jax.view.design import design_flow

ENSEMBLE = """class Workflow:
    def __init__(self, name, llm_config, dataset):
        self.llm = create_llm_instance(llm_config)
        self.generate = operator.CustomCodeGenerate(self.llm)
        self.pick = operator.ScEnsemble(self.llm)
        self.test = operator.Test(self.llm)
        self.review = operator.Custom(self.llm)

    async def __call__(self, problem, entry_point):
        drafts = []
        for _ in range(3):
            draft = await self.generate(problem=problem, entry_point=entry_point, instruction=prompt_custom.GEN)
            drafts.append(draft["response"])
        best = await self.pick(solutions=drafts, problem=problem)
        code = best["response"]
        checked = await self.test(problem=problem, solution=code, entry_point=entry_point)
        if not checked["result"]:
            note = await self.review(input=code, instruction="Why does it fail?")
        return checked["solution"], self.llm.get_usage_summary()["total_cost"]
"""


def nodes_and_edges(flow):
    labels = {n["id"]: n["label"] for n in flow["nodes"]}
    return [(n["label"], n["operator"], n["loop"]) for n in flow["nodes"]], {
        (labels[a], labels[b], arg) for a, b, arg in flow["edges"]
    }


def test_the_seed_design_is_one_call_between_the_query_and_the_answer():
    nodes, edges = nodes_and_edges(design_flow(SEED_GRAPH))
    assert nodes == [
        ("query", None, False),
        ("custom_code_generate", "CustomCodeGenerate", False),
        ("return", None, False),
    ]
    assert edges == {
        ("query", "custom_code_generate", "problem"),
        ("query", "custom_code_generate", "entry_point"),
        ("custom_code_generate", "return", ""),
    }


def test_data_flows_through_loops_lists_and_plain_assignments():
    nodes, edges = nodes_and_edges(design_flow(ENSEMBLE))
    assert nodes == [
        ("query", None, False),
        ("generate", "CustomCodeGenerate", True),  # called in a loop
        ("pick", "ScEnsemble", False),
        ("test", "Test", False),
        ("review", "Custom", False),
        ("return", None, False),
    ]
    assert ("generate", "pick", "solutions") in edges  # through drafts.append(draft["response"])
    assert ("pick", "test", "solution") in edges  # through code = best["response"]
    assert ("pick", "review", "input") in edges
    assert ("test", "return", "") in edges and ("review", "return", "") not in edges  # its note is never returned
    assert ("query", "test", "problem") in edges and ("query", "pick", "problem") in edges


def test_what_cannot_be_read_gives_no_graph():
    assert design_flow(None) is None and design_flow("") is None
    assert design_flow("class Workflow:\n    def __call__(self") is None  # does not parse
    assert design_flow("def solve():\n    return 1\n") is None  # no class Workflow
    assert (
        design_flow("class Workflow:\n    async def __call__(self, problem, entry_point):\n        return 1\n") is None
    )
