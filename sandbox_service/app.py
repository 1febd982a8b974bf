"""HTTP routes, admission control and graceful draining.

Admission counts jailed runs, not connections: a request for k runs (a batch of k evaluations) is admitted
when the runs already in the system plus k fit in workers + max_queue (or when the system is idle, so an
oversized batch still runs). Anything else gets 429 with Retry-After; nothing is queued unboundedly and
every admitted request gets an answer: results, or a SandboxError saying why.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from sandbox_service import __version__
from sandbox_service.cgroups import Cgroups
from sandbox_service.jail import Isolation, Jail, JailConfig, Limits, RunOutcome
from sandbox_service.judge import Judge
from sandbox_service.metrics import Metrics
from sandbox_service.operators import describe_operators, operators_text
from sandbox_service.pythons import DEFAULT as DEFAULT_PYTHON
from sandbox_service.pythons import UnknownPython, python_path
from sandbox_service.schemas import (
    CODE_FILE,
    CommandResult,
    EvaluateBatchRequest,
    EvaluateBatchResponse,
    EvaluateRequest,
    EvaluateResponse,
    HealthResponse,
    OperatorsResponse,
    RunCodeRequest,
    RunCodeResponse,
    WorkflowRunRequest,
    WorkflowRunResponse,
)
from sandbox_service.workers import WorkerEndpoint, workers_from_env
from sandbox_service.workflow import WorkflowRunner

_log = logging.getLogger(__name__)
# A workflow is admitted as two runs: its graph, and its test runs (one at a time: the Test operator's, then the
# solution's scoring), so that test runs never wait on admission behind other requests.
WORKFLOW_RUNS = 2


@dataclass(frozen=True)
class ServiceSettings:
    workers: int
    max_queue: int = 256
    max_output_bytes: int = 1 << 20
    max_body_bytes: int = 32 << 20
    default_memory_mb: int = 1024
    drain_timeout_s: float = 30.0
    max_eval_s: float = 300.0
    worker_timeout_s: float = 120.0
    max_workflow_wait_s: float = 600.0
    harness_start_s: float = 30.0
    auth_token: str | None = None  # from $SANDBOX_AUTH_TOKEN: required of every route but /health


class RequestError(Exception):
    """A request the models accept but this service cannot serve as asked (422, like a validation error)."""

    def __init__(self, where: tuple[str | int, ...], kind: str, message: str):
        super().__init__(message)
        self.error = {"type": kind, "loc": ["body", *where], "msg": message}


class Refused(Exception):
    """A request turned away before it ran (429 queue full, 503 draining)."""

    def __init__(self, status: int, message: str, retry_after_s: int):
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


class Admission:
    """Counts admitted runs (running or waiting) against workers + max_queue; refuses the rest, and everything
    once the service drains."""

    def __init__(self, settings: ServiceSettings, jail: Jail, metrics: Metrics):
        self.settings, self.jail, self.metrics = settings, jail, metrics
        self.in_system = 0  # admitted runs not finished yet (running or waiting)
        self.mean_run_s = 0.05
        self.draining = False

    def observe(self, outcome: RunOutcome) -> None:
        self.mean_run_s += 0.1 * (outcome.wall_s - self.mean_run_s)

    def _retry_after(self, runs: int) -> int:
        return max(1, min(60, math.ceil((self.jail.waiting + runs) / self.settings.workers * self.mean_run_s)))

    def admit(self, runs: int) -> None:
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise Refused(503, "the sandbox service is shutting down", self._retry_after(runs))
        capacity = self.settings.workers + self.settings.max_queue
        if self.in_system and self.in_system + runs > capacity:
            self.metrics.rejected.labels("queue_full").inc()
            raise Refused(
                429,
                f"the sandbox is full: {self.in_system} runs admitted, capacity {capacity} "
                f"({self.settings.workers} workers + {self.settings.max_queue} queued); retry later",
                self._retry_after(runs),
            )
        self.in_system += runs

    def release(self, runs: int = 1) -> None:
        self.in_system -= runs

    @contextlib.contextmanager
    def admitted(self, runs: int = 1) -> Iterator[None]:
        """admit(runs) for the duration of a block (Refused propagates as 429/503)."""
        self.admit(runs)
        try:
            yield
        finally:
            self.release(runs)


class Service:
    def __init__(
        self, settings: ServiceSettings, jail_config: JailConfig, isolation: Isolation, cgroups: Cgroups | None
    ):
        self.settings = settings
        self.metrics = Metrics(settings.workers, waiting=lambda: self.jail.waiting, busy=lambda: self.jail.busy)
        self.jail = Jail(jail_config, settings.workers, isolation, cgroups, observer=self._observe)
        self.pythons = dict(jail_config.pythons)
        self.judge = Judge(
            self.jail, self.pythons, settings.max_output_bytes, settings.max_eval_s, settings.harness_start_s
        )
        self.admission = Admission(settings, self.jail, self.metrics)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _observe(self, kind: str, outcome: RunOutcome) -> None:
        self.metrics.observe_run(kind, outcome)
        self.admission.observe(outcome)

    def begin_drain(self) -> None:
        """Stop admitting; in-flight runs get drain_timeout_s to finish, then are killed and answered SandboxError."""
        if self.admission.draining or self.loop is None:
            return
        self.admission.draining = True
        _log.info(
            "draining: %d runs in flight, killing what is left after %.0f s",
            self.admission.in_system,
            self.settings.drain_timeout_s,
        )
        self.loop.call_soon_threadsafe(self.loop.call_later, self.settings.drain_timeout_s, self._drain_deadline)

    def _drain_deadline(self) -> None:
        killed = self.jail.kill_all("shutdown", refuse_new=True)
        if killed:
            _log.warning("drain deadline: killed %d runs still in flight", killed)

    async def run_code(self, request: RunCodeRequest) -> RunCodeResponse:
        files = {path: base64.b64decode(content) for path, content in request.files.items()}
        files[CODE_FILE] = request.code.encode()
        quota = self.jail.config.disk
        if quota is not None and sum(map(len, files.values())) > quota.megabytes << 20:
            raise RequestError(
                ("files",), "over_quota", f"the files exceed a run's disk quota of {quota.megabytes} MiB"
            )
        memory = request.memory_limit_MB if request.memory_limit_MB > 0 else self.settings.default_memory_mb
        limits = Limits(
            wall_s=request.run_timeout,
            cpu_s=request.run_timeout + 1,
            memory_mb=memory,
            output_bytes=self.settings.max_output_bytes,
        )
        outcome = await self.jail.run(
            [python_path(self.pythons, request.python), CODE_FILE],
            limits,
            files=files,
            stdin=request.stdin.encode(),
            fetch_files=request.fetch_files,
            label="run_code",
        )
        if outcome.sandbox_error or outcome.killed_for == "shutdown":
            return RunCodeResponse(
                status="SandboxError",
                message=outcome.sandbox_error or "the service is shutting down; the run was killed",
            )
        notes = []
        status = "Finished"
        if outcome.killed_for == "timeout" or outcome.cpu_limit_hit:
            status = "TimeLimitExceeded"
            notes.append(
                f"killed after the {'CPU' if outcome.cpu_limit_hit else 'wall-clock'} limit of {request.run_timeout} s"
            )
        elif outcome.killed_for == "output_limit":
            status = "Error"
            notes.append(f"output exceeded {limits.output_bytes} bytes: the run was killed and the output truncated")
        elif outcome.oom_killed:
            status = "Error"
            notes.append(f"killed by the memory limit ({memory} MiB)")
        if outcome.missing_files:
            notes.append(f"fetch_files not found in the run directory: {outcome.missing_files}")
        result = CommandResult(
            status=status,
            execution_time=outcome.wall_s,
            return_code=outcome.exit_code,
            stdout=outcome.stdout.decode(errors="replace"),
            stderr=outcome.stderr.decode(errors="replace"),
        )
        return RunCodeResponse(
            status="Success" if status == "Finished" and outcome.exit_code == 0 else "Failed",
            message="; ".join(notes),
            run_result=result,
            files={path: base64.b64encode(data).decode() for path, data in outcome.files.items()},
        )

    async def evaluate_one(self, request: EvaluateRequest) -> EvaluateResponse:
        """One evaluation; the caller has admitted it. Internal failures become a SandboxError result."""
        try:
            response = await self.judge.judge(request)
        except Exception as e:  # noqa: BLE001 - answered, logged and counted, never dropped
            _log.exception("evaluation failed")
            response = EvaluateResponse(
                status="SandboxError",
                message=f"internal error: {type(e).__name__}: {e}",
                passed_all=False,
                pass_rate=0.0,
                num_tests=0,
                num_passed=0,
                tests=[],
                time_ms=0.0,
            )
        finally:
            self.admission.release(1)
        for test in response.tests:
            self.metrics.tests.labels(test.status).inc()
        return response

    def health(self) -> HealthResponse:
        jail = self.jail
        return HealthResponse(
            status="draining" if self.admission.draining else "ok",
            version=__version__,
            isolation={
                "level": jail.isolation.level,
                **jail.isolation.detail,
                "jail_uids": jail.uids,
                "child_subreaper": jail.subreaper,
                "run_root": str(jail.run_root),
            },
            capacity={
                "workers": self.settings.workers,
                "busy": jail.busy,
                "waiting": jail.waiting,
                "admitted": self.admission.in_system,
                "max_queue": self.settings.max_queue,
            },
            limits={
                "max_output_bytes": self.settings.max_output_bytes,
                "max_body_bytes": self.settings.max_body_bytes,
                "default_memory_mb": self.settings.default_memory_mb,
                "max_fetch_bytes": jail.config.max_fetch_bytes,
                "max_eval_s": round(self.settings.max_eval_s),
                **(
                    {"run_disk_mb": jail.config.disk.megabytes, "run_inodes": jail.config.disk.inodes}
                    if jail.config.disk
                    else {}
                ),
            },
            pythons=self.pythons,
        )

    def check_python(self, name: str | None, where: tuple[str | int, ...]) -> None:
        """Refuse a request naming a python this service does not have, before it is admitted."""
        try:
            python_path(self.pythons, name)
        except UnknownPython as e:
            raise RequestError(where, "unknown_python", str(e)) from None


def _error_text(error: dict) -> str:
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "request body"
    if error.get("type") == "json_invalid":
        return f"request body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))} (at {location})"
    return f"{location}: {error.get('msg')}"


class _Gate:
    """ASGI middleware: refuses bodies over the limit (413) before parsing, records request metrics, and cancels a
    request whose client has gone (its jailed runs are killed), rather than running it to the end for nobody."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        status = {"code": 500}

        async def send_recording(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await _send_json(
                    send_recording,
                    413,
                    {"message": f"request body exceeds {self.service.settings.max_body_bytes} bytes"},
                )
                return

            async def replay():
                return {"type": "http.request", "body": body, "more_body": False}

            await self._unless_disconnected(self.app(scope, replay, send_recording), receive, scope["path"])
        finally:
            endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.service.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.service.metrics.request_seconds.labels(endpoint).observe(time.monotonic() - started)

    async def _unless_disconnected(self, handling, receive, path: str) -> None:
        """Run the request's handling; cancel it if the client disconnects first."""
        task = asyncio.ensure_future(handling)
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                self.service.metrics.rejected.labels("client_gone").inc()
                _log.info("the client of %s went away: its request was cancelled", path)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            gone.cancel()
            task.cancel()

    async def _read_body(self, scope, receive) -> bytes | None:
        limit = self.service.settings.max_body_bytes
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


async def _disconnected(receive) -> None:
    """Returns once the client has disconnected (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send, status: int, content: dict) -> None:
    response = JSONResponse(status_code=status, content=content)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _bearer_check(token: str | None):
    """A FastAPI dependency: 401 unless the request carries `Authorization: Bearer <token>` (compared in constant
    time); nothing to check when the service has no token."""
    bearer = HTTPBearer(auto_error=False)

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(
                status_code=401,
                detail="this sandbox service requires its bearer token (the client sends $SANDBOX_AUTH_TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


_ENDPOINTS = ("/run_code", "/evaluate", "/evaluate/batch", "/health", "/metrics")


def create_app(service: Service, workers: Mapping[str, WorkerEndpoint] | None = None) -> FastAPI:
    """The service's routes; `workers` is the workflow allowlist (None: from $SANDBOX_WORKERS[_FILE])."""
    admission = service.admission
    runner = WorkflowRunner(
        service.jail,
        service.judge,
        workers_from_env() if workers is None else workers,
        python=service.pythons[DEFAULT_PYTHON],
        output_bytes=service.settings.max_output_bytes,
        worker_timeout_s=service.settings.worker_timeout_s,
        max_wait_s=service.settings.max_workflow_wait_s,
    )
    operators = OperatorsResponse(operators=describe_operators(), text=operators_text())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            service.jail.close()

    app = FastAPI(title="sandbox_service", version=__version__, lifespan=lifespan)
    # every route but /health answers only a caller with the service's bearer token, when it has one
    guarded = APIRouter(dependencies=[Depends(_bearer_check(service.settings.auth_token))])
    app.state.service = service
    app.add_middleware(_Gate, service=service)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        message = "; ".join(_error_text(e) for e in exc.errors()[:10])
        return JSONResponse(status_code=422, content={"message": message, "errors": errors})

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"message": _error_text(exc.error), "errors": [exc.error]})

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status,
            content={"message": exc.message, "retry_after_s": exc.retry_after_s},
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(status_code=500, content={"message": f"internal error: {type(exc).__name__}: {exc}"})

    @guarded.post("/run_code", response_model=RunCodeResponse)
    async def run_code(request: RunCodeRequest) -> RunCodeResponse:
        service.check_python(request.python, ("python",))
        with admission.admitted(1):
            return await service.run_code(request)

    @guarded.post("/evaluate", response_model=EvaluateResponse)
    async def evaluate(request: EvaluateRequest) -> EvaluateResponse:
        service.check_python(request.python, ("python",))
        admission.admit(1)
        return await service.evaluate_one(request)

    @guarded.post("/evaluate/batch", response_model=EvaluateBatchResponse)
    async def evaluate_batch(request: EvaluateBatchRequest) -> EvaluateBatchResponse:
        for i, item in enumerate(request.items):
            service.check_python(item.python, ("items", i, "python"))
        admission.admit(len(request.items))
        results = await asyncio.gather(*(service.evaluate_one(item) for item in request.items))
        return EvaluateBatchResponse(results=list(results))

    @guarded.get("/workflow/operators", response_model=OperatorsResponse)
    async def workflow_operators() -> OperatorsResponse:
        return operators

    @guarded.get("/workflow/workers")
    async def workflow_workers() -> dict[str, list[str]]:
        return {"workers": sorted(runner.workers)}

    @guarded.post("/workflow/run", response_model=WorkflowRunResponse)
    async def workflow_run(request: WorkflowRunRequest) -> WorkflowRunResponse:
        service.check_python(request.python, ("python",))
        with admission.admitted(WORKFLOW_RUNS):
            return await runner.run(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(status_code=503 if admission.draining else 200, content=service.health().model_dump())

    @guarded.get("/metrics")
    async def metrics() -> Response:
        return Response(content=service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(guarded)
    return app
