"""POST /workflow/run end to end: a real sandbox_service (the jail) and the real fr_jax.serve worker (SmolLM2).

Hand-written workflows return known-good code assembled in the graph (the worker's output rides along as
comments or is checked structurally), so pass rates are exact whatever the small worker writes, while call
counts, token counts and traces come from real worker calls. Hostile graphs each end with a clear failure kind.
"""

import asyncio
import json

import httpx
import pytest

from fr_jax.flow import SEED_GRAPH, SEED_PROMPT
from fr_jax.sandbox.client import AssertTests, HumanEvalTests, SandboxClient
from sandbox_service.operators import (
    OPERATORS,
    OperatorError,
    bind_arguments,
    chosen_solution,
    describe_operators,
    extract_code,
    operators_text,
)
from tests.support.sandbox import WORKFLOW_SECRET as SECRET

MAX_TOKENS = 32
KNOWN_GOOD = "def add(a, b):\n    return a + b\n"
KNOWN_BAD = "def add(a, b):\n    return a - b\n"
PUBLIC = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
HIDDEN_CHECK = (
    "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    "    assert candidate(2, 2) == 5\n"
)  # the last one is wrong on purpose: per-test feedback must show it
PROBLEM = {
    "text": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
    "entry_point": "add",
    "public_tests": {"kind": "asserts", "test_list": PUBLIC},
    "hidden_tests": {"kind": "humaneval", "test": HIDDEN_CHECK, "entry_point": "add"},
}
# Prompts of similar length share the worker's compiled prompt-length bucket (fewer JAX compiles).
EXPLAIN = "Explain how to solve this problem, then write the code.\n"
HEADER = (
    f"KNOWN_GOOD = {KNOWN_GOOD!r}\nKNOWN_BAD = {KNOWN_BAD!r}\nEXPLAIN = {EXPLAIN!r}\n\n\ndef comment(text):\n"
    "    return ''.join('# ' + line + '\\n' for line in text.splitlines())\n\n\n"
)


@pytest.fixture(scope="module")
def worker(workflow_worker):
    return workflow_worker


@pytest.fixture(scope="module")
def service(workflow_sandbox):
    with httpx.Client(base_url=workflow_sandbox.url, timeout=300) as client:
        yield client


def run(service, graph: str, prompt: str = "", *, worker: str = "local", budgets: dict | None = None) -> dict:
    request = {
        "graph": graph,
        "prompt": prompt,
        "problem": PROBLEM,
        "worker": worker,
        "sampling": {"max_tokens": MAX_TOKENS},
        "budgets": budgets or {},
    }
    response = service.post("/workflow/run", json=request)
    assert response.status_code == 200, response.text[:3000]
    return response.json()


def workflow(body: str, operators: str = "self.generate = operator.CustomCodeGenerate(self.llm)") -> str:
    """A graph: the shared header, then class Workflow with `operators` built in __init__ and `body` as __call__."""
    return HEADER + (
        "class Workflow:\n"
        "    def __init__(self, name, llm_config, dataset):\n"
        "        self.llm = create_llm_instance(llm_config)\n"
        f"        {operators}\n\n"
        "    async def __call__(self, problem, entry_point):\n"
        + "".join(f"        {line}\n" for line in body.strip("\n").splitlines())
    )


def worker_calls(result: dict) -> list[dict]:
    return [call for record in result["trace"] for call in record["worker_calls"]]


def assert_usage_adds_up(result: dict) -> None:
    calls = worker_calls(result)
    assert result["worker"]["calls"] == len(calls)
    assert result["worker"]["prompt_tokens"] == sum(c["prompt_tokens"] for c in calls) > 0
    assert result["worker"]["completion_tokens"] == sum(c["completion_tokens"] for c in calls) > 0


def assert_scored_known_good(result: dict) -> None:
    assert result["status"] == "ok", result["failure"]
    assert result["solution"].startswith(KNOWN_GOOD)
    assert result["public_pass_rate"] == 1.0 and result["public"]["num_tests"] == 2
    hidden = result["hidden"]
    assert (hidden["num_tests"], hidden["num_passed"]) == (3, 2) and result["hidden_pass_rate"] == pytest.approx(2 / 3)
    assert [t["passed"] for t in hidden["tests"]] == [True, True, False]
    assert hidden["tests"][2]["name"] == "assert candidate(2, 2) == 5"
    assert hidden["tests"][2]["error_type"] == "AssertionError"


# ------------------------------------------------------------------------------- the operator library (pure)


def test_descriptions_come_from_the_signatures():
    described = {d["name"]: d for d in describe_operators()}
    assert list(described) == list(OPERATORS) == ["Custom", "CustomCodeGenerate", "ScEnsemble", "Test"]
    assert described["Test"]["signature"] == (
        "Test(problem: str, solution: str, entry_point: str, test_loop: int = 3) -> {result: bool, solution: str}"
    )
    assert described["ScEnsemble"]["signature"] == "ScEnsemble(solutions: list[str], problem: str) -> {response: str}"
    assert "self.sc_ensemble = operator.ScEnsemble(self.llm)" in described["ScEnsemble"]["usage"]
    assert all(d["signature"] in operators_text() and d["description"] in operators_text() for d in described.values())


@pytest.mark.parametrize(
    "name, args, kwargs, error",
    [
        ("Custom", [], {"input": "x"}, "missing a required argument: 'instruction'"),
        ("Custom", [], {"input": 1, "instruction": "x"}, "argument 'input' is invalid: Input should be a valid string"),
        (
            "Test",
            [],
            {"problem": "p", "solution": "s", "entry_point": "f", "test_loop": 11},
            "less than or equal to 10",
        ),
        ("Test", [], {"problem": "p", "solution": "s", "entry_point": "f", "test_loop": True}, "valid integer"),
        ("ScEnsemble", [[], "p"], {}, "at least 1 item"),
        ("Review", [], {}, "unknown operator 'Review'"),
    ],
)
def test_bad_operator_calls_are_refused_by_name(name, args, kwargs, error):
    with pytest.raises(OperatorError, match=error):
        bind_arguments(name, args, kwargs)


def test_positional_arguments_bind_like_keywords():
    assert bind_arguments("Test", ["p", "s", "f"], {}) == {
        "problem": "p",
        "solution": "s",
        "entry_point": "f",
        "test_loop": 3,
    }


REPLY = """<think>I could write def add(a, b): return b + a</think>Here you go:
```python
import math
from functools import reduce

SCALE = 1

def helper(x):
    return x * SCALE

@functools_like
def add(a, b):
    return helper(a) + b

def unused():
    return math.pi

print(add(1, 2))
assert add(1, 1) == 2
```
Hope it helps!"""


@pytest.mark.parametrize(
    "reply, expected",
    [
        (
            REPLY,
            "import math\n\nfrom functools import reduce\n\nSCALE = 1\n\ndef helper(x):\n    return x * SCALE\n\n"
            "@functools_like\ndef add(a, b):\n    return helper(a) + b\n",
        ),
        (
            "```\n\n```python\ndef add(a, b):\n    return a + b\n```",
            "def add(a, b):\n    return a + b\n",
        ),  # stray fence
        ("def add(a, b):\n    return a + b\nprint(add(2, 3))", "def add(a, b):\n    return a + b\n"),  # no fence
        ("```python\ndef sub(a, b):\n    return a - b\n```", "def sub(a, b):\n    return a - b"),  # no add: as is
        ("I cannot help with that.", "I cannot help with that."),
    ],
)
def test_extract_code(reply, expected):
    assert extract_code(reply, "add") == expected


@pytest.mark.parametrize(
    "reply, count, expected",
    [
        ("A and C agree. <solution_letter>C</solution_letter>", 3, 2),
        ("<think><solution_letter>A</solution_letter>?</think>Final: <solution_letter> b </solution_letter>", 3, 1),
        ("<solution_letter>D</solution_letter>", 3, None),  # not a candidate
        ("The answer is B.", 3, None),
    ],
)
def test_chosen_solution(reply, count, expected):
    assert chosen_solution(reply, count) == expected


# ------------------------------------------------------------------------------------------ well-behaved graphs


def test_single_generate_counts_match_what_the_worker_reported(service, worker):
    graph = workflow("""
draft = await self.generate(problem=problem, entry_point=entry_point, instruction=prompt_custom.GEN_PROMPT)
usage = self.llm.get_usage_summary()
tokens = f"# tokens {usage['prompt_tokens']} {usage['completion_tokens']}\\n"
return KNOWN_GOOD + comment(draft["response"]) + tokens, 0.0
""")
    result = run(service, graph, 'GEN_PROMPT = "Solve this in Python.\\n"\n')
    assert_scored_known_good(result)
    assert result["operator_calls"] == {"CustomCodeGenerate": 1} and result["num_operator_calls"] == 1
    assert result["test_runs"] == 0
    [record] = result["trace"]
    [call] = record["worker_calls"]
    assert record["index"] == 0 and record["arguments"]["instruction"] == "Solve this in Python.\n"
    assert call["prompt"].startswith("Solve this in Python.\n" + PROBLEM["text"])
    assert record["result"]["response"] == extract_code(call["reply"], "add")
    assert_usage_adds_up(result)
    # the graph saw the same counts through get_usage_summary()
    assert result["solution"].endswith(f"# tokens {call['prompt_tokens']} {call['completion_tokens']}\n")
    # the same request straight to the worker: same usage and (greedy) the same reply
    again = httpx.post(
        f"{worker.url}/v1/chat/completions",
        timeout=120,
        json={
            "model": "local",
            "messages": [{"role": "user", "content": call["prompt"]}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "top_p": 1.0,
        },
    ).json()
    assert again["usage"]["prompt_tokens"] == call["prompt_tokens"]
    assert again["usage"]["completion_tokens"] == call["completion_tokens"]
    assert again["choices"][0]["message"]["content"] == call["reply"]


def test_three_generations_then_sc_ensemble(service):
    graph = "import asyncio\n\n" + workflow(
        """
drafts = await asyncio.gather(*(self.generate(problem=problem, entry_point=entry_point, instruction=f"Attempt {i}. ")
                                for i in range(3)))
candidates = [draft["response"] for draft in drafts] + [KNOWN_GOOD]
chosen = await self.ensemble(solutions=candidates, problem=problem)
assert chosen["response"] in candidates
usage = self.llm.get_usage_summary()
return KNOWN_GOOD + comment(chosen["response"]) + f"# tokens {usage['prompt_tokens']} {usage['completion_tokens']}\\n"
""",
        "self.generate = operator.CustomCodeGenerate(self.llm)\n        self.ensemble = operator.ScEnsemble(self.llm)",
    )
    result = run(service, graph)
    assert_scored_known_good(result)
    assert result["operator_calls"] == {"CustomCodeGenerate": 3, "ScEnsemble": 1}
    generates, ensemble = result["trace"][:3], result["trace"][3]
    assert sorted(r["index"] for r in generates) == [0, 1, 2] and ensemble["index"] == 3
    # the three generations were in flight together (asyncio.gather in the jail -> concurrent service calls)
    assert max(r["started_s"] for r in generates) < min(r["started_s"] + r["duration_s"] for r in generates)
    assert ensemble["arguments"]["solutions"][:3] == [r["result"]["response"] for r in generates]
    assert ensemble["result"]["response"] in ensemble["arguments"]["solutions"]
    [call] = ensemble["worker_calls"]
    assert all(f"{letter}:\n" in call["prompt"] for letter in "ABCD") and "E:\n" not in call["prompt"]
    assert result["worker"]["calls"] == 4
    assert_usage_adds_up(result)
    # each concurrent call reported its own tokens back to the graph: the graph's total is the service's
    worker = result["worker"]
    assert result["solution"].endswith(f"# tokens {worker['prompt_tokens']} {worker['completion_tokens']}\n")


def test_generate_then_test_with_repair(service):
    graph = workflow(
        """
await self.generate(problem=problem, entry_point=entry_point, instruction="")
good = await self.test(problem=problem, solution=KNOWN_GOOD, entry_point=entry_point)
repaired = await self.test(problem=problem, solution=KNOWN_BAD, entry_point=entry_point, test_loop=2)
assert good == {"result": True, "solution": KNOWN_GOOD}, good
return KNOWN_GOOD + comment(repaired["solution"])
""",
        "self.generate = operator.CustomCodeGenerate(self.llm)\n        self.test = operator.Test(self.llm)",
    )
    result = run(service, graph)
    assert_scored_known_good(result)
    assert result["operator_calls"] == {"CustomCodeGenerate": 1, "Test": 2}
    _, good, repaired = result["trace"]
    assert [r["passed"] for r in good["test_runs"]] == [True] and good["worker_calls"] == []
    runs, repairs = repaired["test_runs"], repaired["worker_calls"]
    # a - b passes add(0, 0) == 0 only; the failure shown to the worker names the failing assert
    assert (runs[0]["num_tests"], runs[0]["num_passed"], runs[0]["passed"]) == (2, 1, False)
    assert runs[0]["failures"][0].startswith("assert add(1, 2) == 3: Failed (AssertionError")
    assert KNOWN_BAD in repairs[0]["prompt"] and "assert add(1, 2) == 3" in repairs[0]["prompt"]
    # AFlow's loop: test, repair while failing (at most test_loop times), and test the last repair
    if runs[-1]["passed"] and len(runs) <= 2:
        assert len(repairs) == len(runs) - 1
    else:
        assert (len(runs), len(repairs)) == (3, 2)
    assert repaired["result"]["result"] == runs[-1]["passed"]
    assert repaired["result"]["solution"] == extract_code(repairs[-1]["reply"], "add")
    assert result["test_runs"] == len(good["test_runs"]) + len(runs)
    assert result["worker"]["calls"] == 1 + len(repairs)
    assert_usage_adds_up(result)


UNITTEST_PUBLIC = """
import unittest

class TestCases(unittest.TestCase):
    def test_small(self):
        self.assertEqual(add(1, 2), 3)
"""
UNITTEST_HIDDEN = (
    UNITTEST_PUBLIC
    + """
    def test_zero(self):
        self.assertEqual(add(0, 0), 0)

    def test_wrong_on_purpose(self):
        self.assertEqual(add(2, 2), 5)
"""
)


def test_unittest_suites_for_the_test_operator_and_scoring(service):
    graph = workflow(
        """
verdict = await self.test(problem=problem, solution=KNOWN_BAD, entry_point=entry_point, test_loop=0)
assert verdict == {"result": False, "solution": KNOWN_BAD}, verdict
return KNOWN_GOOD
""",
        "self.test = operator.Test(self.llm)",
    )
    problem = {
        **PROBLEM,
        "public_tests": {"kind": "unittest", "test": UNITTEST_PUBLIC},
        "hidden_tests": {"kind": "unittest", "test": UNITTEST_HIDDEN},
    }
    response = service.post("/workflow/run", json={"graph": graph, "problem": problem, "worker": "local"})
    assert response.status_code == 200, response.text[:3000]
    result = response.json()
    assert result["status"] == "ok", result["failure"]
    (test_run,) = result["trace"][0]["test_runs"]
    assert (test_run["num_tests"], test_run["num_passed"]) == (1, 0)
    assert test_run["failures"] == ["test_small: Failed (AssertionError: -1 != 3)"]
    assert result["public_pass_rate"] == 1.0 and result["hidden_pass_rate"] == pytest.approx(2 / 3)
    assert [(t["name"], t["passed"]) for t in result["hidden"]["tests"]] == [
        ("test_small", True),
        ("test_wrong_on_purpose", False),
        ("test_zero", True),
    ]


def test_seed_workflow_runs_through_the_client(service):
    async def go():
        async with SandboxClient(str(service.base_url)) as client:
            described = await client.workflow_operators()
            result = await client.run_workflow(
                SEED_GRAPH,
                SEED_PROMPT,
                problem=PROBLEM["text"],
                entry_point="add",
                worker="local",
                public_tests=AssertTests(PUBLIC),
                hidden_tests=HumanEvalTests(HIDDEN_CHECK, "add"),
                max_tokens=MAX_TOKENS,
            )
            return described, result

    described, result = asyncio.run(go())
    assert described.text == operators_text() and [d["name"] for d in described.operators] == list(OPERATORS)
    assert result.ok, result.failure
    assert result.operator_calls == {"CustomCodeGenerate": 1} and result.num_operator_calls == 1
    [record] = result.trace
    [call] = record.worker_calls
    assert record.operator == "CustomCodeGenerate" and call.prompt.startswith(SEED_PROMPT.split('"""')[1])
    assert (result.worker.calls, result.worker.prompt_tokens) == (1, call.prompt_tokens)
    assert result.solution == record.result["response"]
    assert len(result.public.tests) == 2 and len(result.hidden.tests) == 3
    assert result.hidden_pass_rate == sum(t.passed for t in result.hidden.tests) / 3


# ---------------------------------------------------------------------------------------------- failure kinds


@pytest.mark.parametrize(
    "graph, prompt, kind, detail",
    [
        (
            "class Workflow:\n    async def __call__(self, problem, entry_point)\n        return ''\n",
            "",
            "graph_syntax_error",
            "<graph>: SyntaxError",
        ),
        (workflow("return KNOWN_GOOD"), "X = (\n", "graph_syntax_error", "<prompt>: SyntaxError"),
        ("def solve(problem):\n    return problem\n", "", "graph_syntax_error", "defines no class Workflow"),
        (workflow("return None, 0.0"), "", "no_solution", "returned None"),
        (workflow("return 42"), "", "workflow_exception", "returned a int"),
        (workflow("raise ValueError('boom')"), "", "workflow_exception", "ValueError: boom"),
        (
            workflow("return (await self.generate(problem=problem))['response']"),
            "",
            "workflow_exception",
            "missing a required argument: 'entry_point'",
        ),
        (workflow("import sys\nsys.exit(0)"), "", "workflow_exception", "without returning"),
    ],
)
def test_broken_graphs_fail_with_their_kind(service, graph, prompt, kind, detail):
    result = run(service, graph, prompt)
    assert result["status"] == "failed" and result["failure"]["kind"] == kind
    assert detail in result["failure"]["message"] + (result["failure"]["traceback"] or "")
    assert result["solution"] is None and result["public"] is None and result["hidden"] is None
    assert result["worker"]["calls"] == 0


def test_graph_opening_a_socket_to_the_worker_is_refused(service, worker):
    graph = "import socket\n\n" + workflow(
        f"""
connection = socket.create_connection(("127.0.0.1", {worker.port}), timeout=2)
connection.sendall(b"GET /health HTTP/1.0\\r\\n\\r\\n")
return connection.recv(100).decode()
""",
        "pass",
    )
    result = run(service, graph)
    assert result["failure"]["kind"] == "workflow_exception"
    assert "ConnectionRefusedError" in result["failure"]["traceback"]
    assert result["worker"]["calls"] == 0 and result["trace"] == []


def test_graph_reading_files_and_environment_finds_nothing(service, tmp_path):
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET)
    graph = "import os\n\n" + workflow(
        f"""
seen = [repr(dict(os.environ))]
for path in ({str(secret_file)!r}, "/etc/shadow", "/proc/1/environ", "/root/.bashrc"):
    try:
        seen.append(path + ": " + open(path).read())
    except OSError as error:
        seen.append(path + ": " + type(error).__name__)
raise RuntimeError(" | ".join(seen))
""",
        "pass",
    )
    result = run(service, graph)
    assert result["failure"]["kind"] == "workflow_exception"
    message = result["failure"]["message"]
    assert f"{secret_file}: FileNotFoundError" in message and "/etc/shadow: PermissionError" in message
    assert SECRET not in json.dumps(result) and "SANDBOX_WORKERS" not in message


def test_graph_looping_forever_times_out(service):
    result = run(service, workflow("while True:\n    pass", "pass"), budgets={"wall_s": 2})
    assert result["failure"]["kind"] == "timeout"
    assert 2 <= result["wall_s"] < 8


def test_operator_call_budget_ends_the_run_even_if_the_graph_catches(service):
    graph = workflow(
        """
for i in range(10):
    try:
        await self.custom(input=problem, instruction=EXPLAIN)
    except BaseException:
        pass
return KNOWN_GOOD
""",
        "self.custom = operator.Custom(self.llm)",
    )
    result = run(service, graph, budgets={"max_operator_calls": 2})
    assert result["failure"]["kind"] == "budget_exceeded" and "max_operator_calls=2" in result["failure"]["message"]
    assert result["operator_calls"] == {"Custom": 2} and result["worker"]["calls"] == 2
    assert [r["index"] for r in result["trace"]] == [0, 1, -1]
    assert result["trace"][2]["error"] == "refused: operator-call budget spent"
    assert result["solution"] is None


def test_graph_abusing_the_operator_channel_is_stopped(service):
    flood = workflow(
        """
for _ in range(500):
    try:
        await self.custom(input=1, instruction=2)  # refused: not strings
    except Exception:
        pass
return KNOWN_GOOD
""",
        "self.custom = operator.Custom(self.llm)",
    )
    result = run(service, flood, budgets={"max_operator_calls": 3})
    assert result["failure"]["kind"] == "budget_exceeded" and "were refused" in result["failure"]["message"]
    assert result["num_operator_calls"] == 0 and len(result["trace"]) == 103
    assert "argument 'input' is invalid" in result["trace"][0]["error"]
    forged = "import asyncio, contextlib, os, stat\n\n" + workflow(
        """
for fd in map(int, os.listdir("/proc/self/fd")):
    with contextlib.suppress(OSError):  # one of them was listdir's own, closed by now
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            os.write(fd, b"not json\\n")
await asyncio.sleep(5)
return KNOWN_GOOD
""",
        "pass",
    )
    result = run(service, forged)
    assert result["failure"]["kind"] == "workflow_exception" and "malformed message" in result["failure"]["message"]
    assert result["wall_s"] < 5  # told to stop, the runtime exits at once


def test_worker_tokens_are_reserved_before_a_call_so_parallel_calls_cannot_overshoot(service):
    one = workflow(
        "return (await self.custom(input=problem, instruction=EXPLAIN))['response']",
        "self.custom = operator.Custom(self.llm)",
    )
    result = run(service, one, budgets={"max_worker_tokens": 5})
    assert result["failure"]["kind"] == "budget_exceeded" and "max_worker_tokens=5" in result["failure"]["message"]
    assert result["worker"]["calls"] == 0  # refused before the call, not counted after it
    three = "import asyncio\n\n" + workflow(
        """
replies = await asyncio.gather(*(self.custom(input=problem, instruction=EXPLAIN) for _ in range(3)))
return KNOWN_GOOD
""",
        "self.custom = operator.Custom(self.llm)",
    )
    # room for one call's reservation (its prompt's bytes, the template's allowance, max_tokens), not two
    reservation = len((EXPLAIN + PROBLEM["text"]).encode()) + 128 + MAX_TOKENS
    result = run(service, three, budgets={"max_worker_tokens": reservation + reservation // 2})
    assert (
        result["failure"]["kind"] == "budget_exceeded" and "reserved by calls in flight" in result["failure"]["message"]
    )
    assert result["worker"]["calls"] <= 1
    assert result["worker"]["prompt_tokens"] + result["worker"]["completion_tokens"] <= reservation + reservation // 2


@pytest.mark.parametrize(
    "graph_worker, request_worker, kind",
    [
        ("'gpt-4o'", "local", "worker_not_allowed"),  # the graph names its own worker
        ("'http://127.0.0.1:1/v1'", "local", "worker_not_allowed"),  # or a URL
        ("'dead'", "local", "worker_not_allowed"),  # or another allowlisted one than its request named
        ("llm_config", "nope", "worker_not_allowed"),  # the request names a worker the service does not have
        ("llm_config", "dead", "worker_unreachable"),  # allowlisted, but nothing listens there
    ],
)
def test_workers_only_by_allowlisted_name(service, graph_worker, request_worker, kind):
    graph = HEADER + (
        "class Workflow:\n    def __init__(self, name, llm_config, dataset):\n"
        f"        self.custom = operator.Custom(create_llm_instance({graph_worker}))\n\n"
        "    async def __call__(self, problem, entry_point):\n"
        "        return (await self.custom(input=problem, instruction=''))['response']\n"
    )
    result = run(service, graph, worker=request_worker)
    assert result["failure"]["kind"] == kind
    assert result["failure"]["infrastructure"] == (kind == "worker_unreachable")  # only that is not the design's
    assert result["worker"]["calls"] == 0
