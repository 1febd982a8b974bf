"""Test-wide setup: 8 fake CPU devices for real sharded meshes, and session-wide servers and models."""

import logging
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.support.sandbox import SANDBOX_SECRET, WORKFLOW_SECRET  # noqa: E402


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A command run in-process (its main) points the root logger at the test's captured stderr; put it back, so a
    later log line (a server stopped at session end) does not write to a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def benchmark_dir() -> pathlib.Path:
    """The benchmark files fr_jax ships (or $FR_JAX_DATA)."""
    from fr_jax.data.tasks import default_data_dir

    return default_data_dir()


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """SmolLM2-135M-Instruct as an HF dir, converted from its GGUF once (cached in ~/.cache/fr_jax or $FR_JAX_CACHE)."""
    from fr_jax.models.gguf import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def qwen_tok():
    """The offline Qwen2.5 tokenizer (real vocabulary, ChatML template), built once and cached like smollm2_dir."""
    from fr_jax.models.tokenizer import qwen_tokenizer

    return qwen_tokenizer()


@pytest.fixture(scope="session")
def sandbox():
    """ONE real sandbox_service on 127.0.0.1 for the whole session (a subprocess, drained at the end)."""
    from fr_jax.sandbox.local import LocalSandbox

    with LocalSandbox(workers=2, env={**os.environ, "FR_SANDBOX_TEST_SECRET": SANDBOX_SECRET}) as service:
        yield service


@pytest.fixture(scope="session")
def api(sandbox):
    import httpx

    with httpx.Client(base_url=sandbox.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def workflow_worker(smollm2_dir):
    """ONE real worker LLM for the workflow tests: fr_jax.serve on SmolLM2 (the context fits a design prompt, so
    the flow tests can also use it as the designer)."""
    from fr_jax.rl.setup import server_env
    from fr_jax.rollout.launch import launch_local

    # the machine's one CPU device: the 8 fake devices the tests get would make it a slow 8-way tensor-parallel decode
    with launch_local(
        smollm2_dir, context_length=2048, max_running_requests=8, random_seed=0, env=server_env()
    ) as server:
        yield server


@pytest.fixture(scope="session")
def workflow_sandbox(workflow_worker):
    """ONE real sandbox_service whose allowlist has the worker as `local` (and `dead`: allowlisted, nothing there)."""
    from fr_jax.sandbox.local import LocalSandbox

    # no --uid-base: each service claims a free block of jail uids, so concurrent test sessions never collide
    args = [
        "--worker",
        f"local={workflow_worker.url}/v1",
        "--worker",
        "dead=http://127.0.0.1:9/v1",
    ]
    with LocalSandbox(workers=4, env={**os.environ, "FLOW_TEST_SECRET": WORKFLOW_SECRET}, extra_args=args) as service:
        yield service
