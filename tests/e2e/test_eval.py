"""python -m fr_jax.eval: pass@1 and pass@k on a held-out split through a rollout server and the real sandbox.

Two tiny policies with known behaviour, served one after the other by the same server (the CLI loads each with
/update_weights_from_disk): one always answers 7, so greedy pass@1 on {three, seven} is exactly 1/2; the other flips
a coin between 3 and 7, so its n samples give pass@k values the unbiased estimator must reproduce."""

import json
import os

import numpy as np
import pytest
import yaml

from fr_jax import eval as eval_cli
from fr_jax.rl.reward import pass_at_k
from fr_jax.rollout import launch_local
from fr_jax.sandbox.local import LocalSandbox
from tests.support.grpo import HEADER, build_tokenizer, grpo_config, write_bigram_model, write_tasks

ALWAYS_SEVEN = {"three": {HEADER: 10.0}, "seven": {HEADER: 10.0}, HEADER: {"7": 10.0}, "7": {"</s>": 10.0}}
COIN = {
    "three": {HEADER: 10.0},
    "seven": {HEADER: 10.0},
    HEADER: {"3": 10.0, "7": 10.0},
    "3": {"</s>": 10.0},
    "7": {"</s>": 10.0},
}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = build_tokenizer(root / "tokenizer")
    models = {
        name: write_bigram_model(root / name, tokenizer, table)
        for name, table in (("always_seven", ALWAYS_SEVEN), ("coin", COIN))
    }
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    with LocalSandbox(workers=2) as sandbox, launch_local(models["coin"], env=env, mesh="1,1,1") as server:
        cfg = grpo_config(
            root / "run",
            models["coin"],
            write_tasks(root / "tasks.jsonl"),
            rounds=1,
            rollout={"launch": "none", "url": server.url},
            sandbox={"launch": "none", "url": sandbox.url},
        )
        path = root / "eval.yaml"
        path.write_text(yaml.safe_dump(cfg))
        yield path, models


def test_a_policy_that_always_answers_7_scores_exactly_one_half(services, capsys):
    config, models = services
    assert eval_cli.main(["--config", str(config), "--split", "test", "--model", str(models["always_seven"])]) == 0
    out = capsys.readouterr().out
    assert "test: 2 tasks x 1 samples: pass@1 0.500" in out
    written = config.parent / "run" / "eval" / "test.json"
    assert f"report: {written}" in out
    report = json.loads(written.read_text())
    assert report["per_task"] == {"const/3/test": 0, "const/7/test": 1}
    assert report["model"] == str(models["always_seven"]) and report["well_formed"] == 1.0


def test_pass_at_k_from_n_samples_is_the_unbiased_estimate(services, tmp_path):
    config, models = services
    out = tmp_path / "coin.json"
    assert (
        eval_cli.main(
            [
                "--config",
                str(config),
                "--model",
                str(models["coin"]),
                "--split",
                "test",
                "--n",
                "6",
                "--k",
                "1",
                "2",
                "6",
                "--temperature",
                "1.0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    correct = list(report["per_task"].values())
    assert report["n"] == 6 and len(correct) == 2 and 0 < sum(correct) < 12  # a coin: some right, some wrong
    for k in (1, 2, 6):
        assert report["pass_at_k"][f"pass@{k}"] == pytest.approx(np.mean([pass_at_k(6, c, k) for c in correct]))
    assert report["pass_at_k"]["pass@1"] == pytest.approx(sum(correct) / 12)
    assert report["pass_at_k"]["pass@1"] <= report["pass_at_k"]["pass@2"] <= report["pass_at_k"]["pass@6"]


def test_bad_requests_are_refused_with_the_key(services, capsys):
    config, _ = services
    assert eval_cli.main(["--config", str(config), "--n", "4"]) == 2  # greedy samples would all be the same
    assert "grpo.eval.n > 1 needs grpo.eval.temperature > 0" in capsys.readouterr().err
    assert eval_cli.main(["--config", str(config), "--model", str(config.parent)]) == 2
    assert "not an HF model directory" in capsys.readouterr().err
