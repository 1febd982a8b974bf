"""One long-lived sandbox client for a synchronous caller (a training run, an evaluation).

The GRPO loop is synchronous (it drives jitted steps), while the client is async (it keeps many requests in flight
to the service). A session runs one event loop on a background thread and one `SandboxClient` inside it for the
whole run, so connections, retries' statistics and the concurrency bound live as long as the run, and each call
from the loop is `session.run(lambda sandbox: ...)`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fr_jax.sandbox.client import SandboxClient
from fr_jax.sandbox.fleet import SandboxFleet

T = TypeVar("T")


class SandboxSession:
    """`with SandboxSession(url) as session: session.run(lambda sandbox: sandbox.health())`; several URLs make the
    session's client a SandboxFleet."""

    def __init__(self, urls: str | Sequence[str], **client_kwargs: Any):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self._client_kwargs = client_kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sandbox-session", daemon=True)
        self._client: SandboxClient | SandboxFleet | None = None

    def __enter__(self) -> SandboxSession:
        self._thread.start()

        async def open_client() -> SandboxClient | SandboxFleet:  # created on the session's loop, where it is used
            if len(self.urls) == 1:
                return SandboxClient(self.urls[0], **self._client_kwargs)
            return SandboxFleet(self.urls, **self._client_kwargs)

        self._client = asyncio.run_coroutine_threadsafe(open_client(), self._loop).result()
        return self

    def __exit__(self, *exc) -> None:
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result()
            self._client = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def stats(self):
        """The client's request and retry counts so far."""
        if self._client is None:
            raise RuntimeError("the sandbox session is not open")
        return self._client.stats

    def run(self, call: Callable[[SandboxClient], Awaitable[T]]) -> T:
        """`call(client)` on the session's loop; blocks until it is done and returns (or raises) what it did."""
        client = self._client
        if client is None:
            raise RuntimeError("the sandbox session is not open")

        async def invoke() -> T:
            return await call(client)

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result()
