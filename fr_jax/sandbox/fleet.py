"""Several sandbox services used as one: at paper scale every workflow runs on a sandbox host, and one host is never
enough.

A request goes to the member with the least outstanding work for its capacity (the jail workers its /health
reports). A member that stops answering (SandboxUnavailable, or no answer within the deadline) is taken out for a
while and the requests it held are sent again to the others: nothing is lost, and since every request's answer is
taken from exactly one member, nothing is counted twice. The fleet answers the same calls as one SandboxClient, so a
mode scores on it unchanged. Behind an ordinary HTTP load balancer a single SandboxClient works too (README: the
settings it needs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fr_jax.sandbox.client import (
    EvalItem,
    Evaluation,
    RunCodeResult,
    SandboxClient,
    SandboxDeadlineExceeded,
    SandboxHealth,
    SandboxUnavailable,
    Tests,
    WorkflowOperators,
    WorkflowRun,
)

_log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass
class _Member:
    client: SandboxClient
    capacity: int = 1  # jail workers, from /health
    outstanding: int = 0  # runs sent and not answered
    down_until: float = 0.0

    @property
    def load(self) -> float:
        return self.outstanding / self.capacity


class SandboxFleet:
    """`async with SandboxFleet([url, ...]) as fleet:` then the calls of SandboxClient."""

    def __init__(self, urls: Sequence[str], *, down_for_s: float = 30.0, batch_size: int = 16, **client_kwargs: Any):
        if not urls:
            raise ValueError("a sandbox fleet needs at least one URL")
        client_kwargs.setdefault("unreachable_after_s", 3.0)  # fail over quickly: the others can take the work
        self.members = [_Member(SandboxClient(url, **client_kwargs)) for url in urls]
        self.down_for_s, self.batch_size = down_for_s, batch_size
        self.resent = 0  # requests sent again after their member stopped answering

    async def __aenter__(self) -> SandboxFleet:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await asyncio.gather(*(m.client.aclose() for m in self.members))

    @property
    def stats(self) -> dict[str, int]:
        totals: dict[str, int] = {"resent": self.resent}
        for member in self.members:
            for key, value in member.client.stats.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    async def health(self) -> list[SandboxHealth]:
        """Every member's /health (each must answer); their worker counts become their capacities."""
        answers = await asyncio.gather(*(m.client.health() for m in self.members))
        for member, answer in zip(self.members, answers):
            member.capacity = max(1, int(answer.capacity.get("workers", 1)))
        return answers

    def _pick(self, tried: set[int]) -> int:
        now = time.monotonic()
        live = [i for i, m in enumerate(self.members) if i not in tried and m.down_until <= now]
        if not live:
            urls = ", ".join(m.client.base_url for m in self.members)
            raise SandboxUnavailable(f"no sandbox of the fleet ({urls}) can take the request")
        return min(live, key=lambda i: (self.members[i].load, i))

    async def _call(self, send: Callable[[SandboxClient], Awaitable[T]], runs: int = 1) -> T:
        """`send` on the least loaded member; on a member that stopped answering, again on another."""
        tried: set[int] = set()
        while True:
            index = self._pick(tried)
            member = self.members[index]
            member.outstanding += runs
            try:
                return await send(member.client)
            except (SandboxUnavailable, SandboxDeadlineExceeded) as err:
                member.down_until = time.monotonic() + self.down_for_s
                tried.add(index)
                self.resent += 1
                _log.warning(
                    "sandbox %s stopped answering (%s); sending its request to another member",
                    member.client.base_url,
                    err,
                )
            finally:
                member.outstanding -= runs

    async def evaluate_batch(self, items: Sequence[EvalItem]) -> list[Evaluation]:
        """Results in the order of `items`, spread over the members in chunks of batch_size."""
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        answers = await asyncio.gather(*(self._call(lambda c, ch=ch: c.evaluate_batch(ch), len(ch)) for ch in chunks))
        return [result for answer in answers for result in answer]

    async def evaluate(self, code: str, tests: Tests, **options: Any) -> Evaluation:
        return await self._call(lambda c: c.evaluate(code, tests, **options))

    async def run_code(self, code: str, **options: Any) -> RunCodeResult:
        return await self._call(lambda c: c.run_code(code, **options))

    async def run_workflow(self, graph: str, prompt: str, **options: Any) -> WorkflowRun:
        return await self._call(lambda c: c.run_workflow(graph, prompt, **options))

    async def workflow_operators(self) -> WorkflowOperators:
        return await self._call(lambda c: c.workflow_operators())
