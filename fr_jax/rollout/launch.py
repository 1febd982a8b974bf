"""Start a rollout server as a child process, wait until it is healthy, stop it cleanly.

Two servers, one interface (`ServerProcess`: .url, .stop(), a context manager), picked by the config's `launch:`
- "sglang": real SGLang, `python -m sglang.launch_server --model-path ... --port ...` (GPU), with memory-saver and
  deterministic-inference flags configurable;
- "local": fr_jax's own engine, `python -m fr_jax.serve --model ...` on a free loopback port (CPU/TPU, or any
  machine without SGLang).
`launch_router` starts sglang-router (`python -m sglang_router.launch_router`) on loopback in front of a fleet of
either. `ServerProcess` is also how fr_jax starts the sandbox service (fr_jax.sandbox.local.LocalSandbox).
The child runs in its own process group with its output in a log file; a child that dies or never gets healthy
raises with the tail of that log. Servers still running when the interpreter exits are stopped, and the kernel
stops them when the interpreter is killed (`setpriv --pdeathsig`): a SIGKILLed trainer leaves no server behind.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Literal

import httpx

_log = logging.getLogger(__name__)
_RUNNING: set[ServerProcess] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bound_to_parent(command: Sequence[str]) -> list[str]:
    """`command` under `setpriv --pdeathsig SIGTERM`: the kernel sends it SIGTERM when the thread that started it
    dies (start servers from the main thread). Without setpriv (util-linux) the command is unchanged."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        _log.warning("setpriv not found: %s will outlive this process if it is killed", command[0])
        return list(command)
    return [setpriv, "--pdeathsig", "SIGTERM", "--", *command]


class ServerProcess:
    """A server command run as a child process; `start()` returns once GET /health answers 200.

    The port is either given (`port`) or chosen by the server itself, which then writes {"url": ...} to
    `port_file` (no race for a free port).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        host: str,
        port: int | None = None,
        port_file: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        startup_timeout: float = 600.0,
        name: str = "server",
    ):
        if (port is None) == (port_file is None):
            raise ValueError("give exactly one of port and port_file")
        self.command = list(command)
        self.host, self.port = host, port
        self.port_file = pathlib.Path(port_file) if port_file is not None else None
        self.env = dict(env) if env is not None else None
        self.name = name
        self.startup_timeout = startup_timeout
        self.log_path = (
            pathlib.Path(log_path)
            if log_path
            else pathlib.Path(tempfile.mkstemp(prefix=f"fr_jax-{name}-", suffix=".log")[1])
        )
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerProcess:
        _log.info("starting %s: %s (log %s)", self.name, " ".join(self.command), self.log_path)
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                bound_to_parent(self.command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        _RUNNING.add(self)
        try:
            self._wait_healthy(time.monotonic() + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        _log.info("%s healthy at %s after %.1fs", self.name, self.url, time.perf_counter() - started)
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _check_alive(self, deadline: float, waiting_for: str) -> None:
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(
                f"{self.name} exited with code {code} before it was healthy; "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{self.name} did not {waiting_for} within {self.startup_timeout:.0f}s; "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )

    def _wait_healthy(self, deadline: float) -> None:
        if self.port_file is not None:
            while not (self.port_file.is_file() and self.port_file.read_text()):
                self._check_alive(deadline, f"write its port to {self.port_file}")
                time.sleep(0.05)
            url = httpx.URL(json.loads(self.port_file.read_text())["url"])
            self.host, self.port = url.host, url.port
        with httpx.Client(timeout=5.0) as client:
            while True:
                self._check_alive(deadline, f"answer {self.url}/health")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server (it shuts down cleanly: drains, stops its own children), SIGKILL it after `timeout`
        seconds, then SIGKILL whatever is left in its process group. Returns its exit code."""
        _RUNNING.discard(self)
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _log.warning("%s did not exit %.0fs after SIGTERM; killing it", self.name, timeout)
                self.process.kill()
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers the server left behind
        except (ProcessLookupError, PermissionError):
            pass
        _log.info("%s stopped (exit code %s)", self.name, self.process.returncode)
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop(timeout=10.0)


def sglang_command(
    model_path,
    *,
    host: str,
    port: int,
    tp_size: int = 1,
    mem_fraction_static: float | None = None,
    enable_memory_saver: bool = False,
    deterministic: bool = False,
    weight_version: str | None = None,
    dtype: str | None = None,
    random_seed: int | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "--tp-size",
        str(tp_size),
    ]
    if mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(mem_fraction_static)]
    if enable_memory_saver:
        cmd.append("--enable-memory-saver")
    if deterministic:
        cmd.append("--enable-deterministic-inference")
    if weight_version is not None:
        cmd += ["--weight-version", weight_version]
    if dtype is not None:
        cmd += ["--dtype", dtype]
    if random_seed is not None:
        cmd += ["--random-seed", str(random_seed)]
    return cmd + list(extra_args)


def local_command(
    model_path,
    *,
    host: str,
    port: int,
    mesh: str | None = None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    context_length: int | None = None,
    max_running_requests: int | None = None,
    max_queued_requests: int | None = None,
    chunked_prefill_size: int | None = None,
    prefix_cache_tokens: int | None = None,
    scheduling: str | None = None,
    num_continuous_decode_steps: int | None = None,
    weight_version: str | None = None,
    random_seed: int | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    cmd = [sys.executable, "-m", "fr_jax.serve", "--model", str(model_path), "--host", host, "--port", str(port)]
    for flag, value in (
        ("--mesh", mesh),
        ("--dtype", dtype),
        ("--param-dtype", param_dtype),
        ("--context-length", context_length),
        ("--max-running-requests", max_running_requests),
        ("--max-queued-requests", max_queued_requests),
        ("--chunked-prefill-size", chunked_prefill_size),
        ("--prefix-cache-tokens", prefix_cache_tokens),
        ("--scheduling", scheduling),
        ("--num-continuous-decode-steps", num_continuous_decode_steps),
        ("--weight-version", weight_version),
        ("--random-seed", random_seed),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + list(extra_args)


def launch_sglang(
    model_path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    startup_timeout: float = 900.0,
    log_path=None,
    env: dict[str, str] | None = None,
    **flags,
) -> ServerProcess:
    """Real SGLang on `model_path` (flags: see sglang_command), healthy on return."""
    port = port or free_port(host)
    return ServerProcess(
        sglang_command(model_path, host=host, port=port, **flags),
        host=host,
        port=port,
        env=env,
        log_path=log_path,
        startup_timeout=startup_timeout,
        name="sglang",
    ).start()


def launch_local(
    model_path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    startup_timeout: float = 600.0,
    log_path=None,
    env: dict[str, str] | None = None,
    **flags,
) -> ServerProcess:
    """fr_jax's engine server on `model_path` (flags: see local_command), healthy on return."""
    port = port or free_port(host)
    return ServerProcess(
        local_command(model_path, host=host, port=port, **flags),
        host=host,
        port=port,
        env=env,
        log_path=log_path,
        startup_timeout=startup_timeout,
        name="fr_jax.serve",
    ).start()


def launch_server(launch: Literal["sglang", "local"], model_path, **kwargs) -> ServerProcess:
    """The config's `launch:` switch: the same call starts real SGLang or the embedded server."""
    launchers = {"sglang": launch_sglang, "local": launch_local}
    if launch not in launchers:
        raise ValueError(f"launch={launch!r}: expected one of {sorted(launchers)}")
    return launchers[launch](model_path, **kwargs)


def router_command(
    worker_urls: Sequence[str], *, host: str, port: int, policy: str, prometheus_port: int, request_timeout_s: int
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--worker-urls",
        *worker_urls,
        "--host",
        host,
        "--port",
        str(port),
        "--policy",
        policy,
        "--prometheus-host",
        host,
        "--prometheus-port",
        str(prometheus_port),
        "--request-timeout-secs",
        str(request_timeout_s),
        "--log-level",
        "warn",
    ]


def launch_router(
    worker_urls: Sequence[str],
    *,
    policy: str = "cache_aware",
    host: str = "127.0.0.1",
    port: int | None = None,
    startup_timeout: float = 120.0,
    request_timeout_s: int = 3600,
    log_path=None,
) -> ServerProcess:
    """sglang-router in front of `worker_urls` (its metrics also on `host`); returns once it has registered every
    worker, since its /health answers before that and a request sent then would find no worker."""
    port = port or free_port(host)
    command = router_command(
        worker_urls,
        host=host,
        port=port,
        policy=policy,
        prometheus_port=free_port(host),
        request_timeout_s=request_timeout_s,
    )
    router = ServerProcess(
        command, host=host, port=port, log_path=log_path, startup_timeout=startup_timeout, name="sglang-router"
    ).start()
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            loads = httpx.get(f"{router.url}/get_loads", timeout=10.0).json().get("workers", [])
            if {w.get("worker") for w in loads} >= set(worker_urls):
                return router
            router._check_alive(deadline, f"register the workers {list(worker_urls)}")
            time.sleep(0.2)
    except BaseException:
        router.stop()
        raise
