"""Rollouts: the JAX generation engine, its SGLang-protocol server, and the client + launchers GRPO uses.

The trainer only ever speaks SGLang's native HTTP protocol (protocol.py) through `RolloutClient`; behind the URL is
either real SGLang (`launch: sglang`, GPU) or fr_jax's engine served by `python -m fr_jax.serve` (`launch: local`),
one server or a fleet behind sglang-router (`RolloutFleet`).
"""

from fr_jax.rollout.client import (
    Rollout,
    RolloutClient,
    RolloutError,
    RolloutFleet,
    WeightSync,
    load_weights,
    sync_weights,
)
from fr_jax.rollout.launch import (
    ServerProcess,
    free_port,
    launch_local,
    launch_router,
    launch_server,
    launch_sglang,
)

__all__ = [
    "Rollout",
    "RolloutClient",
    "RolloutError",
    "RolloutFleet",
    "ServerProcess",
    "WeightSync",
    "free_port",
    "load_weights",
    "launch_local",
    "launch_router",
    "launch_server",
    "launch_sglang",
    "sync_weights",
]
