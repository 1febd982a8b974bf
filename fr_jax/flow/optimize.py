"""`python -m fr_jax.flow.optimize --config FILE.yaml [key.sub=value ...] [--sft-only]`: FlowReasoner's per-query
refinement loop, and the distillation data it yields.

For every query, loop.rounds rounds:
1. Round 1 runs the seed workflow (one CustomCodeGenerate call).
2. Round r > 1 picks a parent among the candidates: round 1 and the best other rounds by score, loop.candidates
   in all (AFlow's top rounds, 4 in FlowReasoner), with p = 0.3 * uniform + 0.7 * softmax(0.2 * (100 * score -
   max)). The designer sees the parent's graph, prompt and score and the experience list, what every earlier
   modification of that parent did ("modification X took the score from a to b"), and changes one detail.
3. A design that parses is run loop.validation_runs times on the public tests (3 in FlowReasoner); its score is
   the mean pass rate, a failed run counting 0. A design that cannot be parsed or loaded is a format failure: it
   scores 0 in its parent's experience and can never be a parent.
4. Then the best round (highest score, earliest on ties) and the seed are run on the hidden tests.

The designer is any OpenAI-compatible chat endpoint: a teacher such as DeepSeek-R1 served anywhere, or fr_jax.serve
(its reasoning may come in a <think> block or in the API's reasoning_content field). The worker is a name on the
sandbox's allowlist; a sandbox launched here allowlists worker.url under that name. `url: local` means the
fr_jax.serve this command starts from the local_server section (one server may be designer and worker).

Written to out_dir:
- rounds.jsonl: one line per finished query (in the order they finish) with every round: designer exchange,
  design, runs, failures. Queries already there are skipped when the command runs again, so an interrupted
  teacher run resumes.
- sft.jsonl: SFT records (fr_jax.flow.data), rebuilt from rounds.jsonl with the configured filter each time;
  --sft-only rebuilds it (e.g. after changing the filter) without running anything.
- summary.json: scores before and after refinement, format failures, records kept and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import pathlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import httpx
import numpy as np
import yaml
from pydantic import Field, model_validator
from tqdm import tqdm

import fr_jax
from fr_jax.config import ConfigError, Section, TaskSetSection, check_external_url, load_config
from fr_jax.data.jsonl import read_jsonl, write_jsonl
from fr_jax.data.task_file import load_task_set
from fr_jax.data.tasks import Task
from fr_jax.flow.chat import ChatClient
from fr_jax.flow.data import RecordFilter, sft_records
from fr_jax.flow.mode import FLOW_SYSTEM_PROMPT, WorkflowRunSettings, is_design_failure, run_design, run_pass_rate
from fr_jax.flow.prompt import (
    MAX_OPERATOR_CALLS,
    SEED_GRAPH,
    SEED_MODIFICATION,
    SEED_PROMPT,
    Experience,
    ParentDesign,
    ParsedDesign,
    build_design_prompt,
    parse_design,
)
from fr_jax.rl.setup import server_env
from fr_jax.rollout.launch import launch_local
from fr_jax.sandbox.client import SandboxClient, WorkflowRun
from fr_jax.sandbox.local import LocalSandbox

_log = logging.getLogger(__name__)
LOCAL = "local"  # designer.url / worker.url: the fr_jax.serve started from local_server
_SEED_LIMIT = 2**31 - 1
_EXPERIENCE_ERROR_CHARS = 160


# ------------------------------------------------------------------------------------- parent selection (pure)


def candidate_rounds(scores: Mapping[int, float], count: int = 4) -> list[int]:
    """The rounds a parent is drawn from: round 1 (the seed) always, then the best other rounds by score (earlier
    first on ties), `count` in all. `scores` maps the runnable rounds to their validation scores."""
    if 1 not in scores:
        raise ValueError("round 1 (the seed workflow) must be among the scored rounds")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    others = sorted((r for r in scores if r != 1), key=lambda r: (-scores[r], r))
    return [1, *others[: count - 1]]


def parent_probabilities(scores: Sequence[float], *, uniform_weight: float = 0.3, sharpness: float = 0.2) -> np.ndarray:
    """FlowReasoner's (AFlow's) parent pick: p = w/n + (1 - w) * softmax(sharpness * (100 * score - max)), the
    scores in [0, 1], so that a 1-point better pass rate (in %) weighs e^0.2 more and every candidate keeps w/n."""
    points = 100.0 * np.asarray(scores, dtype=np.float64)
    if points.ndim != 1 or points.size == 0:
        raise ValueError("parent_probabilities needs a non-empty list of scores")
    if not np.all(np.isfinite(points)) or points.min() < 0 or points.max() > 100:
        raise ValueError(f"scores must be in [0, 1], got {list(scores)}")
    weights = np.exp(sharpness * (points - points.max()))
    return uniform_weight / points.size + (1.0 - uniform_weight) * weights / weights.sum()


# ------------------------------------------------------------------------------------------------- rounds


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One run of a design on one query, as the rounds log keeps it."""

    pass_rate: float  # on the public tests; 0 when the workflow failed
    failure: str | None  # /workflow/run's failure kind
    message: str | None
    operator_calls: int
    worker_calls: int
    worker_tokens: int
    wall_s: float
    hidden_pass_rate: float | None = None  # final runs only

    @classmethod
    def of(cls, run: WorkflowRun, *, hidden: bool = False) -> RunRecord:
        return cls(
            pass_rate=run_pass_rate(run, hidden=False),
            failure=run.failure.kind if run.failure else None,
            message=run.failure.message[:2000] if run.failure else None,
            operator_calls=run.num_operator_calls,
            worker_calls=run.worker.calls,
            worker_tokens=run.worker.prompt_tokens + run.worker.completion_tokens,
            wall_s=run.wall_s,
            hidden_pass_rate=run_pass_rate(run, hidden=True) if hidden else None,
        )


@dataclasses.dataclass(frozen=True)
class Round:
    round: int
    parent: int | None
    parent_score: float | None
    modification: str
    graph: str
    prompt: str
    score: float  # mean public pass rate over the validation runs (0 for a format failure)
    runs: tuple[RunRecord, ...]
    format_error: str | None = None
    warnings: tuple[str, ...] = ()
    candidates: dict[str, float] | None = None  # round -> its probability of being the parent
    experience: tuple[Experience, ...] = ()
    designer: dict[str, Any] | None = None  # system, user, content, reasoning, tokens, finish reason, latency

    @property
    def runnable(self) -> bool:
        return self.format_error is None


def experience_for(parent: int, rounds: Sequence[Round]) -> list[Experience]:
    """What every earlier modification of round `parent` did, in the order they were tried. A format failure
    counts as taking the score to 0 (the designer must not try it again)."""
    before = next(r.score for r in rounds if r.round == parent)
    out = []
    for r in rounds:
        if r.parent != parent:
            continue
        what = r.modification.strip() or "(no modification named)"
        if r.format_error is not None:
            what += f" [unusable design: {r.format_error[:_EXPERIENCE_ERROR_CHARS]}]"
        out.append(Experience(what, before, r.score))
    return out


def best_round(rounds: Sequence[Round]) -> Round:
    """The runnable round with the highest score (the earliest on ties)."""
    return max((r for r in rounds if r.runnable), key=lambda r: (r.score, -r.round))


# ---------------------------------------------------------------------------------------------------- config


class TasksSection(TaskSetSection):
    dataset: str  # required here
    split: str
    limit: int | None = Field(None, ge=1)


class LocalServerSection(Section):
    """An fr_jax.serve started for the run; designer.url or worker.url `local` points at it."""

    model: str = "smollm2"  # an HF model directory, or a demo name
    context_length: int = Field(4096, ge=256)  # the design prompt alone is ~1-2k tokens
    max_running_requests: int = Field(8, ge=1)
    startup_timeout_s: float = Field(900.0, gt=0)


class DesignerSection(Section):
    url: str  # OpenAI-compatible base URL ending in /v1, or `local`
    model: str | None = None  # the request's `model` field (null: left out)
    api_key_env: str | None = None  # environment variable holding a bearer token
    temperature: float = Field(0.0, ge=0, le=2)  # FlowReasoner's teacher: DeepSeek-R1 at temperature 0
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(8192, ge=1)
    system: str | None = FLOW_SYSTEM_PROMPT
    timeout_s: float = Field(1800.0, gt=0)  # per request: a reasoning teacher may think for minutes
    max_retries: int = Field(3, ge=0)


class WorkerSection(Section):
    name: str = "local"  # the name on the sandbox's allowlist
    url: str | None = None  # allowlisted under `name` when the sandbox is launched here; or `local`
    model: str | None = None  # the `model` field the sandbox sends (default: the name)
    max_tokens: int = Field(512, ge=1)  # per worker call
    temperature: float = Field(0.7, ge=0, le=2)  # > 0, or the validation runs repeat each other
    top_p: float = Field(1.0, gt=0, le=1)


class BudgetsSection(Section):
    max_operator_calls: int = Field(20, ge=1)
    max_worker_tokens: int = Field(32_000, ge=1)
    wall_s: float = Field(120.0, gt=0)
    test_timeout_s: float = Field(5.0, gt=0)
    test_memory_mb: int = Field(1024, ge=64)


class LoopSection(Section):
    rounds: int = Field(10, ge=1)  # round 1 is the seed workflow
    validation_runs: int = Field(3, ge=1)
    final_runs: int = Field(1, ge=1)  # hidden-test runs of the best round and of the seed
    candidates: int = Field(4, ge=1)
    seed: int = 0
    concurrency: int = Field(4, ge=1)  # queries refined at once
    retries: int = Field(2, ge=0)  # runs spoiled by the sandbox or the worker, then the run stops
    max_operator_calls_told: int = Field(MAX_OPERATOR_CALLS, ge=1)  # the prompt's "complexity should not exceed"


class SandboxSection(Section):
    launch: Literal["local", "none"] = "local"
    url: str | None = None  # launch: none
    workers: int = Field(4, ge=2)  # a workflow holds a jail slot and its Test calls need another
    insecure: bool = False

    @model_validator(mode="after")
    def _url(self):
        return check_external_url(self, "sandbox")


class FilterSection(Section):
    min_score: float = Field(0.0, ge=0, le=1)
    min_gain: float | None = Field(None, ge=-1, le=1)
    best_per_query: bool = False


class OptimizeConfig(Section):
    out_dir: str
    tasks: TasksSection
    designer: DesignerSection
    worker: WorkerSection = WorkerSection()
    budgets: BudgetsSection = BudgetsSection()
    loop: LoopSection = LoopSection()
    sandbox: SandboxSection = SandboxSection()
    filter: FilterSection = FilterSection()
    local_server: LocalServerSection | None = None

    @model_validator(mode="after")
    def _wiring(self):
        uses_local = LOCAL in (self.designer.url, self.worker.url)
        if uses_local and self.local_server is None:
            raise ValueError("designer.url or worker.url is `local`, but there is no local_server section")
        if self.local_server is not None and not uses_local:
            raise ValueError("local_server is given but neither designer.url nor worker.url is `local`")
        if self.sandbox.launch == "local" and self.worker.url is None:
            raise ValueError(
                "worker.url is required with sandbox.launch: local (the sandbox allowlists it as worker.name)"
            )
        if self.sandbox.launch == "none" and self.worker.url is not None:
            raise ValueError(
                "worker.url is only used with sandbox.launch: local; a running sandbox has its own "
                "allowlist (give worker.name)"
            )
        return self


def load_config_tasks(section: TasksSection) -> list[Task]:
    try:
        tasks = load_task_set(section.dataset, section.split, file=section.file, data_dir=section.data_dir)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"tasks ({section.dataset}, split {section.split!r}): {err}") from None
    without_public = [t.task_id for t in tasks if not t.public_tests.cases]
    if without_public:  # nothing to validate a design on: the loop cannot run on them
        _log.warning("skipping %d queries without public tests: %s", len(without_public), without_public)
        tasks = [t for t in tasks if t.public_tests.cases]
    return tasks[: section.limit] if section.limit else tasks


# ------------------------------------------------------------------------------------------------ the loop


def _seed(*key: int) -> int:
    return int(np.random.default_rng(list(key)).integers(0, _SEED_LIMIT))


class Optimizer:
    """The refinement loop of one run: one designer, one sandbox, one worker, settings from the config."""

    def __init__(
        self,
        cfg: OptimizeConfig,
        sandbox: SandboxClient,
        designer: ChatClient,
        operators_text: str,
        setup: dict[str, Any],
    ):
        self.cfg, self.sandbox, self.designer, self.operators_text = cfg, sandbox, designer, operators_text
        self.setup = setup  # what produced the data (designer and worker settings), written with every query
        b, w = cfg.budgets, cfg.worker
        self.settings = WorkflowRunSettings(
            worker=w.name,
            max_operator_calls=b.max_operator_calls,
            max_worker_tokens=b.max_worker_tokens,
            wall_s=b.wall_s,
            max_tokens=w.max_tokens,
            temperature=w.temperature,
            top_p=w.top_p,
            test_timeout_s=b.test_timeout_s,
            test_memory_mb=b.test_memory_mb,
        )

    async def _runs(
        self, task: Task, design: ParsedDesign, count: int, index: int, number: int, *, hidden: bool
    ) -> list[WorkflowRun]:
        """`count` runs with the worker seeds of (loop.seed, query, round, public or hidden, run)."""
        seeds = [_seed(self.cfg.loop.seed, index, number, int(hidden), i) for i in range(count)]
        return list(
            await asyncio.gather(
                *(
                    run_design(
                        self.sandbox, design, task, self.settings, hidden=hidden, retries=self.cfg.loop.retries, seed=s
                    )
                    for s in seeds
                )
            )
        )

    async def _validated(self, task: Task, index: int, number: int, design: ParsedDesign, **fields) -> Round:
        """A round whose design parsed: run it on the public tests."""
        runs = await self._runs(task, design, self.cfg.loop.validation_runs, index, number, hidden=False)
        records = tuple(RunRecord.of(run) for run in runs)
        loading = next((run for run in runs if is_design_failure(run)), None)
        if loading is not None:  # it parsed, but Python could not compile or load it: a format failure too
            return Round(
                number,
                modification=design.modification,
                graph=design.graph,
                prompt=design.prompt,
                score=0.0,
                runs=records,
                format_error=f"{loading.failure.kind}: {loading.failure.message}",
                warnings=design.warnings,
                **fields,
            )
        return Round(
            number,
            modification=design.modification,
            graph=design.graph,
            prompt=design.prompt,
            score=float(np.mean([r.pass_rate for r in records])),
            runs=records,
            warnings=design.warnings,
            **fields,
        )

    async def _designed(self, task: Task, index: int, number: int, rounds: list[Round]) -> Round:
        scores = {r.round: r.score for r in rounds if r.runnable}
        candidates = candidate_rounds(scores, self.cfg.loop.candidates)
        probabilities = parent_probabilities([scores[c] for c in candidates])
        rng = np.random.default_rng([self.cfg.loop.seed, index, number])
        parent = next(r for r in rounds if r.round == candidates[rng.choice(len(candidates), p=probabilities)])
        experience = tuple(experience_for(parent.round, rounds))
        user = build_design_prompt(
            task.prompt,
            self.operators_text,
            parent=ParentDesign(parent.graph, parent.prompt, parent.score),
            experience=experience,
            max_operator_calls=self.cfg.loop.max_operator_calls_told,
        )
        system = self.cfg.designer.system
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        d = self.cfg.designer
        reply = await self.designer.complete(
            messages,
            temperature=d.temperature,
            top_p=d.top_p,
            max_tokens=d.max_tokens,
            seed=_seed(self.cfg.loop.seed, index, number),
        )
        design = parse_design(reply.content)
        fields = dict(
            parent=parent.round,
            parent_score=parent.score,
            experience=experience,
            candidates={str(c): float(p) for c, p in zip(candidates, probabilities)},
            designer={"system": system, "user": user, **dataclasses.asdict(reply)},
        )
        if not design.ok:
            return Round(
                number,
                modification=design.modification,
                graph=design.graph,
                prompt=design.prompt,
                score=0.0,
                runs=(),
                format_error=design.error,
                warnings=design.warnings,
                **fields,
            )
        return await self._validated(task, index, number, design, **fields)

    async def query(self, index: int, task: Task) -> dict[str, Any]:
        """Every round of one query, the hidden-test runs of the best round and the seed, as a rounds.jsonl line."""
        started = time.perf_counter()
        seed_design = ParsedDesign(SEED_MODIFICATION, SEED_GRAPH, SEED_PROMPT)
        rounds = [await self._validated(task, index, 1, seed_design, parent=None, parent_score=None)]
        for number in range(2, self.cfg.loop.rounds + 1):
            rounds.append(await self._designed(task, index, number, rounds))
        best = best_round(rounds)
        hidden = {}
        for r in sorted({rounds[0].round, best.round}):
            design = ParsedDesign(rounds[r - 1].modification, rounds[r - 1].graph, rounds[r - 1].prompt)
            runs = await self._runs(task, design, self.cfg.loop.final_runs, index, r, hidden=True)
            records = [RunRecord.of(run, hidden=True) for run in runs]
            hidden[str(r)] = {
                "score": float(np.mean([x.hidden_pass_rate for x in records])),
                "solved": float(np.mean([x.hidden_pass_rate == 1.0 for x in records])),
                "runs": [dataclasses.asdict(x) for x in records],
            }
        return {
            "index": index,
            "task_id": task.task_id,
            "dataset": task.dataset,
            "split": self.cfg.tasks.split,
            "query": task.prompt,
            "entry_point": task.entry_point,
            "best_round": best.round,
            "best_score": best.score,
            "hidden": hidden,
            "rounds": [dataclasses.asdict(r) for r in rounds],
            "setup": self.setup,
            "seconds": time.perf_counter() - started,
            "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }


async def optimize_tasks(optimizer: Optimizer, tasks: Sequence[Task], rounds_path: pathlib.Path) -> list[dict]:
    """Refine the tasks not yet in rounds.jsonl, loop.concurrency at a time, appending each as it finishes."""
    done = {q["task_id"] for q in read_jsonl(rounds_path)} if rounds_path.exists() else set()
    todo = [(i, t) for i, t in enumerate(tasks) if t.task_id not in done]
    if done:
        _log.info("resuming: %d of %d queries are already in %s", len(tasks) - len(todo), len(tasks), rounds_path)
    gate = asyncio.Semaphore(optimizer.cfg.loop.concurrency)
    finished = []
    with tqdm(total=len(todo), desc="queries", unit="query", disable=None) as bar, rounds_path.open("a") as out:

        async def one(index: int, task: Task) -> None:
            async with gate:
                result = await optimizer.query(index, task)
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
            finished.append(result)
            _log.info(
                "%s: best round %d scored %.3f on the public tests (seed %.3f); %d of %d queries done",
                task.task_id,
                result["best_round"],
                result["best_score"],
                result["rounds"][0]["score"],
                len(finished),
                len(todo),
            )
            bar.update(1)
            bar.set_postfix(best=f"{np.mean([q['best_score'] for q in finished]):.3f}")

        await asyncio.gather(*(one(i, t) for i, t in todo))
    return finished


# ------------------------------------------------------------------------------------------- report and CLI


def summarize(queries: Sequence[dict], dropped: Mapping[str, int], kept: int) -> dict[str, Any]:
    """What the run did, over all queries in rounds.jsonl."""
    designed = [r for q in queries for r in q["rounds"] if r["designer"] is not None]

    def mean(values) -> float | None:
        values = list(values)
        return float(np.mean(values)) if values else None

    return {
        "queries": len(queries),
        "designer_rounds": len(designed),
        "format_failures": sum(r["format_error"] is not None for r in designed),
        "format_failure_rate": mean(r["format_error"] is not None for r in designed),
        "validation_seed": mean(q["rounds"][0]["score"] for q in queries),
        "validation_best": mean(q["best_score"] for q in queries),
        "improved_queries": sum(q["best_score"] > q["rounds"][0]["score"] for q in queries),
        "hidden_seed": mean(q["hidden"]["1"]["score"] for q in queries),
        "hidden_best": mean(q["hidden"][str(q["best_round"])]["score"] for q in queries),
        "solved_seed": mean(q["hidden"]["1"]["solved"] for q in queries),
        "solved_best": mean(q["hidden"][str(q["best_round"])]["solved"] for q in queries),
        "worker_calls_per_run": mean(run["worker_calls"] for q in queries for r in q["rounds"] for run in r["runs"]),
        "worker_tokens_per_run": mean(run["worker_tokens"] for q in queries for r in q["rounds"] for run in r["runs"]),
        "designer_completion_tokens": sum(r["designer"]["completion_tokens"] for r in designed),
        "sft_records": kept,
        "sft_dropped": dict(dropped),
    }


def build_sft(cfg: OptimizeConfig) -> dict[str, Any]:
    """sft.jsonl and summary.json from rounds.jsonl, with the configured filter."""
    out_dir = pathlib.Path(cfg.out_dir)
    rounds_path = out_dir / "rounds.jsonl"
    if not rounds_path.is_file():
        raise ConfigError(f"{rounds_path} does not exist: run the loop first (without --sft-only)")
    queries = sorted(read_jsonl(rounds_path), key=lambda q: q["index"])  # task order, however they finished
    f = cfg.filter
    records, dropped = sft_records(queries, RecordFilter(f.min_score, f.min_gain, f.best_per_query))
    write_jsonl(out_dir / "sft.jsonl", records)
    summary = summarize(queries, dropped, len(records))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@contextlib.contextmanager
def _services(cfg: OptimizeConfig, log_dir: pathlib.Path) -> Iterator[tuple[str, str, str | None]]:
    """(designer URL, sandbox URL, worker URL or None) with whatever the config launches started."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        local_url = None
        if cfg.local_server is not None:
            s = cfg.local_server
            server = stack.enter_context(
                launch_local(
                    s.model,
                    context_length=s.context_length,
                    max_running_requests=s.max_running_requests,
                    startup_timeout=s.startup_timeout_s,
                    env=server_env(),
                    log_path=log_dir / "local_server.log",
                )
            )
            local_url = f"{server.url}/v1"
        designer_url = local_url if cfg.designer.url == LOCAL else cfg.designer.url
        worker_url = local_url if cfg.worker.url == LOCAL else cfg.worker.url
        if cfg.sandbox.launch == "none":
            yield designer_url, cfg.sandbox.url, worker_url
            return
        spec = f"{cfg.worker.name}={worker_url}" + (f",model={cfg.worker.model}" if cfg.worker.model else "")
        sandbox = stack.enter_context(
            LocalSandbox(
                workers=cfg.sandbox.workers,
                insecure=cfg.sandbox.insecure,
                extra_args=["--worker", spec],
                log_path=log_dir / "sandbox.log",
            )
        )
        yield designer_url, sandbox.url, worker_url


async def _operators_text(sandbox: SandboxClient, cfg: OptimizeConfig) -> str:
    """The operator descriptions, after checking that the sandbox allowlists the worker."""
    async with httpx.AsyncClient(base_url=sandbox.base_url, timeout=60.0) as http:
        response = await http.get("/workflow/workers")
    response.raise_for_status()
    workers = response.json()["workers"]
    if cfg.worker.name not in workers:
        raise ConfigError(f"worker.name={cfg.worker.name!r} is not on the sandbox's allowlist {workers}")
    return (await sandbox.workflow_operators()).text


def run(cfg: OptimizeConfig) -> dict[str, Any]:
    """The refinement loop over the configured tasks, then the SFT records and the summary."""
    out_dir = pathlib.Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tasks = load_config_tasks(cfg.tasks)
    with _services(cfg, out_dir / "logs") as (designer_url, sandbox_url, worker_url):
        d = cfg.designer
        setup = {
            "designer": {
                "url": designer_url,
                "model": d.model,
                "temperature": d.temperature,
                "top_p": d.top_p,
                "max_tokens": d.max_tokens,
            },
            "worker": {
                "name": cfg.worker.name,
                "url": worker_url,
                "model": cfg.worker.model,
                "temperature": cfg.worker.temperature,
                "max_tokens": cfg.worker.max_tokens,
            },
            "budgets": cfg.budgets.model_dump(),
            "source": f"fr_jax.flow.optimize {fr_jax.__version__}",
        }

        async def go() -> None:
            designer = ChatClient(
                designer_url, model=d.model, api_key_env=d.api_key_env, timeout_s=d.timeout_s, max_retries=d.max_retries
            )
            try:
                # a run may wait for a jail slot behind many others: give each request far more than its wall_s
                wait_s = max(300.0, 10 * cfg.budgets.wall_s)
                async with SandboxClient(sandbox_url, request_timeout_s=wait_s, deadline_s=2 * wait_s) as sandbox:
                    operators_text = await _operators_text(sandbox, cfg)
                    optimizer = Optimizer(cfg, sandbox, designer, operators_text, setup)
                    await optimize_tasks(optimizer, tasks, out_dir / "rounds.jsonl")
            finally:
                await designer.aclose()

        asyncio.run(go())
    return build_sft(cfg)


def report(summary: Mapping[str, Any]) -> str:
    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return "\n".join(
        [
            f"{summary['queries']} queries, {summary['designer_rounds']} designed rounds "
            f"({summary['format_failures']} format failures)",
            f"  validation score (public tests): seed {fmt(summary['validation_seed'])} -> best round "
            f"{fmt(summary['validation_best'])} ({summary['improved_queries']} queries improved)",
            f"  hidden pass rate: seed {fmt(summary['hidden_seed'])} -> best round {fmt(summary['hidden_best'])}; "
            f"solved: seed {fmt(summary['solved_seed'])} -> best round {fmt(summary['solved_best'])}",
            f"  worker per run: {fmt(summary['worker_calls_per_run'])} calls, "
            f"{fmt(summary['worker_tokens_per_run'])} tokens",
            f"  SFT records: {summary['sft_records']} kept, dropped {summary['sft_dropped']}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fr_jax.flow.optimize", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (configs/flow_optimize_demo.yaml)")
    parser.add_argument("--sft-only", action="store_true", help="rebuild sft.jsonl and summary.json from rounds.jsonl")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress
    try:
        cfg = load_config(args.config, args.overrides, OptimizeConfig)
        summary = build_sft(cfg) if args.sft_only else run(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(report(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
