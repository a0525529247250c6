"""The loop simulation's evaluation panel: common random numbers (the same ranking gets the same clicks), clicks
drawn from the planted model, and the paired round-over-round test against literal arithmetic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "loop_sim.py"
_SPEC = importlib.util.spec_from_file_location("loop_sim", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
loop_sim = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(loop_sim)


def _world(seed: int = 0) -> object:
    return loop_sim.World(n_users=40, n_items=30, positions=5, eta=1.0, ctr=0.1, seed=seed)


def test_the_panel_gives_the_same_ranking_the_same_clicks_and_leaves_the_worlds_draws_alone() -> None:
    world = _world()
    state = world.rng.bit_generator.state
    panel = loop_sim.Panel(world, requests=50, n_cand=12, k=5, seed=0)
    assert world.rng.bit_generator.state == state  # the live traffic's draws are not consumed
    scores = np.random.default_rng(1).random(panel.items.shape)
    a, ea = panel.clicks(world, scores)
    b, eb = panel.clicks(world, scores.copy())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ea, eb)
    assert panel.frame.height == 50 * 12


def test_panel_clicks_follow_the_planted_model_slot_by_slot() -> None:
    world = _world(3)
    panel = loop_sim.Panel(world, requests=20, n_cand=8, k=4, seed=3)
    scores = np.random.default_rng(2).random(panel.items.shape)
    clicks, expected = panel.clicks(world, scores)
    for r in range(20):
        order = np.argsort(-scores[r], kind="stable")[:4]
        p = [min(world.exam[s] * loop_sim.sigmoid(world.logit[panel.users[r], panel.items[r, j]] + world.b), 1.0)
             for s, j in enumerate(order)]
        assert clicks[r] == sum(u < q for u, q in zip(panel.uniform[r], p))
        assert expected[r] == pytest.approx(sum(p))


def test_ranking_by_the_planted_relevance_beats_a_random_ranking_on_the_panel() -> None:
    world = _world(5)
    panel = loop_sim.Panel(world, requests=400, n_cand=20, k=5, seed=5)
    truth = world.logit[panel.users[:, None], panel.items]
    good, _ = panel.clicks(world, truth)
    rand, _ = panel.clicks(world, np.random.default_rng(0).random(truth.shape))
    rise = loop_sim.paired_rises([rand, good], k=5)[0]
    assert rise["change"] > 0 and rise["z"] > 3


def test_paired_rises_against_literal_arithmetic() -> None:
    a, b = np.array([1, 0, 2, 1]), np.array([2, 0, 2, 3])
    d = (b - a) / 2  # k = 2 slots per request
    mean, sd = d.mean(), np.sqrt(((d - d.mean()) ** 2).sum() / 3)
    out = loop_sim.paired_rises([a, b], k=2)
    assert out[0]["change"] == pytest.approx(mean)
    assert out[0]["z"] == pytest.approx(mean / (sd / 2))
    assert loop_sim.paired_rises([a, a], k=2) == [{"change": 0.0, "z": 0.0}]  # no change at all: z 0
    assert loop_sim.paired_rises([a, a + 1], k=2) == [{"change": 0.5, "z": float("inf")}]
