"""HTTP server: scores equal Bundle.predict, ranking and exploration, events exactly once, errors are 4xx."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install 'ctrkit[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from ctrkit.data.readers import DataError  # noqa: E402
from ctrkit.data.synth import make_click_log, split_by_time, synth_schema  # noqa: E402
from ctrkit.pipeline import train  # noqa: E402
from ctrkit.serve.app import ServerConfig, create_app  # noqa: E402
from ctrkit.serve.bundle import Bundle  # noqa: E402
from ctrkit.serve.events import read_events  # noqa: E402
from ctrkit.serve.rank import choose  # noqa: E402



@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pl.DataFrame]:
    """Two small DeepFM bundles of the synthetic schema (user_id required), and held-out records."""
    out = tmp_path_factory.mktemp("serve")
    log, _ = make_click_log(n_rows=3000, n_users=200, n_items=100, seed=5)
    schema = synth_schema()
    schema = replace(schema, fields=[replace(f, required=f.name == "user_id") for f in schema.fields])
    tr, va, te = split_by_time(log.drop("p_click"))
    for seed in (0, 1):
        train(tr, schema=schema, valid=va, model="deepfm", out=out / f"m{seed}", epochs=1, batch_size=512,
              seed=seed, progress=False)
    return out / "m0" / "bundle", out / "m1" / "bundle", te


@pytest.fixture()
def client(bundles: tuple[Path, Path, pl.DataFrame], tmp_path: Path) -> TestClient:
    app = create_app(ServerConfig(bundle=bundles[0], events=tmp_path / "log", seed=0, max_batch=500,
                                  segments=("device",)))
    with TestClient(app) as c:
        yield c


def _full(**values: object) -> dict:
    """A record naming every field of the synthetic schema: None (missing) but for ``values``."""
    return {**dict.fromkeys(f.name for f in synth_schema().fields), **values}


def _records(te: pl.DataFrame, n: int) -> list[dict]:
    cols = [f.name for f in synth_schema().fields]
    return te.select(cols).head(n).to_dicts()


def test_score_equals_bundle_predict(client: TestClient, bundles: tuple[Path, Path, pl.DataFrame]) -> None:
    recs = _records(bundles[2], 50)
    recs[3]["item_id"] = "never-seen"
    recs[4]["price"] = "12.5"   # numbers as text read like a file's
    recs[5]["hour"] = 7.0      # an integral float is the category "7"
    r = client.post("/score", json={"records": recs})
    assert r.status_code == 200, r.text
    expected = Bundle.load(bundles[0]).predict(recs)
    assert np.allclose(r.json()["pctr"], expected, atol=1e-7)
    assert r.json()["bundle"] == client.get("/health").json()["bundle"]
    assert client.post("/score", json={"records": []}).json()["pctr"] == []


def test_rank_orders_logs_and_explores(client: TestClient, bundles: tuple[Path, Path, pl.DataFrame],
                                       tmp_path: Path) -> None:
    recs = _records(bundles[2], 30)
    ctx = {k: recs[0][k] for k in ("user_id", "age_group", "gender", "device")}
    cands = [{k: v for k, v in r.items() if k not in ctx} for r in recs]
    p = Bundle.load(bundles[0]).predict([{**ctx, **c} for c in cands])
    r = client.post("/rank", json={"context": ctx, "candidates": cands, "k": 5}).json()
    assert [it["index"] for it in r["items"]] == list(np.argsort(-p, kind="stable")[:5])
    assert all(it["propensity"] == 1.0 for it in r["items"])
    assert [it["position"] for it in r["items"]] == [1, 2, 3, 4, 5]
    bids = [{**c, "bid": float(i % 7 + 1)} for i, c in enumerate(cands)]
    r2 = client.post("/rank", json={"context": ctx, "candidates": bids, "k": 3, "objective": "ecpm"}).json()
    ecpm = p * np.array([i % 7 + 1 for i in range(30)])
    assert [it["index"] for it in r2["items"]] == list(np.argsort(-ecpm, kind="stable")[:3])
    assert np.allclose([it["score"] for it in r2["items"]], np.sort(ecpm)[::-1][:3])
    r3 = client.post("/rank", json={"context": ctx, "candidates": cands, "k": 40,
                                    "explore": {"epsilon": 0.5}}).json()
    assert len(r3["items"]) == 30 and sorted(it["index"] for it in r3["items"]) == list(range(30))
    assert all(0 < it["propensity"] <= 1 for it in r3["items"])
    shown = read_events(tmp_path / "log", "impression")
    assert shown.height == 5 + 3 + 30
    assert set(shown["impression_id"]) >= {it["impression_id"] for it in r["items"]}
    first = shown.filter(pl.col("impression_id") == r["items"][0]["impression_id"]).row(0, named=True)
    assert first["position"] == 1 and first["user_id"] == str(ctx["user_id"])
    assert math.isclose(first["pctr"], r["items"][0]["pctr"])


def test_plain_bodies_take_the_compiled_path_with_the_reference_answers(
        client: TestClient, bundles: tuple[Path, Path, pl.DataFrame], tmp_path: Path) -> None:
    pytest.importorskip("ctrkit.data._records", reason="the compiled module is built only with a C compiler")
    assert client.get("/health").json()["scoring"]["records"] == "compiled"
    recs = _records(bundles[2], 40)
    ctx = {k: recs[0][k] for k in ("user_id", "device")}
    cands = [{**{k: v for k, v in r.items() if k not in ctx}, "bid": 1.0 + i % 3} for i, r in enumerate(recs)]
    rank = {"context": ctx, "candidates": cands, "k": 6, "objective": "ecpm"}
    score = {"records": recs}
    fast = client.post("/rank", json=rank).json(), client.post("/score", json=score).json()
    encoder = client.app.state.ctrkit["live"].bundle.encoder
    plan, encoder._plan = encoder._plan, False  # no compiled plan: the reference path reads the same bodies
    try:
        slow = client.post("/rank", json=rank).json(), client.post("/score", json=score).json()
    finally:
        encoder._plan = plan
    assert [it["index"] for it in fast[0]["items"]] == [it["index"] for it in slow[0]["items"]]
    assert np.allclose([it["pctr"] for it in fast[0]["items"]], [it["pctr"] for it in slow[0]["items"]], atol=1e-12)
    assert np.allclose(fast[1]["pctr"], slow[1]["pctr"], atol=1e-12)
    shown = read_events(tmp_path / "log", "impression").sort("position")
    names = [f.name for f in synth_schema().fields]
    by_request = shown.partition_by("request_id", as_dict=False)
    assert len(by_request) == 2
    assert by_request[0].select(names).equals(by_request[1].select(names))  # the log types both alike


def test_epsilon_greedy_propensities_are_the_slot_probabilities() -> None:
    """Against a literal count: the share of draws that put each item first equals its logged propensity."""
    scores = np.array([0.5, 0.9, 0.1, 0.3])
    rng = np.random.default_rng(0)
    firsts = np.array([choose(scores, 2, 0.3, rng).index[0] for _ in range(20000)])
    slate = choose(scores, 2, 0.3, np.random.default_rng(1))
    expected = {1: 0.7 + 0.3 / 4, 0: 0.3 / 4, 2: 0.3 / 4, 3: 0.3 / 4}
    for item, q in expected.items():
        assert abs(np.mean(firsts == item) - q) < 0.01
    assert math.isclose(slate.propensity[0], expected[int(slate.index[0])])
    greedy = choose(scores, 4)
    assert list(greedy.index) == [1, 0, 3, 2] and list(greedy.propensity) == [1.0] * 4


def test_events_exactly_once(client: TestClient, tmp_path: Path) -> None:
    evs = [{"event_id": f"c{i}", "kind": "click", "impression_id": f"i{i}", "timestamp": 1.7e9 + i}
           for i in range(10)]
    assert client.post("/events", json={"events": evs}).json() == {"stored": 10, "duplicates": 0}
    again = client.post("/events", json={"events": evs[5:] + [{**evs[0], "event_id": "new"}]}).json()
    assert again == {"stored": 1, "duplicates": 5}
    clicks = read_events(tmp_path / "log", "click")
    assert sorted(clicks["event_id"]) == sorted([f"c{i}" for i in range(10)] + ["new"])


@pytest.mark.parametrize("body, status, needle", [
    ("{not json", 422, "JSON"),
    ({"records": [_full(price=[1, 2])]}, 422, "price"),
    ({"records": [_full(user_id="u1", price="cheap")]}, 422, "price"),
    ({"records": [{"item_id": "i1"}]}, 422, "user_id"),
    ({"records": [{k: v for k, v in _full(user_id="u1").items() if k != "price"}]}, 422, "price"),
    ({"records": [_full(user_id="u1", colour="red")]}, 422, "colour"),
    ({"records": [_full(user_id="u1")], "extra": 1}, 422, "extra"),
    ({"records": [_full(user_id="u1", price=10 ** 400)]}, 422, "price"),
    (json.dumps({"records": [_full(user_id="u1", price=0.0)]}).replace("0.0", "NaN"), 422, "price"),
    (json.dumps({"records": [_full(user_id="u1", price=0.0)]}).replace("0.0", "1e999"), 422, "price"),
    ({"records": [_full(user_id="u1")] * 501}, 422, "records"),
    ({"records": "all"}, 422, "records"),
])
def test_bad_score_requests_are_4xx_naming_the_field(client: TestClient, body: object, status: int,
                                                     needle: str) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = client.post("/score", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.text


def test_bad_value_gets_the_bundle_predict_answer(client: TestClient, bundles: tuple[Path, Path, pl.DataFrame]
                                                  ) -> None:
    recs = [_full(user_id="u1", price=3.0), _full(user_id="u2", price="cheap")]
    bundle = Bundle.load(bundles[0])
    with pytest.raises(DataError) as exc:
        bundle.predict(recs)
    r = client.post("/score", json={"records": recs})
    assert r.status_code == 422
    for word in ("record 1", "price"):
        assert word in r.json()["detail"] and word in str(exc.value)


def test_bad_rank_and_event_requests(client: TestClient) -> None:
    cand = [_full(user_id="u1", item_id="a"), _full(user_id="u1", item_id="b") | {"bid": -1.0}]
    r = client.post("/rank", json={"candidates": cand, "objective": "ecpm"})
    assert r.status_code == 422 and "bid" in r.text
    assert client.post("/rank", json={"candidates": []}).status_code == 422
    assert client.post("/rank", json={"candidates": cand[:1], "k": 0}).status_code == 422
    r = client.post("/rank", json={"candidates": cand[:1], "explore": {"epsilon": 2}})
    assert r.status_code == 422 and "epsilon" in r.text
    r = client.post("/events", json={"events": [{"event_id": "e", "kind": "view", "impression_id": "i"}]})
    assert r.status_code == 422 and "kind" in r.text
    r = client.post("/events", json={"events": [{"kind": "click", "impression_id": "i"}]})
    assert r.status_code == 422 and "event_id" in r.text


def test_metrics_give_each_inputs_psi_against_the_training_rows(client: TestClient,
                                                                 bundles: tuple[Path, Path, pl.DataFrame]) -> None:
    """Records scored through the compiled path (/score) and through the frame path (/rank with records the
    compiled path does not take) both count; prices ten times the held-out ones move the price column's PSI."""

    def input_psi() -> dict[str, float]:
        text = client.get("/metrics").text
        return {m[1]: float(m[2]) for m in re.finditer(r'ctrkit_input_psi\{column="([^"]+)"\} (\S+)', text)}

    recs = _records(bundles[2], 300)
    client.post("/score", json={"records": recs})
    before = input_psi()
    bundle = Bundle.load(bundles[0])
    assert set(before) == set(bundle.encoder.sparse_names + bundle.encoder.dense_names)
    assert before["price"] < 0.25
    shifted = [{**r, "price": None if r["price"] is None else r["price"] * 10} for r in recs]
    odd = [{**r, "price": str(r["price"])} for r in shifted[:100] if r["price"] is not None]  # the frame path
    assert client.post("/rank", json={"candidates": odd, "k": 3}).status_code == 200
    framed = input_psi()
    assert framed["price"] > before["price"] + 0.05
    assert framed["user_id"] == pytest.approx(before["user_id"], abs=0.05)
    for start in range(0, 300, 100):
        client.post("/score", json={"records": shifted[start:start + 100]})
    assert input_psi()["price"] > 0.25


def test_health_metrics_and_reload(client: TestClient, bundles: tuple[Path, Path, pl.DataFrame]) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == "deepfm" and h["events"]["stored"] == 0
    scoring = h["scoring"]  # no ONNX exported: torch and the folded form, timed at load
    assert set(scoring["probe_ms"]) == {"torch", "torch folded"} and scoring["skipped"] == {}
    assert scoring["backend"] == min(scoring["probe_ms"], key=scoring["probe_ms"].__getitem__)
    recs = _records(bundles[2], 5)
    client.post("/score", json={"records": recs})
    text = client.get("/metrics").text
    assert 'ctrkit_requests_total{route="/score",status="200"} 1.0' in text
    assert "ctrkit_request_seconds_bucket" in text and "ctrkit_pctr_psi" in text
    r = client.post("/admin/reload", json={"path": str(bundles[1])}).json()
    assert r["previous"] == h["bundle"] and r["bundle"] != h["bundle"]
    after = client.post("/score", json={"records": recs}).json()
    assert after["bundle"] == r["bundle"]
    assert np.allclose(after["pctr"], Bundle.load(bundles[1]).predict(recs), atol=1e-7)
    bad = client.post("/admin/reload", json={"path": str(bundles[1].parent)})
    assert bad.status_code == 422 and f"is a training run folder; its bundle is {bundles[1]}" in bad.text
    assert client.get("/health").json()["bundle"] == r["bundle"]


def test_token_guards_every_route_but_health(bundles: tuple[Path, Path, pl.DataFrame]) -> None:
    app = create_app(ServerConfig(bundle=bundles[0], token="s3cret"))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        for method, path in (("post", "/score"), ("post", "/rank"), ("post", "/events"), ("get", "/metrics"),
                             ("post", "/admin/reload"), ("get", "/docs"), ("get", "/openapi.json")):
            assert getattr(c, method)(path).status_code == 401, path
            assert getattr(c, method)(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.post("/score", json={"records": []}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.post("/score", json={"records": []}, headers={"X-Ctrkit-Token": "s3cret"}).status_code == 200


def test_cli_binds_loopback_by_default() -> None:
    from typer.testing import CliRunner

    from ctrkit.cli import app

    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "127.0.0.1" in help_text


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=4),
                     max_leaves=12)
_fields = st.sampled_from([f.name for f in synth_schema().fields] + ["bid", "quality", "x"])
_record = st.dictionaries(_fields, st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                          max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["/score", "/rank", "/events", "/admin/reload"]),
       body=st.one_of(_json, st.fixed_dictionaries({"records": st.lists(_record, max_size=3)}),
                      st.fixed_dictionaries({"candidates": st.lists(_record, max_size=3), "k": st.integers(),
                                             "objective": st.sampled_from(["pctr", "ecpm", "x"]),
                                             "context": _record})))
def test_no_client_input_gives_a_500(client: TestClient, route: str, body: object) -> None:
    r = client.post(route, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    assert r.status_code < 500, (route, body, r.text)


def test_measure_and_train_read_the_event_log(client: TestClient, bundles: tuple[Path, Path, pl.DataFrame],
                                              tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctrkit.cli import app
    from ctrkit.serve.events import attributed_impressions

    recs = _records(bundles[2], 40)
    shown = []
    for start in range(0, 40, 10):
        r = client.post("/rank", json={"candidates": recs[start:start + 10], "k": 4}).json()
        shown += r["items"]
    clicked = [it["impression_id"] for it in shown[::3]]
    evs = [{"event_id": f"c-{i}", "kind": "click", "impression_id": i} for i in clicked]
    assert client.post("/events", json={"events": evs}).json()["stored"] == len(clicked)
    res = CliRunner().invoke(app, ["measure", "ctr", str(tmp_path / "log"), "--by", "position", "--json"])
    assert res.exit_code == 0, res.output
    rows = {row["position"]: row for row in json.loads(res.stdout)}
    assert set(rows) == {1, 2, 3, 4} and sum(r["clicks"] for r in rows.values()) == len(clicked)
    assert sum(r["impressions"] for r in rows.values()) == 16
    data = attributed_impressions(tmp_path / "log")
    assert data.height == 16 and data["click"].sum() == len(clicked)
    assert set(data.filter(pl.col("click") == 1)["impression_id"]) == set(clicked)
    out = tmp_path / "retrained"
    res = CliRunner().invoke(app, ["train", str(tmp_path / "log"), "--schema", str(bundles[0] / "schema.yaml"),
                                   "--model", "lr", "--epochs", "1", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["train"]["rows"] > 0


def test_hot_swap_fails_no_request_in_flight(client: TestClient, bundles: tuple[Path, Path, pl.DataFrame]
                                             ) -> None:
    import threading

    recs = _records(bundles[2], 200)
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            r = client.post("/score", json={"records": recs})
            statuses.append(r.status_code)
            versions.add(r.json().get("bundle", "?"))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    served = {client.get("/health").json()["bundle"]}
    for path in (bundles[1], bundles[0], bundles[1]):
        r = client.post("/admin/reload", json={"path": str(path)})
        assert r.status_code == 200
        served.add(r.json()["bundle"])
    stop.set()
    for t in threads:
        t.join()
    assert statuses and set(statuses) == {200}
    assert versions <= served and len(served) == 2  # every answer came from one of the two bundles


_scalar = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False,
                                                                                allow_infinity=False) | st.text(max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(records=st.lists(st.fixed_dictionaries({f.name: _scalar for f in synth_schema().fields}), min_size=1,
                        max_size=4))
def test_score_answers_as_bundle_predict(client: TestClient, bundles: tuple[Path, Path, pl.DataFrame],
                                         records: list[dict]) -> None:
    """Records parsed by orjson and read column by column get Bundle.predict's scores, or its error as a 422."""
    r = client.post("/score", content=json.dumps({"records": records}), headers={"content-type": "application/json"})
    try:
        want = _bundle(bundles[0]).predict(records)
    except DataError as exc:
        assert r.status_code == 422 and r.json()["detail"] == str(exc)
    else:
        assert r.status_code == 200, r.text
        assert np.allclose(r.json()["pctr"], want, atol=1e-7)


_loaded: dict[Path, Bundle] = {}


def _bundle(path: Path) -> Bundle:
    return _loaded.setdefault(path, Bundle.load(path))


@pytest.mark.skipif(not hasattr(__import__("os"), "setpriority"), reason="thread priorities are a POSIX call")
def test_a_bundle_loads_in_a_thread_of_the_lowest_priority() -> None:
    import os
    import threading

    from ctrkit.serve.events import lowest_priority

    seen: list[int] = []

    def probe() -> None:
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        lowest_priority()
        seen.extend([before, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())])

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert seen[1] == 19 and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == seen[0]


def test_watched_bundle_folder_is_reloaded_without_failing_a_request(bundles: tuple[Path, Path, pl.DataFrame],
                                                                     tmp_path: Path) -> None:
    """Copying another bundle over the served folder swaps it in once the copy has settled; requests running
    meanwhile all succeed, and a folder that does not load leaves the last bundle serving and says why."""
    import shutil
    import threading
    import time

    served = tmp_path / "served"
    shutil.copytree(bundles[0], served)
    recs = _records(bundles[2], 100)
    with TestClient(create_app(ServerConfig(bundle=served, watch=0.05))) as c:
        before = c.get("/health").json()["bundle"]
        statuses: list[int] = []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                statuses.append(c.post("/score", json={"records": recs}).status_code)

        thread = threading.Thread(target=hammer)
        thread.start()
        shutil.copytree(bundles[1], served, dirs_exist_ok=True)
        deadline = time.time() + 60
        while c.get("/health").json()["bundle"] == before and time.time() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join()
        after = c.get("/health").json()
        assert after["bundle"] != before and statuses and set(statuses) == {200}
        assert np.allclose(c.post("/score", json={"records": recs}).json()["pctr"],
                           _bundle(bundles[1]).predict(recs), atol=1e-7)
        (served / "weights.safetensors").write_bytes(b"broken")
        deadline = time.time() + 60
        while not c.get("/health").json()["watch"]["error"] and time.time() < deadline:
            time.sleep(0.05)
        health = c.get("/health").json()
        assert "weights.safetensors" in health["watch"]["error"] and health["bundle"] == after["bundle"]
        assert c.post("/score", json={"records": recs}).status_code == 200


@pytest.mark.parametrize(("kwargs", "said"), [({"max_body_bytes": 0}, "max_body_bytes must be at least 1, got 0"),
                                              ({"monitor_window": -5}, "monitor_window must be at least 1, got -5"),
                                              ({"watch": float("nan")}, "--watch must be 0 (off) or a number"),
                                              ({"token": ""}, "--token is empty"), ({"token": "  "}, "--token is empty")])
def test_server_config_refuses_settings_that_cannot_serve(tmp_path: Path, kwargs: dict, said: str) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        ServerConfig(bundle=tmp_path, **kwargs)


def test_segments_must_be_fields_of_the_bundle(bundles: tuple[Path, Path, pl.DataFrame]) -> None:
    """A request carries the bundle's fields and nothing else: a segment by any other name put every impression
    under "None"."""
    with pytest.raises(ValueError, match=re.escape("--segments ['devise']: not fields of the bundle")):
        create_app(ServerConfig(bundle=bundles[0], segments=("device", "devise")))


@pytest.mark.parametrize(("host", "token", "warned"), [
    ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False), ("127.0.0.2", None, False),
    ("0.0.0.0", None, True), ("10.1.2.3", None, True), ("::", None, True), ("myhost", None, True),
    ("0.0.0.0", "s3cret", False)])
def test_serving_beyond_this_machine_without_a_token_is_warned_of(host: str, token: str | None,
                                                                  warned: bool) -> None:
    from ctrkit.serve.app import exposure_warning

    said = exposure_warning(host, token)
    assert (said is not None) == warned
    if warned:
        assert f"serving on {host} without --token" in said and "/admin/reload" in said
