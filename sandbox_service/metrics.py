"""Prometheus metrics, in a registry of their own per app (several apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sandbox_service.jail import RunOutcome

_RUN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def run_outcome(outcome: RunOutcome) -> str:
    """One word for how a jailed run ended."""
    if outcome.sandbox_error:
        return "sandbox_error"
    if outcome.killed_for:
        return outcome.killed_for
    if outcome.oom_killed:
        return "memory"
    if outcome.cpu_limit_hit:
        return "timeout"
    return "exit_0" if outcome.exit_code == 0 else "exit_nonzero"


class Metrics:
    def __init__(self, workers: int, waiting: Callable[[], int], busy: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs = Counter("sandbox_runs", "Jailed runs by kind and outcome", ["kind", "outcome"], registry=r)
        self.run_seconds = Histogram(
            "sandbox_run_seconds", "Wall time of one jailed run", ["kind"], buckets=_RUN_BUCKETS, registry=r
        )
        self.requests = Counter(
            "sandbox_requests", "HTTP requests by endpoint and status code", ["endpoint", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "sandbox_request_seconds", "Latency of HTTP requests", ["endpoint"], buckets=_RUN_BUCKETS, registry=r
        )
        self.rejected = Counter(
            "sandbox_rejected", "Requests refused before running (queue_full, draining)", ["reason"], registry=r
        )
        self.tests = Counter("sandbox_tests", "Evaluated tests by status", ["status"], registry=r)
        Gauge("sandbox_workers", "Worker slots", registry=r).set(workers)
        Gauge("sandbox_queue_depth", "Runs waiting for a free worker slot", registry=r).set_function(waiting)
        Gauge("sandbox_busy_workers", "Worker slots running a program", registry=r).set_function(busy)

    def observe_run(self, kind: str, outcome: RunOutcome) -> None:
        self.runs.labels(kind, run_outcome(outcome)).inc()
        self.run_seconds.labels(kind).observe(outcome.wall_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
