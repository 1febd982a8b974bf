"""Test-wide setup: 8 fake CPU devices for real sharded meshes, and session-wide servers and models."""

import logging
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.support.sandbox import SANDBOX_SECRET, WORKFLOW_SECRET  # noqa: E402

# The slow tier (`pytest -m "not slow"` runs the unit tier alone; the README's command runs both): whole commands and
# demos (tests/e2e), the viewer (a real run in a real browser), files that start servers or load the demo model
# throughout, any test that uses a real service, and the heaviest single tests (over 8 s on a loaded 2-core machine).
SLOW_FOLDERS = ("e2e", "view")
SLOW_FILES = (
    "rollout/test_server.py",
    "rollout/test_engine.py",
    "trainer/test_run_outputs.py",
    "sandbox/test_pythons.py",
    "models/test_gguf.py",
    "sandbox/test_fleet.py",
    "test_plan.py",
)
SLOW_TESTS = (
    "rl/test_loop.py::test_update_is_the_same_for_any_micro_batching_and_device_count",
    "rl/test_loop.py::test_two_rounds_over_http_then_an_exact_resume",
    "rl/test_loop.py::test_trainer_log_probs_match_the_engine",
    "rl/test_grpo.py::test_grpo_loss_under_jit_matches_eager",
    "models/test_decoder.py::test_remat_and_attention_chunks_give_the_same_gradients",
    "models/test_decoder.py::test_parameters_carry_logical_axes_and_shard_by_rules",
    "models/test_decoder.py::test_cached_decode_equals_full_forward",
    "models/test_decoder.py::test_compute_and_param_dtypes",
    "models/test_tokenizer.py::test_cached_tokenizer_is_reused",
    "models/test_tokenizer.py::test_known_ids",
    "models/test_chat_templates.py::test_a_different_vocabulary_is_never_slipped_in",
    "trainer/test_sft.py::test_sft_on_mbpp_lowers_held_out_loss",
    "trainer/test_step.py::test_sharded_matches_single_device",
    "trainer/test_step.py::test_accumulation_is_an_exact_token_mean",
    "trainer/test_step.py::test_bf16_compute_keeps_fp32_master_weights",
    "parallel/test_rules.py::test_a_config_override_reshards_the_model",
    "data/test_tasks.py::test_reference_solutions_pass_and_stubs_fail",
    "sandbox/test_infrastructure.py::test_a_slow_harness_start_is_not_the_solutions_time",
    "test_cli.py::test_an_unreachable_service_is_named_before_any_weight_loads",
    "test_cli.py::test_a_missing_sft_data_file_is_one_line",
)
SERVICE_FIXTURES = {"sandbox", "api", "workflow_worker", "workflow_sandbox"}
TESTS = pathlib.Path(__file__).parent


def _is_slow(item: pytest.Item) -> bool:
    where = item.path.relative_to(TESTS).as_posix()
    test = f"{where}::{item.name.split('[')[0]}"
    return (
        where.split("/")[0] in SLOW_FOLDERS
        or where in SLOW_FILES
        or test in SLOW_TESTS
        or bool(SERVICE_FIXTURES & set(item.fixturenames))
    )


def pytest_collection_modifyitems(items):
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)


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
