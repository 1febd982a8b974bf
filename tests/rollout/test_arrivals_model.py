"""bench/arrivals_model.py's queueing model of the two schedulers against schedules worked out by hand.

Costs: a decode step takes 1 s at any rows, a prefill 0.5 s for any group; chunks of 4 steps.
"""

import pathlib

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).parents[2] / "bench"


@pytest.fixture
def model(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import arrivals_model

    return arrivals_model


@pytest.fixture
def costs(model):
    return model.Costs({4: 1.0, 8: 1.0, 16: 1.0}, {n: 0.5 for n in (1, 2, 4, 8, 16)})


@pytest.mark.parametrize("scheduling", ["continuous", "static"])
def test_one_request_is_its_prefill_then_its_steps(model, costs, scheduling):
    replay = model.simulate(scheduling, [0.0], [8], costs)
    assert replay.latencies.tolist() == [8.5]


def test_static_makes_a_late_request_wait_for_the_batch(model, costs):
    # A (8 tokens) runs 0.5-8.5; B, arrived at 0.1, is prefilled at 8.5 and decodes 9.0-13.0
    replay = model.simulate("static", [0.0, 0.1], [8, 4], costs)
    np.testing.assert_allclose(replay.latencies, [8.5, 12.9])


def test_continuous_admits_between_chunks(model, costs):
    # A's first chunk ends at 4.5 (none finished, so it runs whole); B's prefill pauses A until 5.0; both end at 9.0
    replay = model.simulate("continuous", [0.0, 0.1], [8, 4], costs)
    np.testing.assert_allclose(replay.latencies, [9.0, 8.9])


def test_a_finished_row_cuts_the_chunk_short_only_when_a_request_waits(model, costs):
    # A and C start together (0.5); B waits, so the chunk ends when A finishes (1.5); B is prefilled by 2.0 and
    # ends a step later; C runs on to its 8th token: 4 steps by 6.0, 3 more by 9.0
    replay = model.simulate("continuous", [0.0, 0.0, 0.1], [1, 8, 1], costs)
    np.testing.assert_allclose(replay.latencies, [1.5, 9.0, 2.9])
    # nobody waiting: the chunk runs its 4 steps, and C ends one chunk later
    replay = model.simulate("continuous", [0.0, 0.0], [1, 8], costs)
    np.testing.assert_allclose(replay.latencies, [1.5, 8.5])


def test_rows_round_up_to_a_bucket(model):
    # 5 live rows decode as 8: 2 s a step instead of the 4-row bucket's 1 s
    costs = model.Costs({4: 1.0, 8: 2.0, 16: 4.0}, {n: 0.0 for n in (1, 2, 4, 8, 16)})
    assert model.simulate("static", [0.0] * 5, [1] * 5, costs).latencies.tolist() == [2.0] * 5
    assert model.simulate("static", [0.0] * 4, [1] * 4, costs).latencies.tolist() == [1.0] * 4


def test_capacity_counts_until_the_queue_empties(model, costs):
    # all at once, one slot: the first request runs 0-4.5, the second is admitted at 4.5 (the queue empties) and its
    # chunk ends at 9.0: 8 tokens in 9 s, over 4 tokens a request
    assert model.capacity("continuous", [4, 4], costs, slots=1) == pytest.approx(8 / 9 / 4)
    # with room for both, the queue empties in the first round: 8 tokens by 4.5 s
    assert model.capacity("continuous", [4, 4], costs) == pytest.approx(8 / 4.5 / 4)
