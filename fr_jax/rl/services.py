"""The two services a GRPO run or an evaluation talks to, started and stopped as the config says.

- The rollout server speaks SGLang's protocol: `launch: local` starts fr_jax's engine (`python -m fr_jax.serve`) on a
  free loopback port, `launch: sglang` starts real SGLang, `launch: none` uses the server already at `url`.
- The sandbox: `launch: local` starts `python -m sandbox_service` on loopback, `launch: none` uses `url`.
Both stop when the `with` block ends, also on an error. Their logs go to the run directory. Only process 0 of a
multi-process run talks to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import re
from collections.abc import Iterator, Sequence

from fr_jax.config import GRPORolloutSection, GRPOSandboxSection
from fr_jax.rollout import RolloutClient, launch_server
from fr_jax.sandbox.client import SandboxClient, SandboxUnavailable
from fr_jax.sandbox.local import LocalSandbox

_log = logging.getLogger(__name__)
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")


def server_env() -> dict[str, str]:
    """The environment of a local server: this process's, less a faked CPU device count (tests fake 8 devices;
    the server should see the machine's own)."""
    env = dict(os.environ)
    if "XLA_FLAGS" in env:
        env["XLA_FLAGS"] = _DEVICE_COUNT_FLAG.sub("", env["XLA_FLAGS"]).strip()
    return env


@contextlib.contextmanager
def rollout_service(
    section: GRPORolloutSection, model_dir, *, weight_version: str, seed: int, log_dir: pathlib.Path
) -> Iterator[RolloutClient]:
    """A client of the rollout server; a launched server serves `model_dir` (weights + tokenizer) as
    `weight_version`. A server at `url` is used as it is: the caller syncs its weights."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if section.launch == "none":
            url = section.url
        else:
            flags = dict(weight_version=weight_version, random_seed=seed)
            if section.launch == "local":
                flags.update(mesh=section.mesh, max_running_requests=section.max_running_requests, env=server_env())
            process = launch_server(
                section.launch,
                model_dir,
                startup_timeout=section.startup_timeout_s,
                log_path=log_dir / f"rollout_server_{section.launch}.log",
                **flags,
            )
            stack.enter_context(process)
            url = process.url
        client = stack.enter_context(RolloutClient(url, max_retries=section.max_retries))
        client.wait_healthy(timeout=section.startup_timeout_s)
        yield client


@contextlib.contextmanager
def sandbox_service(
    section: GRPOSandboxSection, *, log_dir: pathlib.Path, workers: Sequence[str] = ()
) -> Iterator[str]:
    """The sandbox's URL, healthy. A launched sandbox allowlists `workers` (`name=URL[,model=M]`, the worker LLMs
    that workflows may call); a running one has its own allowlist."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if section.launch == "none":
        asyncio.run(_check_sandbox(section.url))
        yield section.url
        return
    allowlist = [flag for spec in workers for flag in ("--worker", spec)]
    with LocalSandbox(
        workers=section.workers, insecure=section.insecure, log_path=log_dir / "sandbox.log", extra_args=allowlist
    ) as local:
        _log.info("sandbox_service at %s (log %s)", local.url, log_dir / "sandbox.log")
        yield local.url


async def _check_sandbox(url: str) -> None:
    async with SandboxClient(url) as client:
        try:
            await client.health()
        except SandboxUnavailable as error:
            raise SandboxUnavailable(f"grpo.sandbox.url={url}: {error}") from error
