"""Rollouts: the JAX generation engine, its SGLang-protocol server, and the client + launchers GRPO uses.

The trainer only ever speaks SGLang's native HTTP protocol (protocol.py) through `RolloutClient`; behind the URL is
either real SGLang (`launch: sglang`, GPU) or fr_jax's engine served by `python -m fr_jax.serve` (`launch: local`).
"""

from fr_jax.rollout.client import Rollout, RolloutClient, RolloutError, WeightSync, sync_weights
from fr_jax.rollout.launch import ServerProcess, free_port, launch_local, launch_server, launch_sglang

__all__ = [
    "Rollout",
    "RolloutClient",
    "RolloutError",
    "ServerProcess",
    "WeightSync",
    "free_port",
    "launch_local",
    "launch_server",
    "launch_sglang",
    "sync_weights",
]
