"""The GRPO loop: the update is exact under micro-batching and sharding, the trainer scores the tokens the engine
sampled, failures are never rewards, and the whole loop runs over HTTP (server, sandbox, weight sync, checkpoint,
exact resume) through `python -m fr_jax.train`."""

import asyncio
import json
import pathlib
import shutil

import jax
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

from fr_jax import train
from fr_jax.config import ConfigError, apply_overrides, load_config, parse_config
from fr_jax.data.task_file import load_task_file
from fr_jax.data.tasks import load_tasks
from fr_jax.models.config import ModelConfig
from fr_jax.models.decoder import abstract_model, create_model
from fr_jax.parallel.mesh import make_mesh
from fr_jax.rl.batch import Layout, pack_rollouts
from fr_jax.rl.collect import TaskStream
from fr_jax.rl.grpo import GRPOLossConfig, finalize_metrics, merge_metrics
from fr_jax.rl.modes import DirectCode, SandboxFailure, evaluate_with_retries
from fr_jax.rl.reward import RewardConfig
from fr_jax.rl.update import LogprobPass, grpo_loss_fn
from fr_jax.rollout import Rollout, free_port
from fr_jax.rollout.engine import Engine, GenerationRequest, SamplingOptions
from fr_jax.sandbox.client import (
    AssertTests,
    EvalItem,
    Evaluation,
    SandboxClient,
    SandboxRequestError,
    SandboxUnavailable,
)
from fr_jax.sandbox.local import LocalSandbox
from fr_jax.sandbox.suites import suite_item
from fr_jax.trainer.metrics import read_metrics
from fr_jax.trainer.records import read_records, rollouts_path
from fr_jax.trainer.step import TrainStep
from tests.support.grpo import HEADER, KNOWS_THE_FORMAT, build_tokenizer, grpo_config, write_bigram_model, write_tasks

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = ModelConfig.from_hf(
    dict(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
)
LAYOUT = Layout(prompt_len=6, response_len=10)
ROWS = 16


def random_rollout_rows(seed: int) -> dict[str, np.ndarray]:
    """Rows with very uneven response lengths, off-policy old log-probs and a rollout engine that disagrees."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 64, rng.integers(2, LAYOUT.prompt_len + 1)).tolist() for _ in range(ROWS)]
    lengths = np.repeat([1, 10, 3, 7], 4)
    # log-probs near the random model's own (about -log 64), so the ratios straddle the clip bounds
    rollouts = [
        Rollout(
            rng.integers(1, 64, n).tolist(),
            (-np.log(64) + rng.normal(scale=0.6, size=n)).tolist(),
            "",
            "length",
            None,
            len(p),
            "0",
        )
        for p, n in zip(prompts, lengths)
    ]
    batch = pack_rollouts(prompts, rollouts, LAYOUT)
    batch["advantages"] = rng.normal(size=ROWS).astype(np.float32)
    batch["old_logp"] = (batch["rollout_logp"] + rng.normal(scale=0.5, size=batch["rollout_logp"].shape)).astype(
        np.float32
    )
    return batch


def one_update(mesh, micro_batches: int, config: GRPOLossConfig, params, batch):
    step = TrainStep(
        abstract_model(TINY),
        grpo_loss_fn(config, temperature=0.8),
        optax.sgd(1.0),
        mesh=mesh,
        micro_batches=micro_batches,
        combine_metrics=merge_metrics,
    )
    state = step.init_state(jax.device_put(params, step.param_shardings), seed=0)
    micro = {k: v.reshape(micro_batches, -1, *v.shape[1:]) for k, v in batch.items()}
    state, metrics = step(state, step.put_global_batch(micro))
    metrics = jax.device_get(metrics)
    stats = finalize_metrics({k: v for k, v in metrics.items() if isinstance(v, tuple)})
    return float(metrics["loss"]), jax.device_get(state.params), stats


def test_update_is_the_same_for_any_micro_batching_and_device_count():
    """1, 2 or 4 micro-batches on 1 device and 4 on 8 devices (data x fsdp x tensor): same loss, same new weights,
    same metrics, including maxima and minima (merged as extremes, not summed). DAPO's token-mean is the
    aggregation that goes wrong when micro-batch means are averaged."""
    config = GRPOLossConfig(agg="token-mean", dual_clip=3.0)
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = jax.device_get(nnx.to_pure_dict(nnx.state(create_model(TINY, mesh=one))))
    batch = random_rollout_rows(0)
    reference = one_update(one, 1, config, params, batch)
    stats = reference[2]
    assert stats["clip/low_frac"] + stats["clip/high_frac"] > 0.05  # the clipped branches are exercised
    assert stats["mismatch/capped_frac"] > 0.02 and stats["ratio/max"] > 1 + config.clip_high
    for mesh, micro_batches in [(one, 2), (one, 4), (make_mesh(2, 2, 2), 4)]:
        loss, new_params, got = one_update(mesh, micro_batches, config, params, batch)
        np.testing.assert_allclose(loss, reference[0], rtol=2e-6)
        for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(reference[1])):
            np.testing.assert_allclose(a, b, atol=2e-6)
        assert got.keys() == stats.keys()
        for key in stats:
            np.testing.assert_allclose(got[key], stats[key], rtol=2e-5, err_msg=key)


def test_trainer_log_probs_match_the_engine():
    """The row layout, the logit slice and the temperature convention: the trainer's recomputed log-prob of each
    sampled token equals the engine's (same weights), so the logged mismatch measures only numerics."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = create_model(TINY, mesh=mesh, rngs_seed=3)
    engine = Engine(model, mesh=mesh, eos_token_ids=(0,), max_seq_len=64)
    rng = np.random.default_rng(1)
    prompts = [tuple(rng.integers(1, 64, k).tolist()) for k in (2, 6, 4, 5)]
    options = SamplingOptions(max_new_tokens=LAYOUT.response_len, temperature=0.7, seed=5)
    completions = engine.generate([GenerationRequest(p, options, n=2) for p in prompts])
    rows = [
        (p, Rollout(c.output_ids, c.logprobs, "", "length", None, len(p), "0"))
        for p, group in zip(prompts, completions)
        for c in group
    ]
    batch = pack_rollouts([p for p, _ in rows], [r for _, r in rows], LAYOUT)
    assert batch["mask"].sum(1).min() < LAYOUT.response_len or batch["mask"].sum() > 0
    step = TrainStep(abstract_model(TINY), grpo_loss_fn(GRPOLossConfig(), 0.7), optax.sgd(0.0), mesh=mesh)
    trainer = LogprobPass(step, temperature=0.7, rows=4)(nnx.to_pure_dict(nnx.state(model)), batch)
    mask = batch["mask"] > 0
    assert np.abs(trainer - batch["rollout_logp"])[mask].max() < 2e-4
    assert np.all(trainer[~mask] <= 0)


def test_task_stream_resumes_where_it_stopped(tmp_path):
    tasks = load_task_file(write_tasks(tmp_path / "tasks.jsonl"), "train")
    stream = TaskStream(tasks * 3, seed=4)
    first = [t.task_id for t in stream.take(5)]
    state = stream.get_state()
    rest = [t.task_id for t in stream.take(9)]  # crosses into the next epoch (a new seeded order)
    resumed = TaskStream(tasks * 3, seed=4)
    resumed.set_state(json.loads(json.dumps(state)))
    assert [t.task_id for t in resumed.take(9)] == rest
    assert sorted(first + rest[:1]) == sorted(t.task_id for t in tasks * 3)  # an epoch is a permutation
    with pytest.raises(ValueError, match="had 6 tasks, this run has 2"):
        TaskStream(tasks, seed=4).set_state(state)


def test_task_file_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task_id": "a", "split": "train", "prompt": "p", "entry_point": "f", "tests": []}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: `tests` must be a non-empty list"):
        load_task_file(path, "train")
    path.write_text('{"task_id": "a", "split": "train", "prompt": "p", "tests": ["assert 1"], "extra": 1}\n')
    with pytest.raises(ValueError, match=r"missing fields \['entry_point'\], unknown fields \['extra'\]"):
        load_task_file(path, "train")


def test_reference_solutions_pass_and_stubs_fail_in_the_real_sandbox(benchmark_dir):
    """The sandbox requests built from tasks keep the suites' layout (as the plain programs of tests/data run them):
    MBPP with test imports and setup code, HumanEval's hidden check() and public asserts with helpers defined in the
    prompt (HumanEval/32's poly)."""
    wanted = {"Mbpp/367", "Mbpp/927", "Mbpp/602", "HumanEval/32", "HumanEval/38"}
    tasks = [
        t
        for name in ("mbpp", "humaneval")
        for t in load_tasks(name, "all", data_dir=benchmark_dir)
        if t.task_id in wanted
    ]
    items, expected = [], []
    for task in tasks:
        for hidden in (True, False):
            suite = task.hidden_tests if hidden else task.public_tests
            if suite.cases:
                stub = f"def {task.entry_point}(*args):\n    return None"
                for solution, passes in ((task.reference_solution, True), (stub, False)):
                    items.append(suite_item(suite, task.entry_point, solution, timeout_s=10, memory_limit_mb=1024))
                    expected.append((task.task_id, hidden, passes))

    async def run(url):
        async with SandboxClient(url) as sandbox:
            return await evaluate_with_retries(sandbox, items, [e[0] for e in expected], retries=1)

    with LocalSandbox(workers=2) as sandbox:
        results = asyncio.run(run(sandbox.url))
    assert len(tasks) == len(wanted) and len(results) >= 16
    for (task_id, hidden, passes), result in zip(expected, results):
        assert result.passed_all == passes, (task_id, hidden, result)


class _UnjudgingSandbox:
    """Stands in for the sandbox's transport in the one state a live service cannot be put in on demand: answering
    SandboxError (its jail failed). Recovers after `recover_after` calls, or never; counts the calls."""

    def __init__(self, recover_after: int | None):
        self.calls, self.recover_after = 0, recover_after

    async def evaluate_batch(self, items):
        self.calls += 1
        ok = self.recover_after is not None and self.calls > self.recover_after
        body = (
            {"status": "Finished", "tests": [{"name": "t", "passed": True, "status": "Passed"}]}
            if ok
            else {"status": "SandboxError", "message": "jail setup failed", "tests": []}
        )
        return [Evaluation.from_json(body) for _ in items]


def test_a_sandbox_error_is_retried_then_raised_never_scored(tmp_path):
    item = EvalItem("def f():\n    return 1", AssertTests(["assert f() == 1"]))
    recovering = _UnjudgingSandbox(recover_after=2)
    results = asyncio.run(evaluate_with_retries(recovering, [item], ["const/1"], retries=2))
    assert recovering.calls == 3 and results[0].passed_all
    broken = _UnjudgingSandbox(recover_after=None)
    with pytest.raises(
        SandboxFailure,
        match=r"could not judge 1 of 1 programs after 2 retries \(first: const/1: "
        r"jail setup failed\)",
    ):
        asyncio.run(evaluate_with_retries(broken, [item], ["const/1"], retries=2))
    assert broken.calls == 3
    tasks = load_task_file(write_tasks(tmp_path / "tasks.jsonl"), "train")
    mode = DirectCode(reward=RewardConfig(), count_tokens=len, instruction="", retries=0)
    with pytest.raises(SandboxFailure):
        asyncio.run(mode.score(broken, tasks[:1], [f"```python\n{HEADER}3\n```"], hidden=True))


def test_an_unreachable_sandbox_stops_the_round_with_the_cause(tmp_path):
    tasks = load_task_file(write_tasks(tmp_path / "tasks.jsonl"), "train")
    mode = DirectCode(reward=RewardConfig(), count_tokens=len, instruction="")

    async def score():
        async with SandboxClient(f"http://127.0.0.1:{free_port()}", unreachable_after_s=1.0) as sandbox:
            return await mode.score(sandbox, tasks[:1], [HEADER + "3"], hidden=True)

    with pytest.raises(SandboxUnavailable, match="cannot reach the sandbox service"):
        asyncio.run(score())


def test_the_configured_python_is_the_one_that_judges(tmp_path, sandbox):
    """grpo.sandbox.python reaches every request: the service's own python judges, an unknown name is refused
    with the names the service knows (a setup mistake, raised, never a score)."""
    tasks = load_task_file(write_tasks(tmp_path / "tasks.jsonl"), "train")
    answer = [f"```python\n{HEADER}{tasks[0].task_id.split('/')[1]}\n```"]

    async def score(python):
        mode = DirectCode(reward=RewardConfig(), count_tokens=len, instruction="", python=python)
        async with SandboxClient(sandbox.url) as client:
            return await mode.score(client, tasks[:1], answer, hidden=True)

    (scored,) = asyncio.run(score("default"))
    assert scored.passed_all and scored.evaluation.tests
    with pytest.raises(SandboxRequestError, match=r"bcb.*default"):
        asyncio.run(score("bcb"))


def test_demo_config_loads_and_bad_grpo_keys_are_named(tmp_path):
    cfg = load_config(REPO / "configs" / "grpo_demo.yaml")
    rollout = cfg.grpo.rollout
    assert (rollout.prompts_per_step * rollout.n) % cfg.train.batch_size == 0 and cfg.grpo.loss.beta == 0
    assert cfg.grpo.loss.norm_adv_by_std is False
    tree = yaml.safe_load((REPO / "configs" / "grpo_demo.yaml").read_text())
    # grpo.loss and grpo.reward are typed sections: a bad key or value is named when the config loads
    with pytest.raises(ConfigError, match=r"grpo.loss.cliplow: unknown key; allowed here: agg, beta, clip_high"):
        parse_config(apply_overrides(tree, ["grpo.loss.cliplow=0.2"]))
    with pytest.raises(ConfigError, match=r"grpo.reward: RewardConfig.w_format must be >= 0, got -1"):
        parse_config(apply_overrides(tree, ["grpo.reward.w_format=-1.0"]))
    dr_grpo = parse_config(apply_overrides(tree, ["grpo.loss.agg=seq-mean-token-sum-norm"]))
    assert dr_grpo.grpo.loss.max_gen_len == rollout.max_new_tokens  # Dr.GRPO's constant L
    with pytest.raises(ConfigError, match="grpo.rollout.url is required with grpo.rollout.launch 'none'"):
        parse_config(apply_overrides(tree, ["grpo.rollout.launch=none"]))
    with pytest.raises(ConfigError, match=r"grpo.eval.n > 1 needs grpo.eval.temperature > 0"):
        parse_config(apply_overrides(tree, ["grpo.eval.n=4"]))


# ------------------------------------------------------------------------------------------- the whole loop


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_loop")
    tokenizer = build_tokenizer(root / "tokenizer")
    return write_bigram_model(root / "prior", tokenizer, KNOWS_THE_FORMAT), write_tasks(root / "tasks.jsonl")


def run_cli(cfg: dict, path) -> int:
    path.write_text(yaml.safe_dump(cfg))
    return train.main(["--config", str(path)])


def test_two_rounds_over_http_then_an_exact_resume(tmp_path, tiny_setup, capsys):
    """python -m fr_jax.train with stage grpo: the local server (HTTP) samples, the real sandbox judges, weights are
    synced after each round and checkpointed with the rollout state; a run resumed from round 1's checkpoint
    reproduces round 2 exactly."""
    model_dir, tasks_file = tiny_setup
    run_dir = tmp_path / "run"
    cfg = grpo_config(run_dir, model_dir, tasks_file, rounds=2)
    assert run_cli(cfg, tmp_path / "grpo.yaml") == 0
    printed = capsys.readouterr().out
    assert "held-out pass@1 (test, 2 tasks):" in printed and "training reward" in printed
    records = read_metrics(run_dir)
    rounds = {m["step"]: m for m in records if "reward/total" in m}
    assert sorted(rounds) == [1, 2]
    for m in rounds.values():
        for key in (
            "reward/performance",
            "reward/complexity",
            "reward/efficiency",
            "reward/format",
            "pass_rate",
            "all_pass_rate",
            "groups/zero_variance_frac",
            "train/entropy",
            "train/ratio/max",
            "train/mismatch/abs_logp_diff",
            "train/clip/high_frac",
            "response/length_mean",
            "time/rollout_s",
            "time/sandbox_s",
            "time/train_s",
            "time/sync_s",
            "sync/seconds_per_gb",
        ):
            assert np.isfinite(m[key]), key
        assert m["train/mismatch/abs_logp_diff"] < 1e-3  # the server sampled with the weights the trainer holds
        assert m["well_formed"] > 0.3  # most answers were run by the sandbox
    assert 0 < max(rounds[r]["pass_rate"] for r in (1, 2)) < 1  # some right, some wrong: rewards that teach
    assert [rounds[r]["weight_version"] for r in (1, 2)] == [1.0, 2.0]
    assert all(rounds[r]["rollout/compiles"] >= 0 and rounds[r]["rollout/compile_s"] >= 0 for r in (1, 2))
    assert {m["step"] for m in records if "eval/pass_at_1" in m} == {0, 2}
    assert (run_dir / "hf" / "config.json").is_file() and list((run_dir / "tensorboard").iterdir())
    host = json.loads(next((run_dir / "checkpoints" / "1" / "host").glob("process_0*.json")).read_text())
    assert host == {"tasks": {"epoch": 0, "cursor": 2, "size": 2}, "weight_version": "1"}
    # every sample of every round is recorded (docs/records.md), with the reward and advantage it trained on
    samples = {r: read_records(rollouts_path(run_dir, r)) for r in (1, 2)}
    for r, written in samples.items():
        assert len(written) == cfg["grpo"]["rollout"]["prompts_per_step"] * cfg["grpo"]["rollout"]["n"]
        assert np.mean([x["reward"]["total"] for x in written]) == pytest.approx(rounds[r]["reward/total"])
        for group in {x["group"] for x in written}:
            rewards = np.array([x["reward"]["total"] for x in written if x["group"] == group])
            advantages = np.array([x["advantage"] for x in written if x["group"] == group])
            assert np.all(np.sign(advantages) == np.sign(np.round(rewards - rewards.mean(), 6)))
        ran = [x for x in written if x["well_formed"]]
        assert ran and all(x["sandbox"]["tests"] and x["solution"] and x["weight_version"] == str(r - 1) for x in ran)
    assert {p.name for p in (run_dir / "eval" / "records").iterdir()} == {
        "test_direct_round_00000.jsonl.gz",
        "test_direct_round_00002.jsonl.gz",
    }

    # resume: drop round 2's checkpoint and redo it, this time without held-out evaluation (train.eval_batches 0)
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed, ignore=shutil.ignore_patterns("hf"))
    shutil.rmtree(resumed / "checkpoints" / "2")
    no_eval = {**cfg, "run_dir": str(resumed), "train": {**cfg["train"], "eval_batches": 0}}
    assert run_cli(no_eval, tmp_path / "resumed.yaml") == 0
    assert "held-out pass@1" not in capsys.readouterr().out  # no evaluation, so no held-out figures
    redone = {m["step"]: m for m in read_metrics(resumed) if "reward/total" in m}
    assert sorted(redone) == [1, 2]  # round 2's old line was replaced, not duplicated
    for key in ("reward/total", "pass_rate", "train/loss", "train/grad_norm", "response/length_mean"):
        assert redone[2][key] == rounds[2][key], key
    # the resumed run's fresh server compiled while sampling its first round (no evaluation compiled it before)
    assert redone[2]["rollout/compiles"] > 0 and redone[2]["rollout/compile_s"] > 0
