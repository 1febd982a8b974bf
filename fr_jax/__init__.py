"""fr_jax: a JAX/Flax training stack for query-level meta-agents (FlowReasoner)."""

__version__ = "0.1.0"
