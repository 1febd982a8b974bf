"""Test-wide setup: 8 fake CPU devices for real sharded meshes, and the shared data folder."""

import os
import pathlib
import secrets

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("FR_JAX_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    assert SHARED_DATA.is_dir(), f"shared data folder not found at {SHARED_DATA} (set FR_JAX_SHARED_DATA)"
    return SHARED_DATA


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


# Put in the sandbox service's environment: jailed code must never see it.
SANDBOX_SECRET = f"fr-sandbox-secret-{secrets.token_hex(8)}"


@pytest.fixture(scope="session")
def sandbox():
    """ONE real sandbox_service on 127.0.0.1 for the whole session (a subprocess, drained at the end)."""
    from fr_jax.rl.sandbox_client import LocalSandbox

    with LocalSandbox(workers=2, env={**os.environ, "FR_SANDBOX_TEST_SECRET": SANDBOX_SECRET}) as service:
        yield service


@pytest.fixture(scope="session")
def api(sandbox):
    import httpx

    with httpx.Client(base_url=sandbox.url, timeout=120) as client:
        yield client
