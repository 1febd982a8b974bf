"""fr_jax's side of sandbox_service: the HTTP client (client.py), a local launcher (local.py) and the
conversion of a task's test suites into requests (suites.py). fr_jax reaches the service over HTTP only."""
