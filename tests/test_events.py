"""Event log: exactly once per event id, torn tails cut, compaction crash-safe, and a SIGKILLed server loses
no acknowledged event."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from ctrkit.data.readers import DataError
from ctrkit.serve.events import EventLog, EventLogError, PeerClicks, measure_frames, open_writer, read_events
from ctrkit.serve.process import free_port, start_server


def _clicks(lo: int, hi: int) -> list[dict]:
    return [{"event_id": f"e{i}", "kind": "click", "impression_id": f"i{i}", "timestamp": 1.7e9 + i}
            for i in range(lo, hi)]


def test_append_is_exactly_once_across_reopen_and_segments(tmp_path: Path) -> None:
    with EventLog(tmp_path / "log", segment_bytes=2000) as log:
        assert log.append(_clicks(0, 50)) == [True] * 50
        assert log.append(_clicks(40, 60)) == [False] * 10 + [True] * 10
    assert len(list((tmp_path / "log" / "parquet").glob("*.parquet"))) > 1  # rolled and compacted
    with EventLog(tmp_path / "log") as log:
        assert len(log) == 60 and "e59" in log
        assert log.append(_clicks(55, 70)) == [False] * 5 + [True] * 10
        live = read_events(tmp_path / "log", "click")  # readable while the writer is open
        assert live.height == 70
    df = read_events(tmp_path / "log")
    assert sorted(df["event_id"]) == sorted(f"e{i}" for i in range(70))
    assert df.filter(pl.col("event_id") == "e7")["timestamp"][0] == 1.7e9 + 7


def test_a_full_segment_is_compacted_beside_the_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rolling to a new segment does not make appends wait for the compaction, which runs in its own thread;
    the compacted events read back as they were written (impressions with text, numbers and nulls, clicks)."""
    real = EventLog._compact
    started = threading.Event()

    def slow(self: EventLog, seg: Path, events: list | None = None) -> None:
        if events is None:  # the compactor thread's call
            started.set()
            time.sleep(1.0)
        real(self, seg, events)

    monkeypatch.setattr(EventLog, "_compact", slow)
    imps = [{"event_id": f"m{i}", "kind": "impression", "impression_id": f"m{i}", "timestamp": 1.7e9 + i,
             "item": None if i % 7 == 0 else f"it{i % 5}", "price": None if i % 3 == 0 else i / 4,
             "position": 1 + i % 10, "explored": i % 2 == 0} for i in range(60)]
    log = EventLog(tmp_path / "log", segment_bytes=3000)
    log.append(imps[:30])  # past 3,000 bytes: the segment rolls and its compaction starts
    assert started.wait(5)
    t0 = time.perf_counter()
    assert log.append(imps[30:] + _clicks(0, 5)) == [True] * 35
    assert time.perf_counter() - t0 < 0.5  # did not wait for the second-long compaction
    log.close()  # waits for the compactor
    assert not list((tmp_path / "log" / "segments").glob("*.jsonl"))
    back = read_events(tmp_path / "log").sort("timestamp")
    want = pl.from_dicts(imps + _clicks(0, 5), infer_schema_length=None).sort("timestamp")
    assert back.select(want.columns).to_dicts() == want.to_dicts()


def test_torn_tail_is_cut_and_interrupted_compaction_is_not_doubled(tmp_path: Path) -> None:
    path = tmp_path / "log"
    log = EventLog(path)
    log.append(_clicks(0, 5))
    seg = log._segment
    log._fh.write(b'{"event_id":"half","kind":"cl')  # a write the crash cut short, never acknowledged
    log._fh.flush()
    log._closed = True  # stop the writer without compacting, as a crash would
    with log._cond:
        log._cond.notify()
    log._writer.join()
    log._fh.close()
    # a crash after a compaction's rename but before the segment was deleted: both hold the same events
    done = path / "parquet" / f"{seg.stem}.parquet"
    read_events(path).write_parquet(done)
    with EventLog(path) as again:
        assert len(again) == 5 and "half" not in again
    assert sorted(read_events(path)["event_id"]) == [f"e{i}" for i in range(5)]


def test_bad_events_and_folders_name_the_problem(tmp_path: Path) -> None:
    with EventLog(tmp_path / "log") as log:
        with pytest.raises(EventLogError, match="event 1: event_id"):
            log.append([_clicks(0, 1)[0], {"kind": "click"}])
        with pytest.raises(EventLogError, match="kind"):
            log.append([{"event_id": "x", "kind": "view"}])
        with pytest.raises(EventLogError, match="'value'"):
            log.append([{"event_id": "x", "kind": "click", "value": float("nan")}])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x")
    with pytest.raises(EventLogError, match="not a ctrkit event log"):
        EventLog(tmp_path / "plain")
    with pytest.raises(EventLogError, match="a.txt is a file; an event log is a folder"):
        EventLog(tmp_path / "plain" / "a.txt")  # was '[Errno 20] Not a directory'
    with pytest.raises(DataError, match="not a ctrkit event log"):
        read_events(tmp_path / "plain")
    with pytest.raises(DataError, match="no impressions"):
        measure_frames(tmp_path / "log")


@pytest.mark.slow
def test_writers_of_one_log_are_read_as_one_with_each_event_once(tmp_path: Path) -> None:
    """Two processes' writer slots: a retry stored by both is read once (the first stored); a slot is free
    again once its writer is gone."""
    a, b = open_writer(tmp_path / "log"), open_writer(tmp_path / "log")
    assert (a.path.name, b.path.name) == ("00", "01")
    a.append(_clicks(0, 30))
    b.append([{**e, "timestamp": e["timestamp"] + 5} for e in _clicks(20, 40)])  # 20..29 retried elsewhere
    df = read_events(tmp_path / "log", "click")
    assert sorted(df["event_id"]) == sorted(f"e{i}" for i in range(40))
    assert df.filter(pl.col("event_id") == "e25")["timestamp"][0] == 1.7e9 + 25
    a.close()
    c = open_writer(tmp_path / "log")
    assert c.path.name == "00" and "e3" in c and len(c) == 30
    b.close()
    c.close()
    assert read_events(tmp_path / "log").height == 40


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_mid_stream_loses_no_acknowledged_event(tmp_path: Path, workers: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the killed server cannot remove its workers' metrics folder
    httpx = pytest.importorskip("httpx2", reason="the test client needs the 'test' extra")
    from ctrkit.data.synth import make_click_log, synth_schema
    from ctrkit.pipeline import train

    df, _ = make_click_log(n_rows=1500, n_users=50, n_items=30, seed=1)
    train(df.drop("p_click"), schema=synth_schema(), model="lr", out=tmp_path / "m", epochs=1, progress=False)
    bundle, log, port = tmp_path / "m" / "bundle", tmp_path / "log", free_port()
    proc = start_server(bundle, port, log, workers=workers)
    acked: list[str] = []
    sent: list[list[dict]] = []
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            i = 0
            while not stop.is_set():
                batch = _clicks(i, i + 7)
                sent.append(batch)
                i += 7
                try:
                    r = c.post("/events", json={"events": batch})
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    acked.extend(e["event_id"] for e in batch)

    t = threading.Thread(target=stream)
    t.start()
    while len(acked) < 300:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the server and, with --workers, every worker process
    proc.wait()
    stop.set()
    t.join()
    proc = start_server(bundle, port, log, workers=workers)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            for batch in sent:  # the client retries everything it is not sure of, and more
                assert c.post("/events", json={"events": batch}).status_code == 200
            stored = c.get("/health").json()["events"]["stored"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    ids = read_events(log, "click")["event_id"].to_list()
    assert set(acked) <= set(ids)
    assert len(ids) == len(set(ids)) == sum(len(b) for b in sent)
    assert stored == len(ids) or workers > 1  # a worker counts the events of its own writer slot
    segments = list(log.glob("segments/*.jsonl")) + list(log.glob("writers/*/segments/*.jsonl"))
    assert all(p.stat().st_size == 0 for p in segments)
    assert json.loads((log / "ctrkit-events.json").read_text())["format"] == 1
    assert any(p.is_dir() for p in log.glob("**/parquet"))


def test_peer_clicks_are_the_other_writers_new_complete_lines(tmp_path: Path) -> None:
    root = tmp_path / "log"
    a, b = open_writer(root), open_writer(root)
    try:
        b.append(_clicks(0, 3))  # before the feed starts: not read
        feed = PeerClicks(root, a.path)
        assert feed.read() == []
        a.append(_clicks(10, 12))  # this writer's own clicks: not read
        b.append(_clicks(3, 5) + [{"event_id": "imp9", "kind": "impression", "impression_id": "i9",
                                   "timestamp": 1.7e9}])
        assert feed.read() == ["i3", "i4"] and feed.read() == []
        segment = next((b.path / "segments").glob("*.jsonl"))
        line = json.dumps({"event_id": "e7", "kind": "click", "impression_id": "i7", "timestamp": 1.7e9})
        with open(segment, "ab") as fh:  # a line being written: read once it is whole
            fh.write(line[:20].encode())
        assert feed.read() == []
        with open(segment, "ab") as fh:
            fh.write(line[20:].encode() + b"\n")
        assert feed.read() == ["i7"]
    finally:
        a.close()
        b.close()


def test_peer_clicks_finish_segments_compacted_between_reads(tmp_path: Path) -> None:
    """A writer whose segments roll over and compact between two reads: every click appended after the first read
    comes back once, from the Parquet files, the lines already read from a segment not again."""
    root = tmp_path / "log"
    a = open_writer(root)
    b = EventLog(root / "writers" / "peer", segment_bytes=600)  # a few clicks a segment
    try:
        feed = PeerClicks(root, a.path)
        b.append(_clicks(0, 2))
        assert feed.read() == ["i0", "i1"]
        for i in range(2, 30):
            b.append(_clicks(i, i + 1))
    finally:
        b.close()  # compacts what is left; the closed segments are compacted by now
        a.close()
    assert not list((root / "writers" / "peer" / "segments").glob("*.jsonl"))
    assert len(list((root / "writers" / "peer" / "parquet").glob("*.parquet"))) > 3
    got = feed.read()
    assert sorted(got, key=lambda s: int(s[1:])) == [f"i{i}" for i in range(2, 30)] and feed.read() == []


def test_peer_clicks_read_a_segment_until_it_is_gone_then_its_parquet_rows_after_those_read(tmp_path: Path) -> None:
    """The compactor renames the Parquet file into place before it deletes the segment: while both exist the
    segment is read; once it is gone only the Parquet rows after the lines read count."""
    root, own = tmp_path / "log", tmp_path / "log" / "writers" / "00"
    seg = root / "writers" / "01" / "segments" / "000001.jsonl"
    seg.parent.mkdir(parents=True)
    (root / "writers" / "01" / "parquet").mkdir()
    own.mkdir()
    feed = PeerClicks(root, own)
    events = _clicks(0, 5) + [{"event_id": "imp", "kind": "impression", "timestamp": 1.7e9}] + _clicks(5, 7)
    lines = [json.dumps(e) + "\n" for e in events]
    seg.write_text("".join(lines[:3]))
    assert feed.read() == ["i0", "i1", "i2"]
    with open(seg, "a") as fh:
        fh.write("".join(lines[3:5]))
    pl.from_dicts(events).write_parquet(seg.parent.parent / "parquet" / "000001.parquet")
    assert feed.read() == ["i3", "i4"]  # the segment is still there
    seg.unlink()
    assert feed.read() == ["i5", "i6"] and feed.read() == []


def test_a_worker_that_ends_without_stopping_leaves_its_counts_but_not_its_live_gauges(tmp_path: Path) -> None:
    """Under --workers N a worker killed by its supervisor (a missed health check) or by the kernel cannot mark
    itself dead in the shared metrics folder; the next scrape (by a sibling worker) drops its live gauges, keeps its
    counts in the sums, and keeps a live worker's gauges. A gauge file whose pid now belongs to a process that is
    no worker of this server (here pid 1) goes too."""
    pytest.importorskip("prometheus_client", reason="the server's metrics need the 'serve' extra")
    import subprocess
    import sys

    from ctrkit.serve.app import METRICS_DIR_ENV

    folder = tmp_path / "metrics"
    folder.mkdir()
    worker = ("import os, sys, time; from prometheus_client import Counter, Gauge; "
              "Gauge('ctrkit_pred_actual_ratio', 'r', multiprocess_mode='liveall').set(float(sys.argv[1])); "
              "Counter('ctrkit_scored_records', 's').inc(3); print(os.getpid(), flush=True); "
              "time.sleep(float(sys.argv[2]))")
    env = {**os.environ, METRICS_DIR_ENV: str(folder)}
    ended = subprocess.Popen([sys.executable, "-c", worker, "0.25", "0"], env=env, stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", worker, "0.5", "60"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert ended.stdout is not None and live.stdout is not None
        ended_pid, live_pid = int(ended.stdout.readline()), int(live.stdout.readline())
        assert ended.wait(timeout=30) == 0
        assert len(list(folder.glob("gauge_live*.db"))) == 2
        if Path("/proc/1/stat").exists():  # pid 1 runs, as the child of no worker's supervisor
            shutil.copy(folder / f"gauge_liveall_{ended_pid}.db", folder / "gauge_liveall_1.db")
        scrape = subprocess.run([sys.executable, "-c", "from ctrkit.serve.app import _Metrics; "
                                 "print(_Metrics().exposition().decode())"], env=env, capture_output=True, text=True,
                                check=True)  # a sibling of the workers, as the worker that answers a scrape is
        lines = dict(line.rsplit(" ", 1) for line in scrape.stdout.splitlines() if line and not line.startswith("#"))
        assert lines[f'ctrkit_pred_actual_ratio{{pid="{live_pid}"}}'] == "0.5"
        assert lines["ctrkit_scored_records_total"] == "6.0"
        gone = (f'pid="{ended_pid}"', 'pid="1"')
        assert not [k for k in lines if any(g in k for g in gone)]
        assert not {f"gauge_liveall_{ended_pid}.db", "gauge_liveall_1.db"} & {p.name for p in folder.iterdir()}
        assert ended_pid != live_pid
    finally:
        live.kill()
        live.wait()


def test_input_psi_of_a_swapped_out_bundle_goes_or_reads_nan_under_workers(tmp_path: Path) -> None:
    """After a hot swap the input PSI gauges are the new bundle's columns: one process drops the old columns'
    series; under --workers N (a shared metrics folder, where a series cannot be removed) they read NaN, with no
    warning from prometheus-client."""
    pytest.importorskip("prometheus_client", reason="the server's metrics need the 'serve' extra")
    import subprocess
    import sys

    from ctrkit.serve.app import METRICS_DIR_ENV, _Metrics

    def psi(text: str) -> dict[str, str]:
        return dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("ctrkit_input_psi{"))

    swap = [{"price": 0.1, "city": 0.2}, {"price": 0.3, "age": 0.05}]  # the PSIs of one bundle, then another's
    m = _Metrics()
    for values in swap:
        m.set_input_psi(values)
    assert psi(m.exposition().decode()) == {'ctrkit_input_psi{column="price"}': "0.3",
                                            'ctrkit_input_psi{column="age"}': "0.05"}
    folder = tmp_path / "metrics"
    folder.mkdir()
    code = (f"from ctrkit.serve.app import _Metrics; m = _Metrics()\nfor v in {swap!r}: m.set_input_psi(v)\n"
            "print(m.exposition().decode())")
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env={**os.environ, METRICS_DIR_ENV: str(folder)},
                         capture_output=True, text=True, check=True)
    pid = int(next(p.stem.rsplit("_", 1)[1] for p in folder.glob("gauge_liveall_*.db")))
    assert psi(out.stdout) == {f'ctrkit_input_psi{{column="{c}",pid="{pid}"}}': v
                               for c, v in (("price", "0.3"), ("city", "NaN"), ("age", "0.05"))}
    assert "Clearing labels" not in out.stderr


def test_metrics_of_several_workers_are_read_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --workers 2 every scrape, whichever worker answers it, counts the requests and records of both; the
    live gauges come one per worker (label pid), and a click posted to either worker counts where its impression
    was served: with every shown item clicked, each worker's pred/actual is the item's pCTR. The workers' shared
    metrics folder goes when the server stops."""
    httpx = pytest.importorskip("httpx2", reason="the test client needs the 'test' extra")
    from ctrkit.data.synth import make_click_log, synth_schema
    from ctrkit.pipeline import train
    from ctrkit.serve.app import GAUGES_EVERY, PEER_CLICKS_EVERY

    df, _ = make_click_log(n_rows=1500, n_users=50, n_items=30, seed=2)
    df = df.drop("p_click")
    train(df, schema=synth_schema(), model="lr", out=tmp_path / "m", epochs=1, progress=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the server makes its metrics folder
    (tmp_path / "tmp").mkdir()
    port = free_port()
    proc = start_server(tmp_path / "m" / "bundle", port, tmp_path / "log", workers=2)
    records = df.drop("click", "timestamp").head(3).to_dicts()
    try:
        assert [p.name for p in (tmp_path / "tmp").iterdir()][0].startswith("ctrkit-metrics-")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            def scrape() -> dict[str, str]:
                text = c.get("/metrics").text
                return dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))

            def ratios(lines: dict[str, str]) -> list[float]:
                return [float(v) for k, v in lines.items() if k.startswith("ctrkit_pred_actual_ratio{pid=")]

            # /health was answered by one worker: wait until both serve, each having set its gauges once (a
            # gauge starts at 0 when the worker builds its app; its first update, with nothing served, is NaN)
            ready = time.time() + 60
            while not (len(live := ratios(scrape())) == 2 and 0.0 not in live) and time.time() < ready:
                time.sleep(0.2)

            def post(path: str, body: dict) -> dict:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as fresh:  # a new connection
                    reply = fresh.post(path, json=body)
                assert reply.status_code == 200
                return reply.json()

            def click(i: int, item: dict) -> dict:
                return post("/events", {"events": [{"event_id": f"c{i}", "kind": "click", "timestamp": time.time(),
                                                    "impression_id": item["impression_id"]}]})

            # eight connections at a time, so that both workers take requests of each kind: one after another, the
            # worker that answered last could take them all
            shown: list[dict] = []
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda _: post("/score", {"records": records}), range(40)))
                # the same candidates each time: the same item, at the same pCTR, on top; rounds of 30 until each
                # worker has served some (a worker that served none keeps a NaN ratio)
                for _ in range(4):
                    got = [item for reply in pool.map(lambda _: post("/rank", {"candidates": records, "k": 1}),
                                                      range(30)) for item in reply["items"]]
                    list(pool.map(click, range(len(shown), len(shown) + len(got)), got))
                    shown += got
                    start, every = time.time(), PEER_CLICKS_EVERY + GAUGES_EVERY  # clicks handed over, gauges set
                    while (live := ratios(scrape())) != pytest.approx([shown[0]["pctr"]] * 2, rel=1e-9):
                        waited = time.time() - start
                        if waited > 10 * every or (waited > 3 * every and any(r != r for r in live)):
                            break  # by then a worker that served impressions has counted them: NaN served none
                        time.sleep(0.5)
                    if not any(r != r for r in ratios(scrape())):
                        break
            for _ in range(6):
                lines = scrape()
                assert float(lines["ctrkit_scored_records_total"]) == 40 * 3 + len(shown) * 3
                assert float(lines['ctrkit_requests_total{route="/score",status="200"}']) == 40
                assert ratios(lines) == pytest.approx([shown[0]["pctr"]] * 2, rel=1e-9)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not list((tmp_path / "tmp").iterdir())
