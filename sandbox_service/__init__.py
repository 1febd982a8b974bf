"""sandbox_service: an isolated HTTP code-execution microservice (bubblewrap jails, SandboxFusion-compatible /run_code,
/evaluate for HumanEval, MBPP and stdin/stdout tests). It imports nothing from fr_jax: fr_jax reaches it over HTTP."""

__version__ = "0.1.0"
