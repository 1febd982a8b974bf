"""`python -m fr_jax.flow.optimize --config FILE.yaml [key.sub=value ...] [--sft-only | --best-fixed] [--form F]`:
FlowReasoner's per-query refinement loop, and the distillation data it yields.

For every query, loop.rounds rounds:
1. Round 1 runs the seed workflow (one CustomCodeGenerate call).
2. Round r > 1 picks a parent among the candidates: round 1 and the best other rounds by score, loop.candidates
   in all (AFlow's top rounds, 4 in FlowReasoner), with p = 0.3 * uniform + 0.7 * softmax(0.2 * (100 * score -
   max)). The designer sees the parent's graph, prompt, score and validation feedback and the experience list,
   what every earlier modification of that parent did ("modification X took the score from a to b"), and changes
   one detail.
3. A design that parses is run loop.validation_runs times on the public tests (3 in FlowReasoner); its score is
   the mean pass rate, a failed run counting 0. A design that cannot be parsed or loaded is a format failure: it
   scores 0 in its parent's experience and can never be a parent.
4. Then the best round (highest score, earliest on ties) and the seed are run on the hidden tests.

The designer (designer.kind) is `chat`, any OpenAI-compatible endpoint (DeepSeek-R1 or o1-mini anywhere, or
fr_jax.serve; reasoning from a <think> block or the API's reasoning_content field), or `search`, the offline search
teacher of fr_jax.flow.teacher: a seeded search over the operator grammar, not an LLM, so the recipe runs on a
machine without a teacher model. The worker is a name on the sandbox's allowlist; a sandbox launched here allowlists
worker.url under that name. `url: local` means the fr_jax.serve this command starts from the local_server section.

Written to out_dir:
- rounds.jsonl: one line per finished query (in the order they finish) with every round: designer exchange,
  design, runs and their feedback. Queries already there are skipped when the command runs again, so an
  interrupted run resumes.
- sft.jsonl: SFT records (fr_jax.flow.data), rebuilt from rounds.jsonl each time: records.form `query` (one per
  query: the policy's own prompt in, every round's reasoning and feedback then the best design out; the default)
  or `rounds` (one per designed round), kept by filter.*. --sft-only rebuilds it without running anything, --form
  picks the form.
- summary.json: scores before and after refinement, format failures, records kept and dropped.
- best_fixed.json, with --best-fixed after a run: the one design best on average over all the run's queries (the
  task-level baseline `best_fixed`, fr_jax.flow.baselines); leading designs are run on the queries they were not
  tried on.

Exit status 0 done, 2 a mistake in the config or setup (one line; --debug for the traceback). Settings, outputs and
measured runs: docs/flow.md.
"""

from __future__ import annotations

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
from fr_jax import cli
from fr_jax.config import ConfigError, RewardConfig, Section, TaskSetSection, check_external_url, load_config
from fr_jax.data.jsonl import read_jsonl, write_jsonl
from fr_jax.data.task_file import load_task_set
from fr_jax.data.tasks import Task
from fr_jax.flow.baselines import best_fixed
from fr_jax.flow.chat import ChatClient
from fr_jax.flow.data import RecordFilter, sft_records
from fr_jax.flow.feedback import RunRecord, feedback_text
from fr_jax.flow.mode import FLOW_SYSTEM_PROMPT, WorkflowMode, WorkflowRunSettings, is_design_failure, run_design
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
from fr_jax.flow.teacher import ChatDesigner, Designer, DesignRequest, SearchDesigner
from fr_jax.rl.modes import WorkerSpec
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
    kind: Literal["chat", "search"] = "chat"  # chat: a model behind url; search: the offline search teacher
    url: str | None = None  # kind chat: OpenAI-compatible base URL ending in /v1, or `local`
    model: str | None = None  # the request's `model` field (null: left out)
    api_key_env: str | None = None  # environment variable holding a bearer token
    temperature: float = Field(0.0, ge=0, le=2)  # FlowReasoner's teacher: DeepSeek-R1 at temperature 0
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(8192, ge=1)
    system: str | None = FLOW_SYSTEM_PROMPT
    timeout_s: float = Field(1800.0, gt=0)  # per request: a reasoning teacher may think for minutes
    max_retries: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _kind(self):
        if self.kind == "chat" and self.url is None:
            raise ValueError(
                "designer.url is required with designer.kind chat (an OpenAI-compatible base URL ending in /v1, or "
                "`local`); or set designer.kind: search for the offline search teacher"
            )
        if self.kind == "search" and (self.url, self.model, self.api_key_env) != (None, None, None):
            raise ValueError(
                "designer.url, model and api_key_env are for designer.kind chat: the search calls no model"
            )
        return self


class WorkerSection(Section):
    name: str = "local"  # the name on the sandbox's allowlist
    url: str | None = None  # allowlisted under `name` when the sandbox is launched here; or `local`
    model: str | None = None  # the `model` field the sandbox sends (default: the name)
    api_key_env: str | None = None  # a hosted worker: the sandbox's environment variable holding its API key
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


class RecordsSection(Section):
    form: Literal["query", "rounds"] = "query"  # query: FlowReasoner's one record per query; rounds: one per round
    # the policy's system turn in query-form records: the GRPO run's grpo.prompt.system (FLOW_SYSTEM_PROMPT there
    # when that is null)
    system: str = FLOW_SYSTEM_PROMPT


class BestFixedSection(Section):
    candidates: int = Field(4, ge=1)  # designs (best by mean score where tried) run on every query to pick best_fixed


class OptimizeConfig(Section):
    out_dir: str
    tasks: TasksSection
    designer: DesignerSection
    worker: WorkerSection = WorkerSection()
    budgets: BudgetsSection = BudgetsSection()
    loop: LoopSection = LoopSection()
    sandbox: SandboxSection = SandboxSection()
    filter: FilterSection = FilterSection()
    records: RecordsSection = RecordsSection()
    best_fixed: BestFixedSection = BestFixedSection()
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


def derived_seed(*key: int) -> int:
    """The seed of one draw of the loop, from (loop.seed, query index, round, ...): reruns draw the same."""
    return int(np.random.default_rng(list(key)).integers(0, _SEED_LIMIT))


class DesignRunner:
    """Runs designs on a query through the sandbox with the configured worker and budgets; each run's worker seed
    comes from (loop.seed, query, round, public or hidden, run)."""

    def __init__(self, cfg: OptimizeConfig, sandbox: SandboxClient):
        self.cfg, self.sandbox = cfg, sandbox
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

    async def runs(
        self, task: Task, design: ParsedDesign, count: int, index: int, number: int, *, hidden: bool
    ) -> list[WorkflowRun]:
        seeds = [derived_seed(self.cfg.loop.seed, index, number, int(hidden), i) for i in range(count)]
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

    async def validate(
        self, task: Task, index: int, number: int, design: ParsedDesign
    ) -> tuple[tuple[RunRecord, ...], float, str | None]:
        """loop.validation_runs runs on the public tests: their records, the score (mean pass rate) and the format
        error of a design that parsed but could not be compiled or loaded (score 0)."""
        runs = await self.runs(task, design, self.cfg.loop.validation_runs, index, number, hidden=False)
        records = tuple(RunRecord.of(run) for run in runs)
        loading = next((run for run in runs if is_design_failure(run)), None)
        if loading is not None:
            return records, 0.0, f"{loading.failure.kind}: {loading.failure.message}"
        return records, float(np.mean([r.pass_rate for r in records])), None


class Optimizer:
    """The refinement loop of one run: one designer, one sandbox, one worker, settings from the config."""

    def __init__(
        self,
        cfg: OptimizeConfig,
        runner: DesignRunner,
        designer: Designer,
        operators_text: str,
        setup: dict[str, Any],
    ):
        self.cfg, self.runner, self.designer, self.operators_text = cfg, runner, designer, operators_text
        self.setup = setup  # what produced the data (designer and worker settings), written with every query
        # the prompt the policy gets for the query in GRPO and at inference: the query-form SFT records' input
        self.policy = WorkflowMode(
            reward=RewardConfig(max_operator_calls=cfg.loop.max_operator_calls_told),
            run=runner.settings,
            operators_text=operators_text,
            system=cfg.records.system,
        )

    async def _validated(self, task: Task, index: int, number: int, design: ParsedDesign, **fields) -> Round:
        """A round whose design parsed: run it on the public tests."""
        records, score, format_error = await self.runner.validate(task, index, number, design)
        return Round(
            number,
            modification=design.modification,
            graph=design.graph,
            prompt=design.prompt,
            score=score,
            runs=records,
            format_error=format_error,
            warnings=design.warnings,
            **fields,
        )

    async def _designed(self, task: Task, index: int, number: int, rounds: list[Round]) -> Round:
        scores = {r.round: r.score for r in rounds if r.runnable}
        candidates = candidate_rounds(scores, self.cfg.loop.candidates)
        probabilities = parent_probabilities([scores[c] for c in candidates])
        rng = np.random.default_rng([self.cfg.loop.seed, index, number])
        drawn = candidates[rng.choice(len(candidates), p=probabilities)]  # once: not inside the search below
        parent = next(r for r in rounds if r.round == drawn)
        experience = tuple(experience_for(parent.round, rounds))
        user = build_design_prompt(
            task.prompt,
            self.operators_text,
            parent=ParentDesign(parent.graph, parent.prompt, parent.score, feedback_text(parent.score, parent.runs)),
            experience=experience,
            max_operator_calls=self.cfg.loop.max_operator_calls_told,
        )
        system = self.cfg.designer.system
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        reply = await self.designer.design(
            DesignRequest(
                messages=messages,
                parent_round=parent.round,
                parent_graph=parent.graph,
                parent_prompt=parent.prompt,
                parent_score=parent.score,
                parent_runs=parent.runs,
                experience=experience,
                tried=tuple((r.graph, r.prompt) for r in rounds),
                seed=derived_seed(self.cfg.loop.seed, index, number),
            )
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
            runs = await self.runner.runs(task, design, self.cfg.loop.final_runs, index, r, hidden=True)
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
            "policy_messages": self.policy.messages(task),
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


def summarize(queries: Sequence[dict], form: str, dropped: Mapping[str, int], kept: int) -> dict[str, Any]:
    """What the run did, over all queries in rounds.jsonl."""
    designed = [r for q in queries for r in q["rounds"] if r["designer"] is not None]

    def mean(values) -> float | None:
        values = list(values)
        return float(np.mean(values)) if values else None

    tokens = [r["designer"]["completion_tokens"] for r in designed if r["designer"]["completion_tokens"] is not None]
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
        "designer_completion_tokens": sum(tokens) if tokens else None,  # None: the designer reports none (search)
        "seconds": sum(q["seconds"] for q in queries),
        "sft_form": form,
        "sft_records": kept,
        "sft_dropped": dict(dropped),
    }


def _finished_queries(cfg: OptimizeConfig) -> list[dict]:
    rounds_path = pathlib.Path(cfg.out_dir) / "rounds.jsonl"
    if not rounds_path.is_file():
        raise ConfigError(f"{rounds_path} does not exist: run the loop first (without --sft-only or --best-fixed)")
    return sorted(read_jsonl(rounds_path), key=lambda q: q["index"])  # task order, however they finished


def build_sft(cfg: OptimizeConfig) -> dict[str, Any]:
    """sft.jsonl and summary.json from rounds.jsonl, with the configured form and filter."""
    out_dir = pathlib.Path(cfg.out_dir)
    queries = _finished_queries(cfg)
    f = cfg.filter
    try:
        records, dropped = sft_records(
            queries, RecordFilter(f.min_score, f.min_gain, f.best_per_query), cfg.records.form
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    write_jsonl(out_dir / "sft.jsonl", records)
    summary = summarize(queries, cfg.records.form, dropped, len(records))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@contextlib.contextmanager
def _services(cfg: OptimizeConfig, log_dir: pathlib.Path) -> Iterator[tuple[str | None, str, str | None]]:
    """(designer URL or None, sandbox URL, worker URL or None) with whatever the config launches started."""
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
        spec = WorkerSpec(cfg.worker.name, worker_url, cfg.worker.model, cfg.worker.api_key_env).allowlist_entry(None)
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


def _sandbox_client(cfg: OptimizeConfig, url: str) -> SandboxClient:
    # a run may wait for a jail slot behind many others: give each request far more than its wall_s
    wait_s = max(300.0, 10 * cfg.budgets.wall_s)
    return SandboxClient(url, request_timeout_s=wait_s, deadline_s=2 * wait_s)


def _designer(cfg: OptimizeConfig, url: str | None) -> tuple[Designer, dict[str, Any]]:
    """The configured designer and its settings as the data's provenance records them."""
    d = cfg.designer
    if d.kind == "search":
        teacher = SearchDesigner(
            max_call_sites=cfg.loop.max_operator_calls_told, max_operator_calls=cfg.budgets.max_operator_calls
        )
        return teacher, {"kind": "search", "teacher": "fr_jax.flow.teacher.SearchDesigner", "seed": cfg.loop.seed}
    client = ChatClient(url, model=d.model, api_key_env=d.api_key_env, timeout_s=d.timeout_s, max_retries=d.max_retries)
    chat = ChatDesigner(client, temperature=d.temperature, top_p=d.top_p, max_tokens=d.max_tokens)
    settings = {
        "url": url,
        "model": d.model,
        "temperature": d.temperature,
        "top_p": d.top_p,
        "max_tokens": d.max_tokens,
    }
    return chat, {"kind": "chat", **settings}


def run(cfg: OptimizeConfig) -> dict[str, Any]:
    """The refinement loop over the configured tasks, then the SFT records and the summary."""
    out_dir = pathlib.Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tasks = load_config_tasks(cfg.tasks)
    with _services(cfg, out_dir / "logs") as (designer_url, sandbox_url, worker_url):

        async def go() -> None:
            designer, designer_setup = _designer(cfg, designer_url)
            setup = {
                "designer": designer_setup,
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
            try:
                async with _sandbox_client(cfg, sandbox_url) as sandbox:
                    operators_text = await _operators_text(sandbox, cfg)
                    optimizer = Optimizer(cfg, DesignRunner(cfg, sandbox), designer, operators_text, setup)
                    await optimize_tasks(optimizer, tasks, out_dir / "rounds.jsonl")
            finally:
                await designer.aclose()

        asyncio.run(go())
    return build_sft(cfg)


def pick_best_fixed(cfg: OptimizeConfig) -> dict[str, Any]:
    """best_fixed.json: the single design of rounds.jsonl with the best mean validation score over all its queries
    (fr_jax.flow.baselines.best_fixed; the best_fixed.candidates leading designs are run on the queries they were
    not tried on, loop.concurrency at a time, with the configured sandbox, worker and budgets)."""
    queries = _finished_queries(cfg)
    tasks = {task.task_id: (index, task) for index, task in enumerate(load_config_tasks(cfg.tasks))}
    missing = [q["task_id"] for q in queries if q["task_id"] not in tasks]
    if missing:
        raise ConfigError(f"rounds.jsonl holds queries that tasks.* does not give: {missing[:5]}")
    out_dir = pathlib.Path(cfg.out_dir)
    with _services(cfg, out_dir / "logs") as (_, sandbox_url, _):

        async def go() -> dict[str, Any]:
            async with _sandbox_client(cfg, sandbox_url) as sandbox:
                await _operators_text(sandbox, cfg)  # the worker is on the allowlist
                runner = DesignRunner(cfg, sandbox)
                gate = asyncio.Semaphore(cfg.loop.concurrency)

                async def validate(task_id: str, design: ParsedDesign) -> float:
                    index, task = tasks[task_id]
                    async with gate:
                        return (await runner.validate(task, index, 0, design))[1]  # "round 0": seeds no round uses

                return await best_fixed(queries, validate, candidates=cfg.best_fixed.candidates)

        choice = asyncio.run(go())
    (out_dir / "best_fixed.json").write_text(json.dumps(choice, indent=2) + "\n")
    return choice


def report(summary: Mapping[str, Any]) -> str:
    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    unit = "queries" if summary["sft_form"] == "query" else "rounds"
    return "\n".join(
        [
            f"{summary['queries']} queries, {summary['designer_rounds']} designed rounds "
            f"({summary['format_failures']} format failures), {summary['seconds']:.0f} s of query time",
            f"  validation score (public tests): seed {fmt(summary['validation_seed'])} -> best round "
            f"{fmt(summary['validation_best'])} ({summary['improved_queries']} queries improved)",
            f"  hidden pass rate: seed {fmt(summary['hidden_seed'])} -> best round {fmt(summary['hidden_best'])}; "
            f"solved: seed {fmt(summary['solved_seed'])} -> best round {fmt(summary['solved_best'])}",
            f"  worker per run: {fmt(summary['worker_calls_per_run'])} calls, "
            f"{fmt(summary['worker_tokens_per_run'])} tokens",
            f"  SFT records ({summary['sft_form']} form): {summary['sft_records']} kept, dropped {unit} "
            f"{summary['sft_dropped']}",
        ]
    )


def _best_fixed_report(choice: Mapping[str, Any]) -> str:
    return (
        f"best_fixed over {len(choice['scores'])} queries: {choice['design']['modification']!r} scored "
        f"{choice['score']:.3f} (mean validation score); candidates: "
        + ", ".join(f"{c['score']:.3f}" for c in choice["candidates"])
    )


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m fr_jax.flow.optimize", __doc__)
    parser.add_argument("--config", required=True, help="YAML config (configs/flow_optimize_demo.yaml)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--sft-only", action="store_true", help="rebuild sft.jsonl and summary.json from rounds.jsonl")
    what.add_argument(
        "--best-fixed", action="store_true", help="pick best_fixed.json, the one design best over every query"
    )
    parser.add_argument(
        "--form", choices=["query", "rounds"], help="the SFT records' form (records.form; default: query)"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    args = parser.parse_intermixed_args(argv)
    return cli.run(_main, args)


def _main(args) -> int:
    overrides = [*args.overrides, *([f"records.form={args.form}"] if args.form else [])]
    cfg = load_config(args.config, overrides, OptimizeConfig)
    if args.best_fixed:
        print(_best_fixed_report(pick_best_fixed(cfg)), flush=True)
        return 0
    summary = build_sft(cfg) if args.sft_only else run(cfg)
    print(report(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
