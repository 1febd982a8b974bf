"""The commands a user types: a mistake is one line that names it (exit status 2, no traceback unless --debug),
and every command says what it does and where its docs are."""

import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from fr_jax import eval as eval_cli
from fr_jax.rl.setup import server_env
from fr_jax.rollout import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
GRPO_DEMO = REPO / "configs" / "grpo_demo.yaml"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A command as a user runs it: the machine's own devices (server_env drops the tests' 8 fake ones)."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=server_env()
    )


def one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """The error line, once checked: exit status 2, one line on stderr after the logs, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    for text in expected:
        assert text in line, line
    return line


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\ntrain:\n  steps: 1\n  batch_size: [1, 2\nmodel: {pretrained: smollm2}\n")
    one_line_error(run("-m", "fr_jax.train", "--config", str(bad)), f"{bad}:5:", "not valid YAML")


def test_a_missing_sft_data_file_is_one_line(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "sft_demo.yaml").read_text())
    config.update(run_dir=str(tmp_path / "run"))
    config["sft"]["data"] = {"source": "jsonl", "train_file": str(tmp_path / "nowhere.jsonl"), "max_seq_len": 64}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    one_line_error(run("-m", "fr_jax.train", "--config", str(path), timeout=300), "nowhere.jsonl")
    debug = run("-m", "fr_jax.train", "--config", str(path), "--debug", timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr  # --debug shows where it came from


@pytest.mark.parametrize("service", ["sandbox", "rollout"])
def test_an_unreachable_service_is_named_before_any_weight_loads(tmp_path, service):
    dead = f"http://127.0.0.1:{free_port()}"
    overrides = [f"run_dir={tmp_path / 'run'}", "model.pretrained=smollm2"]  # the demo's SFT export may not exist
    overrides += [f"grpo.{service}.launch=none", f"grpo.{service}.url={dead}"]
    result = run("-m", "fr_jax.eval", "--config", str(GRPO_DEMO), *overrides)
    one_line_error(result, f"grpo.{service}.url={dead}", "nothing answers there")
    assert "starting " not in result.stderr  # checked before any server was launched or weight loaded


def test_serve_names_a_model_directory_that_is_not_one(tmp_path):
    one_line_error(run("-m", "fr_jax.serve", "--model", str(tmp_path / "none")), "--model", "no config.json")


def test_eval_k_does_not_swallow_overrides():
    args = eval_cli.parse_args(["--config", "c.yaml", "--k", "1", "5", "grpo.eval.n=5", "--n", "5"])
    assert args.k == [1, 5] and args.overrides == ["grpo.eval.n=5"] and args.n == 5
    with pytest.raises(SystemExit):
        eval_cli.parse_args(["--config", "c.yaml", "--k", "one"])


@pytest.mark.parametrize(
    "module", ["fr_jax.train", "fr_jax.eval", "fr_jax.plan", "fr_jax.serve", "fr_jax.view", "fr_jax.flow.optimize"]
)
def test_help_says_what_it_does_and_where_the_docs_are(module):
    result = run("-m", module, "--help")
    assert result.returncode == 0, result.stderr
    assert "docs" in result.stdout.lower() or "README" in result.stdout, result.stdout
    assert len(result.stdout.split()) > 20  # a description, not a bare usage line


def test_console_scripts_are_installed_beside_the_module_forms():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"fr-train", "fr-eval", "fr-plan", "fr-serve", "fr-sandbox", "fr-view", "fr-optimize"} <= set(scripts)
    bin_dir = pathlib.Path(sys.executable).parent
    for name in scripts:
        assert (bin_dir / name).is_file(), f"{name} is not installed: run `pip install -e .` (scripts/setup.sh does)"
    result = subprocess.run([bin_dir / "fr-train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "stage" in result.stdout


PROBE = """
import http.server, logging, sys, threading, httpx
from tqdm import tqdm
from fr_jax import cli

class Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
threading.Thread(target=server.serve_forever, daemon=True).start()

def main(args):
    for step in tqdm(range(2), desc="probe"):
        if step == 1:
            httpx.get(f"http://127.0.0.1:{server.server_port}/").raise_for_status()
            logging.getLogger("probe").info("the probe logs mid-bar")
    return 0

args = cli.parser("probe", "Log and make one HTTP request under a progress bar.").parse_args(sys.argv[1:])
sys.exit(cli.run(main, args))
"""


def test_command_logs_stay_readable():
    """A GRPO round makes several HTTP calls a step (rollout, sandbox, workers): a line each would bury the progress
    bar, so they are logged only under --debug. And a log line printed while a bar runs starts a line of its own."""
    plain, debug = run("-c", PROBE), run("-c", PROBE, "--debug")
    assert plain.returncode == 0 and debug.returncode == 0, plain.stderr + debug.stderr
    assert "HTTP Request: GET" in debug.stderr
    assert "HTTP Request" not in plain.stderr, plain.stderr
    line = next(line for line in plain.stderr.splitlines() if "the probe logs mid-bar" in line)
    assert re.match(r"\d{4}-\d\d-\d\d [\d:,]+ INFO probe: ", line.split("\r")[-1]), repr(line)
