"""A sandbox_service started on loopback for the lifetime of a `with` block (tests, demos, a one-machine run)."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fr_jax.rollout.launch import ServerProcess
from fr_jax.sandbox.client import SandboxClient, SandboxUnavailable


class LocalSandbox:
    """Runs `python -m sandbox_service` on a free loopback port for the lifetime of a `with` block.

    The service binds port 0 itself and reports the port through a file, so there is no race for the port. It is
    started and stopped by fr_jax.rollout.launch.ServerProcess (its own process group; stopped with its parent).
    Its log goes to `log_path` (a temp file by default) and is quoted when start-up fails.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        max_queue: int | None = None,
        insecure: bool = False,
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 60.0,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
    ):
        args = ["--host", "127.0.0.1", "--port", "0"]
        args += ["--workers", str(workers)] if workers is not None else []
        args += ["--max-queue", str(max_queue)] if max_queue is not None else []
        args += ["--insecure"] if insecure else []
        self._tmp = tempfile.TemporaryDirectory(prefix="local_sandbox-")
        port_file = Path(self._tmp.name) / "port.json"
        self.log_path = Path(log_path) if log_path is not None else Path(self._tmp.name) / "service.log"
        self.server = ServerProcess(
            [python, "-m", "sandbox_service", "--port-file", str(port_file), *args, *extra_args],
            host="127.0.0.1",
            port_file=port_file,
            env=dict(os.environ if env is None else env),
            log_path=self.log_path,
            startup_timeout=startup_timeout_s,
            name="sandbox_service",
        )
        self.url: str | None = None

    @property
    def process(self):
        return self.server.process

    def __enter__(self) -> LocalSandbox:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self, **kwargs: Any) -> SandboxClient:
        if self.url is None:
            raise SandboxUnavailable("LocalSandbox is not started")
        return SandboxClient(self.url, **kwargs)

    def start(self) -> str:
        try:
            self.url = self.server.start().url
        except (RuntimeError, TimeoutError) as error:
            raise SandboxUnavailable(f"sandbox_service did not start: {error}") from None
        finally:
            if not self.log_path.is_relative_to(self._tmp.name):
                self._tmp.cleanup()  # the port is read: a parent killed from now on leaves no folder behind
        return self.url

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """SIGTERM (the service drains in-flight runs), then SIGKILL after `timeout_s`. Returns the exit code.
        Its temp folder (the port file, and the log unless it went elsewhere) goes with it."""
        self.url = None
        try:
            return self.server.stop(timeout_s)
        finally:
            self._tmp.cleanup()
