"""The sandbox tests' shared fixtures (the service itself is the session's `sandbox` fixture, tests/conftest.py)."""

import pytest

from tests.support.sandbox import health, jail_problems


@pytest.fixture(scope="session")
def jail_check(sandbox, api) -> list[str]:
    """What is wrong with the jail (empty: it holds), probed once per session; hostile tests call require_jail."""
    return jail_problems(api)


@pytest.fixture()
def jail_uids(api) -> list[int]:
    return health(api)["isolation"]["jail_uids"]
