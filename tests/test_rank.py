"""Ranking policies: Thompson sampling's Laplace posterior, its Monte Carlo propensities, and /rank with it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from ctrkit.data.readers import DataError
from ctrkit.data.synth import make_click_log, synth_schema
from ctrkit.pipeline import train
from ctrkit.serve.rank import choose, laplace_sd, thompson


class _FakeBundle:
    """What laplace_sd reads of a bundle (a class, so that it can be cached by weak reference)."""

    def __init__(self, encoder: SimpleNamespace, metrics: dict) -> None:
        self.encoder, self.metrics = encoder, metrics


def _fake_bundle(counts: list[int], rows: int, positives: int) -> _FakeBundle:
    """One vocabulary field a (ids 0 missing, 1 OOV, then the vocabulary) and one hashed field h (3 ids)."""
    enc = SimpleNamespace(n_ids=2 + len(counts) + 3, sparse_names=["a", "h"], counts={"a": np.array(counts)},
                          offsets={"a": 0, "h": 2 + len(counts)}, sizes={"a": 2 + len(counts), "h": 3})
    return _FakeBundle(enc, {"train": {"rows": rows, "positives": positives}})


def test_laplace_sd_is_the_diagonal_posterior_of_a_first_order_weight() -> None:
    b = _fake_bundle([300, 20], rows=1000, positives=100)  # p = 0.1, curvature 0.09
    sd = laplace_sd(b, prior_precision=2.0)
    expected = [1 / np.sqrt(2.0), 1 / np.sqrt(2.0), 1 / np.sqrt(2.0 + 300 * 0.09), 1 / np.sqrt(2.0 + 20 * 0.09),
                0.0, 0.0, 0.0]
    assert np.allclose(sd, expected)
    assert np.allclose(laplace_sd(b, prior_precision=1.0)[0], 1.0)  # the cache is per prior
    with pytest.raises(ValueError, match="prior_precision"):
        laplace_sd(b, prior_precision=0.0)
    with pytest.raises(DataError, match="training counts"):
        laplace_sd(_FakeBundle(b.encoder, {}))


def test_thompson_top_slot_probability_matches_the_normal_literal_case() -> None:
    # two candidates, each its own id with posterior sd s: P(second first) = P(d + s(z2 - z1) > 0) = Phi(d / (s sqrt 2))
    d, s = 0.5, 1.0
    ids = np.array([[0], [1]])
    slate = thompson(np.array([0.0, d]), ids, np.array([s, s]), k=1, samples=40_000, rng=np.random.default_rng(0))
    truth = norm.cdf(d / (s * np.sqrt(2)))
    p = slate.propensity[0]
    assert abs(p - (truth if slate.index[0] == 1 else 1 - truth)) < 4 * np.sqrt(truth * (1 - truth) / 40_000)


def test_thompson_propensities_sum_right_and_are_reproducible() -> None:
    rng = np.random.default_rng(1)
    n = 5
    logit = rng.normal(0, 0.5, n)
    ids = np.column_stack([np.full(n, 7), np.arange(n)])  # a shared context id and one id per candidate
    sd = np.full(8, 0.8)
    inv = []
    for seed in range(3000):
        slate = thompson(logit, ids, sd, k=n, samples=400, rng=np.random.default_rng(seed))
        assert sorted(slate.index.tolist()) == list(range(n)) and slate.propensity[-1] == 1.0
        assert np.all(slate.propensity >= 1 / 400) and np.all(slate.propensity <= 1)
        inv.append(1.0 / slate.propensity[0])
    # E[1 / q(top pick)] = sum over items of q_i / q_i = the number of items the policy can put on top
    assert np.mean(inv) == pytest.approx(n, rel=0.05)
    a = thompson(logit, ids, sd, k=3, samples=100, rng=np.random.default_rng(9))
    b = thompson(logit, ids, sd, k=3, samples=100, rng=np.random.default_rng(9))
    assert np.array_equal(a.index, b.index) and np.array_equal(a.propensity, b.propensity)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=8), st.integers(1, 8), st.integers(0, 2**31))
def test_thompson_without_uncertainty_is_greedy(logits: list[float], k: int, seed: int) -> None:
    x = np.array(logits)
    ids = np.arange(len(x))[:, None]
    slate = thompson(x, ids, np.zeros(len(x)), k, samples=5, rng=np.random.default_rng(seed))
    assert np.array_equal(slate.index, choose(x, k).index) and np.all(slate.propensity == 1.0)


def test_thompson_ecpm_scale_and_bad_samples() -> None:
    # the bid decides when the logits are certain: the second candidate's 3x bid beats its lower pCTR
    slate = thompson(np.array([0.0, -0.5]), np.array([[0], [1]]), np.zeros(2), 1, samples=3,
                     rng=np.random.default_rng(0), scale=np.array([1.0, 3.0]))
    assert slate.index.tolist() == [1]
    with pytest.raises(ValueError, match="samples"):
        thompson(np.zeros(2), np.array([[0], [1]]), np.ones(2), 1, samples=0)


@pytest.fixture(scope="module")
def lr_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("rank")
    log, _ = make_click_log(n_rows=2000, n_users=100, n_items=50, seed=2)
    train(log.drop("p_click"), schema=synth_schema(), model="lr", out=out / "m", epochs=1, progress=False)
    cols = [f.name for f in synth_schema().fields]
    return out / "m" / "bundle", log.select(cols).head(40).to_dicts()


def test_rank_with_thompson_sampling_over_http(lr_bundle: tuple[Path, list[dict]], tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ctrkit.serve.app import ServerConfig, create_app
    from ctrkit.serve.events import read_events

    path, records = lr_bundle
    body = {"candidates": records, "k": 5, "explore": {"method": "thompson", "samples": 200}}
    answers = []
    for run in range(2):
        with TestClient(create_app(ServerConfig(bundle=path, events=tmp_path / f"log{run}", seed=3))) as c:
            r = c.post("/rank", json=body)
            assert r.status_code == 200, r.text
            answers.append(r.json()["items"])
            bad = c.post("/rank", json={**body, "explore": {"method": "thompson", "samples": 0}})
            assert bad.status_code == 422 and "explore.samples" in bad.text
    items = answers[0]
    assert [(i["index"], i["propensity"]) for i in items] == [(i["index"], i["propensity"]) for i in answers[1]]
    assert len({i["index"] for i in items}) == 5 and all(1 / 200 <= i["propensity"] <= 1 for i in items)
    logged = read_events(tmp_path / "log0", "impression").sort("position")
    assert logged["propensity"].to_list() == [i["propensity"] for i in items]
