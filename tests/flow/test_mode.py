"""The workflow mode end to end: hand-written designs scored through the real sandbox (POST /workflow/run) and the
real fr_jax.serve worker, and the reward terms they get.

The graphs return known solutions assembled in the graph, so pass rates are exact whatever the small worker writes;
worker calls and tokens come from real worker calls and are checked against the run's own trace.
"""

import asyncio
import json

import pytest
import yaml

from fr_jax import eval as fr_eval
from fr_jax import train
from fr_jax.cli import MODES
from fr_jax.config import ConfigError, GRPOSection, parse_config
from fr_jax.data.tasks import Task, TestSuite
from fr_jax.flow.mode import FLOW_SYSTEM_PROMPT, WorkflowMode, WorkflowRunSettings
from fr_jax.flow.prompt import parse_design
from fr_jax.rl.modes import SandboxFailure
from fr_jax.rl.reward import RewardConfig, count_operator_calls
from fr_jax.rl.setup import build_mode
from fr_jax.sandbox.client import AssertTests, SandboxClient
from fr_jax.sandbox.suites import suite_tests
from fr_jax.trainer.metrics import read_metrics
from fr_jax.trainer.records import read_records
from tests.support.grpo import TINY_LLAMA, build_tokenizer, grpo_config, write_tasks

REWARD = RewardConfig()
ADD = Task(
    "toy/add",
    "toy",
    'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
    "add",
    public_tests=TestSuite(("assert add(1, 2) == 3", "assert add(0, 0) == 0")),
    hidden_tests=TestSuite(("assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(2, 2) == 5")),
)  # the last is wrong on purpose: 2 of 3 pass
# HumanEval's shape: the prompt defines a helper the solution relies on, check() is one all-or-nothing test
PLUS_PROMPT = 'def double(x):\n    return 2 * x\n\n\ndef double_plus_one(a):\n    """double(a) + 1"""\n'
PLUS = Task(
    "toy/plus",
    "toy",
    PLUS_PROMPT,
    "double_plus_one",
    public_tests=TestSuite(("assert double_plus_one(1) == 3",), prelude=PLUS_PROMPT),
    hidden_tests=TestSuite(
        ("def check(candidate):\n    assert candidate(1) == 3\n    assert candidate(5) == 11\n",),
        format="humaneval",
        prelude=PLUS_PROMPT,
    ),
)


def design(body: str, operators: str, prompt: str = "", before: str = "") -> str:
    """A completion in the meta-agent's format; `body` is __call__'s body, `operators` __init__'s last lines."""
    init = "".join(f"        {line}\n" for line in operators.splitlines())
    call = "".join(f"        {line}\n" for line in body.strip("\n").splitlines())
    return (
        f"<think>I should keep it simple.</think>\n<modification>hand-written</modification>\n<graph>\n{before}"
        "class Workflow:\n    def __init__(self, name, llm_config, dataset):\n"
        f"        self.llm = create_llm_instance(llm_config)\n{init}\n"
        f"    async def __call__(self, problem, entry_point):\n{call}</graph>\n<prompt>\n{prompt}</prompt>\n"
    )


GENERATE = "self.generate = operator.CustomCodeGenerate(self.llm)"
TWO_CALLS = design(
    """
draft = await self.generate(problem=problem, entry_point=entry_point, instruction=prompt_custom.SOLVE)
review = await self.custom(input=draft["response"], instruction=prompt_custom.REVIEW)
return "def add(a, b):\\n    return a + b\\n", self.llm.get_usage_summary()["total_cost"]
""",
    f"{GENERATE}\nself.custom = operator.Custom(self.llm)",
    'SOLVE = "Solve it.\\n"\nREVIEW = "Review this code:\\n"\n',
)
HELPER_USER = design(
    """
await self.generate(problem=problem, entry_point=entry_point, instruction="")
return "def double_plus_one(a):\\n    return double(a) + 1\\n"
""",
    GENERATE,
)
NO_TAGS = "I would ask the worker for the code and then test it."
DOES_NOT_COMPILE = design("return 'x'", GENERATE, before="return 0\n\n")  # parses, but `return` outside a function
RAISES = design(
    """
await self.generate(problem=problem, entry_point=entry_point, instruction="")
raise RuntimeError("the graph gave up")
""",
    GENERATE,
)


def run_async(coroutine_function, url):
    async def go():
        async with SandboxClient(url) as sandbox:
            return await coroutine_function(sandbox)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def mode(workflow_sandbox):
    operators = run_async(lambda sandbox: sandbox.workflow_operators(), workflow_sandbox.url)
    return WorkflowMode(
        reward=REWARD, operators_text=operators.text, run=WorkflowRunSettings(worker="local", max_tokens=24), retries=1
    )


def expected_efficiency(calls: int, tokens: int, latency_s: float) -> float:
    return -(min(calls / 20, 1) + min(tokens / 32_000, 1) + min(latency_s / 120, 1)) / 3


def test_suite_tests_keep_the_prelude():
    plus = suite_tests(PLUS.hidden_tests, PLUS.entry_point).to_json()
    expected = AssertTests([PLUS.hidden_tests.cases[0] + "\n\ncheck(double_plus_one)"], imports=[PLUS_PROMPT])
    assert plus == expected.to_json()
    assert (
        suite_tests(ADD.public_tests, "add").to_json()
        == AssertTests(list(ADD.public_tests.cases), entry_point="add").to_json()
    )
    assert suite_tests(TestSuite(()), "add") is None


def test_messages_are_the_meta_agents_prompt(mode):
    system, user = mode.messages(PLUS)
    assert system == {"role": "system", "content": FLOW_SYSTEM_PROMPT}
    assert PLUS_PROMPT.strip() in user["content"] and mode.operators_text in user["content"]
    assert "Write the first workflow" in user["content"] and "at most 10 operator calls" in user["content"]


def test_designs_are_run_and_rewarded(mode, workflow_sandbox):
    tasks = [ADD, PLUS, ADD, ADD, ADD]
    completions = [TWO_CALLS, HELPER_USER, NO_TAGS, DOES_NOT_COMPILE, RAISES]
    two, helper, no_tags, no_compile, raises = run_async(
        lambda sandbox: mode.score(sandbox, tasks, completions, hidden=True), workflow_sandbox.url
    )

    # two operator calls, one worker call each; 2 of the 3 hidden asserts pass
    assert (two.well_formed, two.passed, two.total, two.failure) == (True, 2, 3, None)
    assert two.operator_calls == two.worker_calls == 2 == count_operator_calls(parse_design(TWO_CALLS).graph)
    calls = [call for record in two.run.trace for call in record.worker_calls]
    assert len(calls) == 2 and two.worker_tokens == sum(c.prompt_tokens + c.completion_tokens for c in calls) > 0
    terms = two.reward
    assert terms.performance == pytest.approx(2 / 3) and terms.complexity == pytest.approx(-2 / 10)
    assert terms.efficiency == pytest.approx(expected_efficiency(2, two.worker_tokens, two.run.wall_s))
    assert terms.format == 0.0
    assert terms.total == pytest.approx(terms.performance + 0.05 * terms.complexity + 0.05 * terms.efficiency)

    # the helper comes from the prompt (the suite's prelude): check() passes as one test
    assert (helper.passed, helper.total, helper.reward.performance, helper.worker_calls) == (1, 1, 1.0, 1)

    # malformed answers are a reward the policy sees, not a crash: format -1, nothing else
    for bad, failure in ((no_tags, "format"), (no_compile, "graph_syntax_error")):
        assert (bad.well_formed, bad.failure, bad.worker_calls) == (False, failure, 0)
        assert bad.reward.as_dict() == {
            "performance": 0.0,
            "complexity": 0.0,
            "efficiency": 0.0,
            "format": -1.0,
            "total": -0.2,
        }
    assert no_tags.run is None

    # a workflow that raises scores 0 on performance but pays for what it ran
    assert (raises.well_formed, raises.failure, raises.passed, raises.total) == (True, "workflow_exception", 0, 3)
    assert raises.reward.performance == 0.0 and raises.worker_calls == 1 and raises.worker_tokens > 0
    assert raises.reward.efficiency == pytest.approx(expected_efficiency(1, raises.worker_tokens, raises.run.wall_s))
    assert raises.reward.total > no_tags.reward.total  # well-formed but wrong beats malformed

    # the public tests instead of the hidden ones: both asserts pass
    [public] = run_async(lambda sandbox: mode.score(sandbox, [ADD], [TWO_CALLS], hidden=False), workflow_sandbox.url)
    assert (public.passed, public.total, public.reward.performance) == (2, 2, 1.0)


def test_an_unreachable_worker_is_never_scored(mode, workflow_sandbox):
    dead = WorkflowMode(
        reward=REWARD, operators_text=mode.operators_text, run=WorkflowRunSettings(worker="dead"), retries=1
    )
    with pytest.raises(SandboxFailure, match=r"toy/add failed 2 times .*worker_unreachable"):
        run_async(lambda sandbox: dead.score(sandbox, [ADD], [HELPER_USER], hidden=True), workflow_sandbox.url)
    with pytest.raises(ValueError, match="toy/empty has no public tests"):
        empty = Task("toy/empty", "toy", "p", "f", TestSuite(()), TestSuite(("assert True",)))
        run_async(lambda sandbox: mode.score(sandbox, [empty], [TWO_CALLS], hidden=False), workflow_sandbox.url)


def test_sandbox_refuses_a_bad_worker_allowlist(capsys, tmp_path):
    from sandbox_service.__main__ import main as sandbox_main

    assert sandbox_main(["--worker", "local=http://127.0.0.1:1/v1", "--worker", "local=http://127.0.0.1:2/v1"]) == 2
    assert "worker 'local' is configured twice" in capsys.readouterr().err
    assert sandbox_main(["--worker", "local=ftp://host/v1,model=m"]) == 2
    assert "must start with http:// or https://" in capsys.readouterr().err
    missing = tmp_path / "workers.json"
    assert sandbox_main(["--workers-file", str(missing)]) == 2
    assert f"worker file {missing}" in capsys.readouterr().err


# ------------------------------------------------------------------------------ GRPO and evaluation, workflow mode


def test_workflow_mode_from_the_config(workflow_sandbox):
    grpo = GRPOSection(
        mode="workflow",
        sandbox={"launch": "none", "url": workflow_sandbox.url},
        workflow={"worker": "local", "worker_url": "rollout", "worker_model": "smol", "max_tokens": 24},
    )
    mode = build_mode(grpo, None, MODES)
    assert isinstance(mode, WorkflowMode) and mode.run.max_tokens == 24 and mode.system == FLOW_SYSTEM_PROMPT
    with pytest.raises(ValueError, match="prepare it on its sandbox first"):  # building it started nothing
        mode.messages(ADD)
    run_async(mode.prepare, workflow_sandbox.url)
    assert mode.operators_text == run_async(lambda s: s.workflow_operators(), workflow_sandbox.url).text
    assert mode.worker.allowlist_entry("http://127.0.0.1:5/") == "local=http://127.0.0.1:5/v1,model=smol"
    assert build_mode(grpo.model_copy(update={"mode": "direct"}), None, MODES).worker is None
    with pytest.raises(ConfigError, match=r"grpo.mode='plan': known modes are \['direct', 'workflow'\]"):
        build_mode(grpo.model_copy(update={"mode": "plan"}), None, MODES)
    with pytest.raises(ConfigError, match="grpo.workflow.worker_url is required with grpo.mode 'workflow'"):
        parse_config(
            {
                "stage": "grpo",
                "run_dir": "r",
                "model": {"pretrained": "smollm2"},
                "train": {"steps": 1, "batch_size": 1},
                "grpo": {"mode": "workflow"},
            }
        )
    unlisted = WorkflowMode(reward=REWARD, operators_text=mode.operators_text, run=WorkflowRunSettings(worker="gpt"))
    with pytest.raises(SandboxFailure, match="the sandbox does not allowlist the worker 'gpt'"):
        run_async(lambda sandbox: unlisted.score(sandbox, [ADD], [HELPER_USER], hidden=True), workflow_sandbox.url)


def test_grpo_then_eval_in_workflow_mode(tmp_path, workflow_worker, capsys):
    """python -m fr_jax.train (stage grpo, mode workflow) for one round with a tiny random policy, whose designs are
    format failures, then python -m fr_jax.eval --mode workflow beside the SmolLM2 worker prompted directly."""
    tasks_file = write_tasks(tmp_path / "tasks.jsonl")
    cfg = grpo_config(
        tmp_path / "run",
        tmp_path,
        tasks_file,
        rounds=1,
        mode="workflow",
        data={"max_prompt_tokens": 1000},
        workflow={"worker": "local", "worker_url": f"{workflow_worker.url}/v1", "max_tokens": 16},
    )
    cfg["model"] = {
        "architecture": {**TINY_LLAMA, "max_position_embeddings": 1024},
        "tokenizer": str(build_tokenizer(tmp_path / "tokenizer")),
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train.main(["--config", str(path)]) == 0
    [round_one] = [m for m in read_metrics(tmp_path / "run") if "reward/total" in m]
    assert (round_one["reward/format"], round_one["well_formed"], round_one["reward/total"]) == (-1.0, 0.0, -0.2)
    assert (round_one["worker/calls"], round_one["worker/tokens"]) == (0.0, 0.0)
    capsys.readouterr()

    assert fr_eval.main(["--config", str(path), "--mode", "workflow"]) == 0
    printed = capsys.readouterr().out
    assert "worker prompted directly" in printed and "meta-agent workflows" in printed
    report = json.loads((tmp_path / "run" / "eval" / "test.json").read_text())
    assert report["mode"] == "workflow" and report["well_formed"] == 0.0 and report["worker_calls"] == 0.0
    direct = report["direct_worker"]
    assert direct["worker_calls"] == 1.0 and direct["worker_tokens"] > 0 and direct["tasks"] == 2
    assert direct["pass_at_k"]["pass@1"] == sum(direct["per_task"].values()) / 2

    # the fixed workflows run through the same /workflow/run, worker, queries and budgets: no policy answers
    for name, calls in (("io", 1.0), ("sc", 4.0)):  # sc: 3 candidates + the ScEnsemble pick
        assert fr_eval.main(["--config", str(path), "--mode", f"baseline:{name}"]) == 0
        fixed = json.loads((tmp_path / "run" / "eval" / f"test_baseline-{name}.json").read_text())
        assert fixed["method"] == f"baseline-{name}" and fixed["model"] is None and fixed["well_formed"] == 1.0
        assert fixed["worker_calls"] == calls and fixed["worker_tokens"] > 0 and fixed["tasks"] == 2
        written = read_records(tmp_path / "run" / "eval" / "records" / f"test_baseline-{name}.jsonl.gz")
        assert len(written) == 2 and all(r["workflow"]["trace"] and r["design"]["graph"] for r in written)
    with pytest.raises(SystemExit) as refused:  # which design? argparse refuses it with the fix
        fr_eval.main(["--config", str(path), "--mode", "baseline:best_fixed"])
    assert refused.value.code == 2
    assert "--best-fixed FILE goes with --mode baseline:best_fixed" in capsys.readouterr().err
