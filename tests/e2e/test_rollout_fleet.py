"""A rollout fleet: two embedded servers behind the real sglang-router, all on loopback and all stopped at the end.

Generation goes through the router and is spread over both servers, with the results a single server gives for
the same seeds; weights go to each server, which must report the new version; a server killed mid-round loses no
request (the router re-sends its requests to the other) and the round's rewards equal those of a round without the
kill; a server that cannot load the weights is named and the sync fails; a GRPO run launches the fleet itself."""

import signal
import threading
import time

import httpx
import jax
import numpy as np
import pytest
import yaml

from fr_jax import train
from fr_jax.config import parse_config
from fr_jax.data.task_file import load_task_file
from fr_jax.models.hf import load_pretrained
from fr_jax.parallel.mesh import make_mesh
from fr_jax.rl.collect import Collector, TaskStream, generate_groups, sampling_seeds
from fr_jax.rl.modes import DirectCode
from fr_jax.rl.setup import planned_rollout, rollout_params, rollout_service, sandbox_session, server_env
from fr_jax.rl.sync import PolicySync
from fr_jax.rollout import RolloutClient, RolloutError, launch_local, launch_router, launch_server
from fr_jax.rollout.client import load_weights
from fr_jax.trainer.metrics import read_metrics
from fr_jax.trainer.records import read_records, rollouts_path
from tests.support.grpo import KNOWS_THE_FORMAT, build_tokenizer, grpo_config, write_bigram_model, write_tasks
from tests.support.rollout import build_tiny_qwen2, sglang_missing

pytestmark = pytest.mark.slow

ROLLOUT = {"n": 8, "prompts_per_step": 2, "max_new_tokens": 8, "max_running_requests": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    tokenizer = build_tokenizer(root / "tokenizer")
    return root, write_bigram_model(root / "prior", tokenizer, KNOWS_THE_FORMAT), write_tasks(root / "tasks.jsonl")


def server_state(url: str) -> dict:
    return httpx.get(url + "/server_info", timeout=30).json()["internal_states"][0]


def wait_until_stuck(url: str, thread: threading.Thread, still_s: float = 1.0) -> int:
    """The requests the server at `url` has answered once that count stops growing while `thread` still runs."""
    deadline, count, since = time.monotonic() + 120, -1, time.monotonic()
    while time.monotonic() - since < still_s:
        assert time.monotonic() < deadline and thread.is_alive(), "the round ended before the kill"
        now = server_state(url)["jobs_served"]
        if now != count:
            count, since = now, time.monotonic()
        time.sleep(0.05)
    return count


@pytest.fixture(scope="module")
def fleet(files):
    """Two running servers given as grpo.rollout.urls, and sglang-router started by the run in front of them."""
    root, model_dir, tasks_file = files
    servers = [
        launch_local(
            model_dir, mesh="1,1,1", max_running_requests=1, env=server_env(), log_path=root / f"server_{i}.log"
        )
        for i in range(2)
    ]
    try:
        rollout = {**ROLLOUT, "launch": "none", "urls": [s.url for s in servers], "router": "sglang-router"}
        rollout["router_policy"] = "round_robin"  # cache_aware may keep both prompts on one server
        cfg = parse_config(grpo_config(root / "run", model_dir, tasks_file, rounds=1, rollout=rollout))
        _, port = planned_rollout(cfg.grpo.rollout)
        with rollout_service(cfg.grpo.rollout, None, weight_version="0", seed=0, log_dir=root, port=port) as fleet:
            yield cfg, servers, fleet
    finally:
        for server in servers:
            server.stop()


def test_generation_is_spread_by_the_router_and_weights_reach_every_server(fleet, files, tmp_path):
    cfg, servers, fleet = fleet
    _, model_dir, _ = files
    assert fleet.client.base_url not in {s.url for s in servers} and len(fleet.workers) == 2
    params, n = rollout_params(cfg.grpo), cfg.grpo.rollout.n
    prompts = [[3], [4]]  # the task words "three" and "seven"
    seeds = sampling_seeds(0, 0, 0, count=len(prompts) * n)
    routed = generate_groups(fleet.client, prompts, params, n, seeds)
    with RolloutClient(servers[0].url) as alone:
        direct = generate_groups(alone, prompts, params, n, seeds)
    assert [[r.output_ids for r in g] for g in routed] == [[r.output_ids for r in g] for g in direct]
    assert all(server_state(s.url)["jobs_served"] > 0 for s in servers[1:])  # the router used both servers

    sync = PolicySync(cfg.grpo.rollout, tmp_path)
    try:
        model = load_pretrained(model_dir, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
        figures = sync.push(fleet, model, "1")
    finally:
        sync.close()
    assert figures["sync/gigabytes"] > 0
    assert [w.weight_version() for w in fleet.workers] == ["1", "1"]
    after = generate_groups(fleet.client, prompts, params, n, seeds)
    assert {r.weight_version for g in after for r in g} == {"1"}


def test_a_server_killed_mid_round_loses_no_request(fleet, files):
    """The same round collected twice from the fleet (rollout, sandbox, reward): once whole, once with a server
    that hangs (SIGSTOP) as the round starts and is killed once the rest of the round waits on it. Every sample
    comes back, with the same seeds the same completions and rewards. Then the next weight sync names the dead
    server and fails."""
    cfg, servers, fleet = fleet
    root, model_dir, tasks_file = files
    grpo = cfg.grpo
    tasks = load_task_file(tasks_file, "train")
    mode = DirectCode(reward=grpo.reward, count_tokens=len, instruction="")
    prompt_of = {t.task_id: [3 if "/3/" in t.task_id else 4] for t in tasks}

    def collector() -> Collector:
        return Collector(grpo, mode, TaskStream(tasks, 0), prompt_of, rollout_params(grpo), seed=0)

    version = fleet.workers[0].weight_version()
    with sandbox_session(grpo.sandbox, mode, rollout_url=None, log_dir=root) as sandbox:
        whole = collector().collect(fleet.client, sandbox, 0, version)
        result: dict = {}

        def collect_again() -> None:
            try:
                result["data"] = collector().collect(fleet.client, sandbox, 0, version)
            except BaseException as err:  # raised again on the test's thread
                result["error"] = err

        served, total = server_state(servers[0].url)["jobs_served"], len(whole.drawn) * grpo.rollout.n
        servers[1].process.send_signal(signal.SIGSTOP)  # it takes the round's requests and answers none of them
        thread = threading.Thread(target=collect_again)
        thread.start()
        before_kill = wait_until_stuck(servers[0].url, thread) - served
        assert before_kill < total  # the rest of the round waits on the stopped server
        servers[1].process.kill()
        thread.join(timeout=300)
    # the live server answered every request of the round, those the killed one held too, and each once
    assert server_state(servers[0].url)["jobs_served"] - served == total
    if "error" in result:
        raise result["error"]
    killed = result["data"]
    assert len(killed.drawn) == len(whole.drawn) == grpo.rollout.prompts_per_step
    for a, b in zip(whole.drawn, killed.drawn):
        assert a.task.task_id == b.task.task_id and a.seeds == b.seeds and len(b.rollouts) == grpo.rollout.n
        assert [r.output_ids for r in a.rollouts] == [r.output_ids for r in b.rollouts]
        np.testing.assert_array_equal(a.rewards, b.rewards)
    assert np.ptp(np.concatenate([g.rewards for g in whole.drawn])) > 0  # right and wrong answers alike

    with pytest.raises(RolloutError, match=rf"did not load on 1 of 2 rollout server\(s\).*{servers[1].url}"):
        fleet.load(model_dir, weight_version="2")


def test_a_grpo_round_through_a_fleet_the_run_launches(tmp_path, files):
    """python -m fr_jax.train with grpo.rollout.replicas 2 behind sglang-router: both servers and the router start
    (their logs in the run directory), the round samples through the router, trains, and syncs both servers."""
    _, model_dir, tasks_file = files
    run_dir = tmp_path / "run"
    rollout = {"replicas": 2, "router": "sglang-router", "scheduling": "static"}  # the default policy, cache_aware
    cfg = grpo_config(run_dir, model_dir, tasks_file, rounds=1, rollout=rollout)
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(cfg))
    assert train.main(["--config", str(tmp_path / "grpo.yaml")]) == 0
    logs = {p.name for p in (run_dir / "logs").iterdir()}
    assert {"rollout_server_local_0.log", "rollout_server_local_1.log", "sglang_router.log"} <= logs
    for server in range(2):  # both servers got the run's engine settings
        log = (run_dir / "logs" / f"rollout_server_local_{server}.log").read_text()
        assert "static scheduling, max_running_requests 16" in log, log[-2000:]
    [round_one] = [m for m in read_metrics(run_dir) if "reward/total" in m]
    assert round_one["weight_version"] == 1.0 and np.isfinite(round_one["time/sync_s"])
    assert round_one["train/mismatch/abs_logp_diff"] < 1e-3  # the fleet sampled with the trainer's weights
    written = read_records(rollouts_path(run_dir, 1))
    assert len(written) == 16 and {x["weight_version"] for x in written} == {"0"}


@pytest.mark.gpu
def test_two_real_sglang_servers_behind_the_router(tmp_path, smollm2_dir):
    """Real SGLang twice on one GPU behind the real router: seeded samples through the router equal one server's,
    and a weight load reaches both as the new version."""
    missing = sglang_missing()
    if missing:
        pytest.skip(f"real SGLang needs a CUDA GPU and the sglang package: {missing}")
    model_dir = build_tiny_qwen2(tmp_path / "tiny_qwen2", smollm2_dir)
    servers = [
        launch_server("sglang", model_dir, mem_fraction_static=0.2, weight_version="0", log_path=tmp_path / f"{i}.log")
        for i in range(2)
    ]
    try:
        with launch_router([s.url for s in servers], policy="round_robin", log_path=tmp_path / "router.log") as router:
            prompts = [[31, 32, 33], [41, 42, 43], [51, 52, 53], [61, 62, 63]]
            params = [{"max_new_tokens": 8, "temperature": 1.0, "sampling_seed": seed} for seed in range(len(prompts))]
            with RolloutClient(router.url) as routed, RolloutClient(servers[0].url) as alone:
                through = [routed.generate([p], q)[0][0].output_ids for p, q in zip(prompts, params)]
                direct = [alone.generate([p], q)[0][0].output_ids for p, q in zip(prompts, params)]
            assert through == direct
            workers = [RolloutClient(s.url) for s in servers]
            load_weights(workers, model_dir, weight_version="1")
            assert [w.weight_version() for w in workers] == ["1", "1"]
    finally:
        for server in servers:
            server.stop()
