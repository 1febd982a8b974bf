"""Setup: what a GRPO run and an evaluation build from the `grpo:` config before their first rollout.

- The mode, from the table the CLIs hand down (fr_jax.cli.MODES); building it starts nothing.
- The services, in the order a run needs them: first a check that every service the run does not start itself
  answers (before any weight is loaded: a 7B user must not wait minutes for that error); the sandbox (launched
  here on loopback, allowlisting the mode's worker, or the one at `url`), on which the mode then fetches what its
  prompts need; the rollout server (fr_jax's engine or real SGLang launched here, or the one at `url`), or a fleet
  of them (`replicas` launched here, or `urls`) behind sglang-router started here, whose address (the server's, or
  the router's) is chosen up front so that a sandbox launched before it can allowlist it as the worker.
- The tasks of a split with their prompt tokens, and the sampling parameters.
Services stop when their `with` block ends, also on an error; their logs go to the run directory. Only process 0
of a multi-process run talks to them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx

from fr_jax.config import ConfigError, GRPORolloutSection, GRPOSandboxSection, GRPOSection, service_urls
from fr_jax.data.task_file import load_task_set
from fr_jax.data.tasks import Task
from fr_jax.rl.batch import Layout
from fr_jax.rl.modes import ROLLOUT_WORKER, Mode
from fr_jax.rollout import RolloutClient, RolloutFleet, free_port, launch_router, launch_server
from fr_jax.rollout.protocol import SamplingParams
from fr_jax.sandbox.local import LocalSandbox
from fr_jax.sandbox.session import SandboxSession

_log = logging.getLogger(__name__)
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")

ModeBuilder = Callable[[GRPOSection, Any], Mode]  # (the grpo: section, the policy's tokenizer) -> a mode


# ------------------------------------------------------------------------------------------ mode and tasks


def build_mode(grpo: GRPOSection, tokenizer, modes: Mapping[str, ModeBuilder]) -> Mode:
    if grpo.mode not in modes:
        raise ConfigError(f"grpo.mode={grpo.mode!r}: known modes are {sorted(modes)}")
    return modes[grpo.mode](grpo, tokenizer)


def encode_prompt(tokenizer, messages: list[dict[str, str]], *, chat_template: bool) -> list[int]:
    """Token ids of the prompt: the chat template with the assistant turn opened, or the user text alone. Prompts
    are sent to the server as ids, so it samples after exactly the tokens the trainer scores."""
    if chat_template:
        if tokenizer.chat_template is None:
            raise ConfigError("grpo.prompt.chat_template is true but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode("\n\n".join(m["content"] for m in messages))


def _reference_lines(task: Task) -> int | None:
    if task.reference_solution is None:
        return None
    return sum(1 for line in task.reference_solution.splitlines() if line.strip())


def load_prompts(
    grpo: GRPOSection, split: str, mode: Mode, tokenizer, *, limit: int | None
) -> tuple[list[Task], list[list[int]]]:
    """The tasks of `split` that pass grpo.data's filters (first `limit` of them), and their prompt tokens."""
    data = grpo.data
    try:
        tasks = load_task_set(data.dataset, split, file=data.file, data_dir=data.data_dir)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"grpo.data ({data.dataset}, split {split!r}): {err}") from None
    loaded = len(tasks)
    if data.max_reference_lines is not None:
        tasks = [t for t in tasks if (_reference_lines(t) or 0) and _reference_lines(t) <= data.max_reference_lines]
    prompts = [encode_prompt(tokenizer, mode.messages(t), chat_template=grpo.prompt.chat_template) for t in tasks]
    kept = [(t, p) for t, p in zip(tasks, prompts) if len(p) <= data.max_prompt_tokens]
    kept = kept[:limit] if limit is not None else kept
    _log.info(
        "%s/%s: %d tasks loaded, %d with a reference of <= %s lines, %d with a prompt of <= %d tokens; using %d",
        data.dataset,
        split,
        loaded,
        len(tasks),
        data.max_reference_lines,
        len([p for p in prompts if len(p) <= data.max_prompt_tokens]),
        data.max_prompt_tokens,
        len(kept),
    )
    if not kept:
        raise ConfigError(
            f"grpo.data: no task of {data.dataset}/{split} passes the filters (max_reference_lines="
            f"{data.max_reference_lines}, max_prompt_tokens={data.max_prompt_tokens})"
        )
    return [t for t, _ in kept], [p for _, p in kept]


@dataclasses.dataclass
class TrainingTasks:
    """What process 0 samples from and evaluates on, and the rows' layout every process trains with."""

    train: list[Task]
    prompt_of: dict[str, list[int]]  # a training task's prompt tokens
    heldout: list[Task]
    heldout_prompts: list[list[int]]
    layout: Layout


def training_tasks(grpo: GRPOSection, mode: Mode, tokenizer, context_length: int) -> TrainingTasks:
    """The training and held-out splits with their prompt tokens; the longest training prompt fixes the layout."""
    d = grpo.data
    train, prompts = load_prompts(grpo, d.train_split, mode, tokenizer, limit=d.train_limit)
    heldout, heldout_prompts = load_prompts(grpo, d.eval_split, mode, tokenizer, limit=d.eval_limit)
    layout = Layout(max(map(len, prompts)), grpo.rollout.max_new_tokens)
    if layout.prompt_len + layout.response_len > context_length:
        raise ConfigError(
            f"the longest training prompt ({layout.prompt_len} tokens) + grpo.rollout.max_new_tokens "
            f"({layout.response_len}) exceed the model's context ({context_length}); lower grpo.data.max_prompt_tokens"
        )
    return TrainingTasks(train, dict(zip((t.task_id for t in train), prompts)), heldout, heldout_prompts, layout)


def rollout_params(grpo: GRPOSection) -> SamplingParams:
    r = grpo.rollout
    return SamplingParams(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        stop=list(r.stop) or None,
        no_stop_trim=bool(r.stop),
    )


def eval_params(grpo: GRPOSection) -> SamplingParams:
    return rollout_params(grpo).model_copy(
        update={
            "temperature": grpo.eval.temperature,
            "max_new_tokens": grpo.eval.max_new_tokens or grpo.rollout.max_new_tokens,
        }
    )


# ------------------------------------------------------------------------------------------------ services


def _answers(url: str, path: str) -> str | None:
    """None when something at `url` answers HTTP on `path` (any status), else why not."""
    try:
        httpx.get(f"{url.rstrip('/')}{path}", timeout=10.0)
    except httpx.HTTPError as err:
        return f"{type(err).__name__}: {err}"
    return None


def check_external_services(grpo: GRPOSection, mode: Mode) -> None:
    """Every service the run uses but does not start must answer now; one ConfigError names the first that does
    not and the key that points at it."""
    worker = mode.worker
    checks = []
    if grpo.rollout.launch == "none":
        for url in service_urls(grpo.rollout):
            checks.append(("grpo.rollout.url", url, "/health", "start the rollout server"))
    if grpo.sandbox.launch == "none":
        for url in service_urls(grpo.sandbox):
            checks.append(("grpo.sandbox.url", url, "/health", "start `python -m sandbox_service`"))
    if grpo.sandbox.launch == "local" and worker is not None and worker.url not in (None, ROLLOUT_WORKER):
        checks.append(("grpo.workflow.worker_url", worker.url, "/models", "start the worker LLM's server"))
    for key, url, path, fix in checks:
        problem = _answers(url, path)
        if problem is not None:
            raise ConfigError(f"{key}={url}: nothing answers there ({problem}); {fix} or fix the url")


def server_env() -> dict[str, str]:
    """The environment of a local server: this process's, less a faked CPU device count (tests fake 8 devices;
    the server should see the machine's own)."""
    env = dict(os.environ)
    if "XLA_FLAGS" in env:
        env["XLA_FLAGS"] = _DEVICE_COUNT_FLAG.sub("", env["XLA_FLAGS"]).strip()
    return env


def planned_rollout(section: GRPORolloutSection) -> tuple[str, int | None]:
    """Where generation will go (the rollout server, or the router in front of a fleet), known before it starts, and
    the port to launch it on (None: a running server)."""
    if section.launch == "none" and section.router == "none":
        assert section.url is not None
        return section.url, None
    port = free_port()
    return f"http://127.0.0.1:{port}", port


@contextlib.contextmanager
def sandbox_session(
    section: GRPOSandboxSection, mode: Mode, *, rollout_url: str | None, log_dir: pathlib.Path
) -> Iterator[SandboxSession]:
    """A session on the sandbox (or on a fleet of them: `urls`, or `replicas` launched here), healthy, with `mode`
    prepared on it. A launched sandbox allowlists the mode's worker; a running one has its own allowlist."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if section.launch == "none":
            urls = service_urls(section)
        else:
            entry = mode.worker.allowlist_entry(rollout_url) if mode.worker is not None else None
            flags = ["--worker", entry] if entry else []
            flags += [arg for name, path in section.pythons.items() for arg in ("--python", f"{name}={path}")]
            urls = []
            for i in range(section.replicas):
                log_path = log_dir / ("sandbox.log" if section.replicas == 1 else f"sandbox_{i}.log")
                local = LocalSandbox(
                    workers=section.workers, insecure=section.insecure, log_path=log_path, extra_args=flags
                )
                urls.append(stack.enter_context(local).url)
                _log.info("sandbox_service at %s (log %s)", urls[-1], log_path)
        session = stack.enter_context(SandboxSession(urls))
        session.run(lambda sandbox: sandbox.health())
        session.run(mode.prepare)
        yield session


@contextlib.contextmanager
def rollout_service(
    section: GRPORolloutSection,
    model_dir,
    *,
    weight_version: str,
    seed: int,
    log_dir: pathlib.Path,
    port: int | None,
) -> Iterator[RolloutFleet]:
    """The rollout servers: launched ones (the one on `port` without a router) serve `model_dir` (weights +
    tokenizer) as `weight_version`; servers at `url`/`urls` are used as they are (the caller syncs their weights).
    With a router (started here on `port`) generation goes through it, each prompt its own request, twice as many
    at a time as all servers run at once (max_running_requests), so that none waits idle for its next request."""
    log_dir.mkdir(parents=True, exist_ok=True)
    routed = section.router != "none"
    with contextlib.ExitStack() as stack:
        if section.launch == "none":
            urls = service_urls(section)
        else:
            urls = []
            for i in range(section.replicas):
                flags: dict[str, Any] = dict(weight_version=weight_version, random_seed=seed)
                flags["port"] = None if routed else port
                if section.launch == "local":
                    flags.update(
                        mesh=section.mesh,
                        max_running_requests=section.max_running_requests,
                        scheduling=section.scheduling,
                        num_continuous_decode_steps=section.decode_steps,
                        env=server_env(),
                    )
                name = f"rollout_server_{section.launch}" + (f"_{i}" if section.replicas > 1 else "")
                process = launch_server(
                    section.launch,
                    model_dir,
                    startup_timeout=section.startup_timeout_s,
                    log_path=log_dir / f"{name}.log",
                    **flags,
                )
                urls.append(stack.enter_context(process).url)
        workers = [stack.enter_context(RolloutClient(url, max_retries=section.max_retries)) for url in urls]
        for worker in workers:
            worker.wait_healthy(timeout=section.startup_timeout_s)
        if not routed:
            yield RolloutFleet(workers[0], workers)
            return
        router = launch_router(
            urls,
            policy=section.router_policy,
            port=port,
            startup_timeout=section.startup_timeout_s,
            log_path=log_dir / "sglang_router.log",
        )
        stack.enter_context(router)
        _log.info("sglang-router at %s (policy %s) in front of %s", router.url, section.router_policy, urls)
        concurrency = 2 * len(urls) * section.max_running_requests
        client = stack.enter_context(
            RolloutClient(router.url, max_retries=section.max_retries, concurrency=concurrency)
        )
        yield RolloutFleet(client, workers)


def weights_dir(configured: str | None, run_dir: pathlib.Path) -> tuple[pathlib.Path, bool]:
    """Where weights are written for the rollout server, and whether it is a scratch folder to remove at the end.

    By default a folder in /dev/shm (memory: the write and the server's read cost no disk) named after the run
    directory, so a run killed before its clean-up leaves one stale copy that its resumption reuses, not one per
    attempt. Without a writable /dev/shm: <run_dir>/rollout_weights."""
    if configured:
        return pathlib.Path(configured), False
    shm = pathlib.Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        digest = hashlib.sha1(str(run_dir.absolute()).encode()).hexdigest()[:12]
        return shm / f"fr_jax-weights-{digest}", True
    return run_dir / "rollout_weights", False
