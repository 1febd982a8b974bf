"""The multi-purpose reward, answer parsing and pass@k against hand-computed numbers (fr_jax/rl/reward.py)."""

import itertools
import math

import pytest

from fr_jax.rl import reward
from fr_jax.rl.reward import RewardConfig

# ------------------------------------------------------------------------------------------- the terms


@pytest.mark.parametrize(
    "passed, total, status, bonus, expected",
    [
        (3, 3, "ok", 0.0, 1.0),
        (1, 3, "ok", 0.0, 1 / 3),
        (0, 5, "ok", 0.0, 0.0),
        (3, 3, "ok", 0.5, 1.5),
        (2, 3, "ok", 0.5, 2 / 3),  # the bonus only on a full pass
        (3, 3, "timeout", 0.5, 0.0),
        (2, 3, "error", 0.0, 0.0),
    ],
)
def test_performance_term(passed, total, status, bonus, expected):
    assert reward.performance_term(passed, total, status=status, all_pass_bonus=bonus) == pytest.approx(expected)


@pytest.mark.parametrize(
    "args, match",
    [((1, 0), "total must be >= 1"), ((4, 3), "passed=4"), ((-1, 3), "passed=-1")],
)
def test_performance_term_rejects_impossible_counts(args, match):
    with pytest.raises(ValueError, match=match):
        reward.performance_term(*args)


def test_performance_term_rejects_unknown_status():
    with pytest.raises(ValueError, match="'crashed'"):
        reward.performance_term(1, 1, status="crashed")


def test_complexity_term():
    config = RewardConfig(max_operator_calls=10, max_code_tokens=1024)
    assert reward.complexity_term(operator_calls=3, config=config) == pytest.approx(-0.3)
    assert reward.complexity_term(operator_calls=15, config=config) == -1.0
    assert reward.complexity_term(operator_calls=0, config=config) == 0.0
    assert reward.complexity_term(code_tokens=512, config=config) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="exactly one"):
        reward.complexity_term(operator_calls=1, code_tokens=1)
    with pytest.raises(ValueError, match="exactly one"):
        reward.complexity_term()
    with pytest.raises(ValueError, match="operator_calls must be >= 0"):
        reward.complexity_term(operator_calls=-1)


def test_efficiency_term():
    config = RewardConfig(max_worker_calls=20, max_worker_tokens=32_000, max_latency_s=120.0)
    # 10/20 = 0.5, 8000/32000 = 0.25, 30/120 = 0.25 -> mean 1/3
    got = reward.efficiency_term(worker_calls=10, worker_tokens=8000, latency_s=30.0, config=config)
    assert got == pytest.approx(-1 / 3)
    # each part saturates at 1
    got = reward.efficiency_term(worker_calls=100, worker_tokens=0, latency_s=60.0, config=config)
    assert got == pytest.approx(-(1.0 + 0.0 + 0.5) / 3)
    assert reward.efficiency_term(worker_calls=0, worker_tokens=0, latency_s=0.0, config=config) == 0.0


def test_format_term():
    assert reward.format_term(True) == 0.0
    assert reward.format_term(False) == -1.0


# ------------------------------------------------------------------------------------------- the total


def test_workflow_reward_breakdown_by_hand():
    got = reward.multi_purpose_reward(
        well_formed=True, passed=2, total=4, operator_calls=4, worker_calls=10, worker_tokens=8000, latency_s=30.0
    )
    assert got.performance == 0.5
    assert got.complexity == pytest.approx(-0.4)
    assert got.efficiency == pytest.approx(-1 / 3)
    assert got.format == 0.0
    assert got.total == pytest.approx(0.5 - 0.05 * 0.4 - 0.05 / 3)
    assert set(got.as_dict()) == {"performance", "complexity", "efficiency", "format", "total"}


def test_plain_code_reward_has_no_efficiency_term():
    got = reward.multi_purpose_reward(
        well_formed=True, passed=3, total=3, code_tokens=256, latency_s=100.0, config=RewardConfig(all_pass_bonus=0.2)
    )
    assert (got.performance, got.efficiency) == (pytest.approx(1.2), 0.0)
    assert got.complexity == pytest.approx(-0.25)
    assert got.total == pytest.approx(1.2 - 0.05 * 0.25)


def test_malformed_answer_scores_only_the_format_penalty():
    got = reward.multi_purpose_reward(well_formed=False, passed=3, total=3, operator_calls=2)
    assert got.as_dict() == {"performance": 0.0, "complexity": 0.0, "efficiency": 0.0, "format": -1.0, "total": -0.2}


def test_default_weights_keep_performance_dominant():
    """One more passing test (of up to 8) always outweighs every penalty together; a malformed answer is worse
    than any well-formed one."""
    worst = dict(operator_calls=100, worker_calls=100, worker_tokens=10**6, latency_s=10**4)
    best = dict(operator_calls=0, worker_calls=0, worker_tokens=0, latency_s=0.0)
    for total in range(1, 9):
        for passed in range(total):
            better = reward.multi_purpose_reward(well_formed=True, passed=passed + 1, total=total, **worst)
            worse = reward.multi_purpose_reward(well_formed=True, passed=passed, total=total, **best)
            assert better.total > worse.total, (passed, total)
    failing = reward.multi_purpose_reward(well_formed=True, passed=0, total=1, **worst)
    assert reward.multi_purpose_reward(well_formed=False).total < failing.total


@pytest.mark.parametrize("field", ["max_operator_calls", "max_latency_s", "w_format", "all_pass_bonus"])
def test_reward_config_rejects_bad_values(field):
    with pytest.raises(ValueError, match=f"RewardConfig.{field}"):
        RewardConfig(**{field: -1})


# ------------------------------------------------------------------------------------- parsing answers


def test_extract_code_takes_the_last_python_block_of_the_answer():
    text = (
        "<think>try ```python\nthought = 1\n```</think>\n"
        "First:\n```python\ndef f():\n    return 1\n```\n"
        "Shell:\n```bash\nls\n```\n"
        "Final:\n```py\ndef f():\n    return 2\n```\nDone."
    )
    assert reward.extract_code(text) == "def f():\n    return 2"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("```\nx = 1\n```", "x = 1"),  # an unlabelled fence
        ("```Python\nx = 1\n```", "x = 1"),
        ("def f(a):\n    return a\n", "def f(a):\n    return a"),  # the whole answer is code
        ("reasoning done</think>\nimport os\nprint(os.sep)", "import os\nprint(os.sep)"),
        ("The answer is 4.", None),
        ("Hello", None),  # parses as a bare name, but is not code
        ("<think>```python\nx = 1\n```", None),  # cut off while thinking
        ("```python\nx = 1\n", None),  # unterminated fence, and the whole text does not parse
        ("```python\n\n```", None),
    ],
)
def test_extract_code_cases(text, expected):
    assert reward.extract_code(text) == expected


WORKFLOW = """
class Workflow:
    def __init__(self, name, llm_config, dataset):
        self.llm = create_llm_instance(llm_config)
        self.custom = operator.Custom(self.llm)
        self.test = operator.Test(self.llm)

    async def __call__(self, problem, entry_point):
        solutions = []
        for _ in range(3):
            solution = await self.custom_code_generate(problem=problem, entry_point=entry_point, instruction=P)
            solutions.append(solution["response"])
        best = await self.sc_ensemble(solutions=solutions, problem=problem)
        result = await self.test(problem=problem, solution=best["response"], entry_point=entry_point)
        return self._finish(result), self.llm.get_usage_summary()["total_cost"]

    def _finish(self, result):
        return result["solution"]
"""


def test_count_operator_calls_counts_call_sites_outside_init():
    # custom_code_generate (once, in a loop), sc_ensemble, test, _finish, and self.llm.get_usage_summary is
    # not `self.<name>(...)`; __init__'s operator.Custom(self.llm) does not count
    assert reward.count_operator_calls(WORKFLOW) == 4
    with pytest.raises(ValueError, match="does not parse"):
        reward.count_operator_calls("class Workflow:\n    def __call__(self:\n")


# ---------------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert reward.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    n, c, k = 1000, 7, 500
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # exact big-integer binomials
    assert reward.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert reward.pass_at_k(n, 0, k) == 0.0


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        reward.pass_at_k(n, c, k)
