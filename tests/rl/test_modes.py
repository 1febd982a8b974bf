"""What a mode says of its worker: the sandbox's allowlist entry, and where the worker answers."""

import pytest

from fr_jax.rl.modes import ROLLOUT_WORKER, WorkerSpec


def test_allowlist_entries():
    assert WorkerSpec("local", "http://h:1/v1").allowlist_entry(None) == "local=http://h:1/v1"
    hosted = WorkerSpec("worker", "https://api.openai.com/v1", "gpt-4o-mini", "OPENAI_API_KEY")
    assert (
        hosted.allowlist_entry(None) == "worker=https://api.openai.com/v1,model=gpt-4o-mini,api_key_env=OPENAI_API_KEY"
    )
    policy = WorkerSpec("local", ROLLOUT_WORKER, "smol")
    assert policy.allowlist_entry("http://127.0.0.1:5/") == "local=http://127.0.0.1:5/v1,model=smol"
    assert WorkerSpec("known", None).allowlist_entry("http://x") is None  # a running sandbox knows it already
    with pytest.raises(ValueError, match="no rollout server"):
        policy.resolved_url(None)
