"""A fleet of two real sandbox services (fr_jax.sandbox.fleet): the work is spread over both, and when one is killed
mid-batch its requests are sent to the other: every item gets exactly one verdict, the right one."""

import asyncio

from fr_jax.config import GRPOSection
from fr_jax.rl.modes import DirectCode
from fr_jax.rl.setup import sandbox_session
from fr_jax.sandbox.client import AssertTests, EvalItem
from fr_jax.sandbox.fleet import SandboxFleet
from fr_jax.sandbox.local import LocalSandbox

SLOW = "import time\ntime.sleep(0.4)\n"


def items(count: int) -> tuple[list[EvalItem], list[bool]]:
    """Solutions of f() == i, every third one wrong; each takes a little while to judge."""
    batch, expected = [], []
    for i in range(count):
        right = i % 3 != 0
        batch.append(EvalItem(f"{SLOW}def f():\n    return {i if right else -1}", AssertTests([f"assert f() == {i}"])))
        expected.append(right)
    return batch, expected


def test_a_member_killed_mid_batch_loses_nothing():
    with LocalSandbox(workers=2) as first, LocalSandbox(workers=2) as second:

        async def run():
            async with SandboxFleet([first.url, second.url], batch_size=2, unreachable_after_s=2.0) as fleet:
                healths = await fleet.health()
                assert [m.capacity for m in fleet.members] == [h.capacity["workers"] for h in healths] == [2, 2]
                batch, expected = items(24)
                judging = asyncio.ensure_future(fleet.evaluate_batch(batch))
                while fleet.members[1].outstanding == 0 or fleet.members[0].outstanding == 0:
                    await asyncio.sleep(0.05)  # both members hold work now
                second.process.kill()
                results = await judging
                return fleet, results, expected

        fleet, results, expected = asyncio.run(run())
    assert [r.passed_all for r in results] == expected  # one verdict per item, in order, none lost
    assert all(len(r.tests) == 1 and r.status == "Finished" for r in results)
    assert fleet.resent >= 1 and fleet.members[1].down_until > 0  # the killed member's requests went elsewhere
    assert all(m.client.stats["requests"] > 0 for m in fleet.members)  # the work was spread


def test_a_grpo_run_launches_replicas_and_scores_on_the_fleet(tmp_path):
    grpo = GRPOSection(sandbox={"replicas": 2, "workers": 2})
    mode = DirectCode(reward=grpo.reward, count_tokens=len, instruction="")
    with sandbox_session(grpo.sandbox, mode, rollout_url=None, log_dir=tmp_path) as session:
        assert len(session.urls) == 2 and (tmp_path / "sandbox_1.log").is_file()
        batch, expected = items(8)
        results = session.run(lambda fleet: fleet.evaluate_batch(batch))
    assert [r.passed_all for r in results] == expected
