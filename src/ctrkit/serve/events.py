"""Event log: durable, append-only storage of impressions, clicks and conversions, exactly once per event id.

Layout of a log folder::

    LOG/ctrkit-events.json      marks the folder as an event log (format version)
    LOG/segments/000007.jsonl   the open segment: one JSON event per line, fdatasync'd before an append returns
    LOG/parquet/000006.parquet  closed segments, compacted (one file per segment, every kind of event)

An append is acknowledged only after its lines are on disk, so a crash (SIGKILL, power loss after the sync)
never loses an acknowledged event. Appends from many threads share one sync (group commit). Every event carries
an ``event_id``; an id already in the log is not written again, which makes client retries after a crash
harmless. A segment is compacted by writing its Parquet file under a temporary name, renaming it into place and
only then deleting the JSON lines, so a crash at any point leaves each event in exactly one of the two. On open,
a torn last line (a write that never completed, hence was never acknowledged) is cut off. A full segment is
compacted by a thread of its own, at the lowest CPU priority, while appends go on into the next one: reading back
and rewriting 32 MB took about a second, during which every append, and every /rank awaiting one, used to wait.

Several server processes (``ctrkit serve --workers N``) share one log folder: each claims a writer slot,
``LOG/writers/NN``, an event log of its own held under an exclusive lock while the process lives (a restarted
process takes a free slot and recovers it). A retry that reaches another process than the first attempt is
stored twice; readers keep the first copy of each ``event_id``, so every acknowledged event is read exactly once.

``ctrkit measure`` and ``ctrkit train`` read a log folder directly (:func:`read_events`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl

from ctrkit.data.readers import DataError
from ctrkit.fsutil import fsync_dir

LOG_FORMAT = 1
MARKER = "ctrkit-events.json"
KINDS = ("impression", "click", "conversion")
SEGMENT_BYTES = 32 << 20


class EventLogError(ValueError):
    """A folder is not an event log, or an event cannot be stored."""


def is_event_log(path: str | Path) -> bool:
    """True when ``path`` is an event log folder."""
    return (Path(path) / MARKER).is_file()


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete events of a JSON-lines segment and the byte length they span (a torn tail is left out)."""
    data = path.read_bytes()
    events: list[dict[str, Any]] = []
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            events.append(json.loads(line))
        except ValueError:
            break
        good += len(line)
    return events, good


def lowest_priority() -> None:
    """Run the calling thread at the lowest CPU priority (Linux sets it per thread): work beside live traffic
    (loading a bundle, compacting a segment) then takes the CPU time that requests leave, instead of slowing
    every request meanwhile."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # another system: the thread keeps the usual priority
        pass


def _report_failure(done: Future[None]) -> None:
    """Log a compaction that failed: its events stay in the segment's JSON lines, read and compacted later."""
    exc = done.exception()
    if exc is not None:
        logging.getLogger(__name__).error("compacting a closed event segment failed (its JSON lines are kept): %r",
                                          exc)


def _segment_frame(seg: Path) -> pl.DataFrame:
    """A closed segment's events as one frame, parsed by polars (in Rust: the requests keep the GIL); by
    Python's json when polars cannot type a column (a key holding text in one event and a number in another)."""
    try:
        return pl.read_ndjson(seg, infer_schema_length=None)
    except (pl.exceptions.PolarsError, ValueError):
        return _frame(_read_lines(seg)[0])


def _frame(events: list[dict[str, Any]]) -> pl.DataFrame:
    """Events as one frame; columns are the union of the events' keys."""
    if not events:
        return pl.DataFrame({"event_id": [], "kind": [], "timestamp": []},
                            schema={"event_id": pl.String, "kind": pl.String, "timestamp": pl.Float64})
    return pl.from_dicts(events, infer_schema_length=None)


class EventLog:
    """An event log folder opened for appending (one writer process at a time)."""

    def __init__(self, path: str | Path, segment_bytes: int = SEGMENT_BYTES, sync: bool = True) -> None:
        self.path = Path(path)
        self.segment_bytes = segment_bytes
        self.sync = sync
        marker = self.path / MARKER
        if self.path.exists() and not self.path.is_dir():
            raise EventLogError(f"{self.path} is a file; an event log is a folder (a new one is made where none is)")
        if self.path.exists() and any(self.path.iterdir()) and not marker.exists():
            raise EventLogError(f"{self.path} exists and is not a ctrkit event log (no {MARKER})")
        (self.path / "segments").mkdir(parents=True, exist_ok=True)
        (self.path / "parquet").mkdir(exist_ok=True)
        if not marker.exists():
            marker.write_text(json.dumps({"format": LOG_FORMAT}))
            fsync_dir(self.path)
        elif json.loads(marker.read_text()).get("format") != LOG_FORMAT:
            raise EventLogError(f"{self.path}: event log format {json.loads(marker.read_text()).get('format')} "
                                f"is not supported")
        self._ids: set[str] = set()
        self._slot_lock: Any = None  # the writer slot's lock file, set by open_writer
        self._recover()
        self._queue: list[tuple[list[dict[str, Any]], Future[list[bool]]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self.counts = {k: 0 for k in KINDS}
        self._compactor = ThreadPoolExecutor(1, thread_name_prefix="ctrkit-event-compact",
                                             initializer=lowest_priority)
        self._writer = threading.Thread(target=self._run, name="ctrkit-event-log", daemon=True)
        self._writer.start()

    # -- recovery ----------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Load known event ids, finish interrupted compactions, cut torn tails, open a fresh segment."""
        for tmp in (self.path / "parquet").glob("*.tmp"):
            tmp.unlink()
        for part in sorted((self.path / "parquet").glob("*.parquet")):
            self._ids.update(pl.read_parquet(part, columns=["event_id"])["event_id"].to_list())
        for seg in sorted((self.path / "segments").glob("*.jsonl")):
            if (self.path / "parquet" / f"{seg.stem}.parquet").exists():
                seg.unlink()  # compacted before the crash; the Parquet file holds its events
                continue
            events, good = _read_lines(seg)
            if good != seg.stat().st_size:
                with open(seg, "r+b") as fh:
                    fh.truncate(good)
                    os.fsync(fh.fileno())
            self._ids.update(e["event_id"] for e in events)
            self._compact(seg, events)
        numbers = [int(p.stem) for p in (self.path / "parquet").glob("*.parquet")]
        self._seq = max(numbers, default=0) + 1
        self._open_segment()

    def _open_segment(self) -> None:
        self._segment = self.path / "segments" / f"{self._seq:06d}.jsonl"
        self._fh = open(self._segment, "ab")
        fsync_dir(self._segment.parent)

    def _compact(self, seg: Path, events: list[dict[str, Any]] | None = None) -> None:
        """Write a closed segment's events (read from it when not given) as Parquet (temp name, sync, rename),
        then delete the segment."""
        frame = _segment_frame(seg) if events is None else _frame(events)
        if frame.height:
            final = self.path / "parquet" / f"{seg.stem}.parquet"
            tmp = final.with_suffix(".tmp")
            frame.write_parquet(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)
        seg.unlink()
        fsync_dir(seg.parent)

    # -- appending ---------------------------------------------------------------------------------
    def append_async(self, events: Iterable[Mapping[str, Any]]) -> Future[list[bool]]:
        """Queue events; the future resolves once they are durable, to one flag per event: True if newly
        stored, False if its event_id was already in the log."""
        batch = [dict(e) for e in events]
        for i, e in enumerate(batch):
            if not isinstance(e.get("event_id"), str) or not e["event_id"]:
                raise EventLogError(f"event {i}: event_id must be a non-empty string")
            if e.get("kind") not in KINDS:
                raise EventLogError(f"event {i}: kind must be one of {list(KINDS)}, got {e.get('kind')!r}")
            e.setdefault("timestamp", time.time())
            for k, v in e.items():
                if isinstance(v, float) and not math.isfinite(v):
                    raise EventLogError(f"event {i}: field {k!r} is {v}, not a finite number")
        fut: Future[list[bool]] = Future()
        with self._cond:
            if self._closed:
                raise EventLogError(f"{self.path}: the event log is closed")
            self._queue.append((batch, fut))
            self._cond.notify()
        return fut

    def append(self, events: Iterable[Mapping[str, Any]]) -> list[bool]:
        """Store events durably (see :meth:`append_async`) and wait for it."""
        return self.append_async(events).result()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                work, self._queue = self._queue, []
                if not work and self._closed:
                    return
            try:
                results = self._write(work)
            except BaseException as exc:  # the disk failed: every waiting append learns it
                for _, fut in work:
                    fut.set_exception(exc)
                continue
            for (_, fut), res in zip(work, results):
                fut.set_result(res)

    def _write(self, work: list[tuple[list[dict[str, Any]], Future[list[bool]]]]) -> list[list[bool]]:
        lines: list[bytes] = []
        results: list[list[bool]] = []
        fresh: list[dict[str, Any]] = []
        for batch, _ in work:
            flags = []
            for e in batch:
                new = e["event_id"] not in self._ids
                if new:
                    self._ids.add(e["event_id"])
                    lines.append(json.dumps(e, separators=(",", ":"), allow_nan=False).encode() + b"\n")
                    fresh.append(e)
                flags.append(new)
            results.append(flags)
        if lines:
            self._fh.write(b"".join(lines))
            self._fh.flush()
            if self.sync:
                os.fdatasync(self._fh.fileno())
            for e in fresh:
                self.counts[e["kind"]] += 1
            if self._fh.tell() >= self.segment_bytes:
                self._roll()
        return results

    def _roll(self) -> None:
        """Close the full segment and open the next at once; the compactor thread turns the closed one into
        Parquet (a crash before it finishes leaves the JSON lines, which opening the log compacts)."""
        self._fh.close()
        closed = self._segment
        self._seq += 1
        self._open_segment()
        self._compactor.submit(self._compact, closed).add_done_callback(_report_failure)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def close(self) -> None:
        """Write what is queued, compact the open segment and stop the writer."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._writer.join()
        self._compactor.shutdown(wait=True)
        self._fh.close()
        events, _ = _read_lines(self._segment)
        self._compact(self._segment, events)
        if self._slot_lock is not None:
            self._slot_lock.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_writer(path: str | Path, slots: int = 1024) -> EventLog:
    """An event log of its own for this process inside the shared log folder ``path``: the first writer slot
    ``path/writers/NN`` that no living process holds (the lock goes with the process, a crash included)."""
    root = Path(path)
    if root.exists() and any(root.iterdir()) and not is_event_log(root):
        raise EventLogError(f"{root} exists and is not a ctrkit event log (no {MARKER})")
    (root / "writers").mkdir(parents=True, exist_ok=True)
    if not is_event_log(root):
        (root / MARKER).write_text(json.dumps({"format": LOG_FORMAT}))
        fsync_dir(root)
    for slot in range(slots):
        lock = open(root / "writers" / f"{slot:02d}.lock", "a")  # noqa: SIM115 - held while the log is open
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        log = EventLog(root / "writers" / f"{slot:02d}")
        log._slot_lock = lock
        return log
    raise EventLogError(f"{root}: all {slots} writer slots are held by running processes")


class PeerClicks:
    """The clicks that the other writers of a shared log folder (``ctrkit serve --workers N``) appended since the
    last :meth:`read`: the new complete lines of their open segments, from where the last read stopped (segments
    that exist when this starts, from their end). A click on an impression that one worker served and another
    stored reaches the serving worker's live monitor so. A segment compacted since the last read is finished from
    its Parquet file, which keeps the segment's lines in order: the rows after the lines already read."""

    def __init__(self, root: str | Path, own: str | Path) -> None:
        self.root, self.own = Path(root), Path(own).resolve()
        self._read: dict[Path, tuple[int, int]] = {}  # segment -> (bytes, complete lines) read so far
        for seg in self._segments():
            with contextlib.suppress(FileNotFoundError):
                data = seg.read_bytes()
                end = data.rfind(b"\n") + 1
                self._read[seg] = (end, data.count(b"\n", 0, end))
        self._parts = set(self._parquet())  # compacted before this started: not read

    def _others(self) -> list[Path]:
        return [w for w in (self.root / "writers").glob("*") if w.is_dir() and w.resolve() != self.own]

    def _segments(self) -> list[Path]:
        return [seg for w in self._others() for seg in w.glob("segments/*.jsonl")]

    def _parquet(self) -> list[Path]:
        return [part for w in self._others() for part in w.glob("parquet/*.parquet")]

    def read(self) -> list[str]:
        """The impression ids of the clicks appended by other writers since the last read."""
        clicked: list[str] = []
        for seg in self._segments():
            start, lines = self._read.get(seg, (0, 0))
            try:
                with open(seg, "rb") as fh:
                    fh.seek(start)
                    chunk = fh.read()
            except FileNotFoundError:  # compacted meanwhile: its Parquet file is read below
                continue
            end = chunk.rfind(b"\n") + 1  # complete lines only: a line being written is read next time
            for line in chunk[:end].splitlines():
                if b"click" not in line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:  # a line its writer cut as torn after a crash
                    continue
                if event.get("kind") == "click" and event.get("impression_id"):
                    clicked.append(str(event["impression_id"]))
            self._read[seg] = (start + end, lines + chunk.count(b"\n", 0, end))
        for part in set(self._parquet()) - self._parts:
            seg = part.parent.parent / "segments" / f"{part.stem}.jsonl"
            if seg.exists():  # renamed into place, the segment not yet deleted: read from the segment until then
                continue
            clicked += _clicks_after(part, self._read.pop(seg, (0, 0))[1])
            self._parts.add(part)
        self._read = {seg: n for seg, n in self._read.items() if n[1] or seg.exists()}  # gone empty: no Parquet
        return clicked


def _clicks_after(part: Path, lines: int) -> list[str]:
    """The impression ids of the clicks in a compacted segment's rows after its first ``lines``."""
    if not {"kind", "impression_id"} <= set(pl.read_parquet_schema(part)):
        return []
    rows = pl.read_parquet(part, columns=["kind", "impression_id"]).slice(lines)
    return rows.filter((pl.col("kind") == "click") & pl.col("impression_id").is_not_null())[
        "impression_id"].cast(pl.String).to_list()


def _drop_empty(df: pl.DataFrame, keep: tuple[str, ...] = ("event_id", "kind")) -> pl.DataFrame:
    """Without the columns that only other kinds of event fill."""
    return df.select([c for c in df.columns if c in keep or df[c].null_count() < df.height])


def read_events(path: str | Path, kind: str | None = None) -> pl.DataFrame:
    """Every stored event of a log folder (Parquet parts and open segments), optionally of one kind.

    Reading does not need the writer to stop: an open segment is read up to its last complete line.
    """
    p = Path(path)
    if not is_event_log(p):
        raise DataError(f"{p} is not a ctrkit event log (no {MARKER}); `ctrkit serve --events {p}` writes one")
    if kind is not None and kind not in KINDS:
        raise DataError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    writers = sorted(w for w in (p / "writers").glob("*") if is_event_log(w))
    if writers:  # several processes wrote: one copy of each event id, the first stored
        df = pl.concat([_read_one(p), *(_read_one(w) for w in writers)], how="diagonal_relaxed")
        df = df.sort("timestamp", nulls_last=True, maintain_order=True).unique("event_id", keep="first",
                                                                              maintain_order=True)
    else:
        df = _read_one(p)
    return df if kind is None else _drop_empty(df.filter(pl.col("kind") == kind))


def _read_one(p: Path) -> pl.DataFrame:
    """Every stored event of one writer's folder."""
    # Segments first, Parquet after: a segment compacted in between is then found as Parquet and its JSON
    # lines, already read, are skipped, so a live reader sees every event once.
    segments: dict[str, list[dict[str, Any]]] = {}
    for seg in sorted((p / "segments").glob("*.jsonl")):
        try:
            segments[seg.stem] = _read_lines(seg)[0]
        except FileNotFoundError:
            continue
    parts = sorted((p / "parquet").glob("*.parquet"))
    frames = [pl.read_parquet(f) for f in parts]
    done = {f.stem for f in parts}
    frames += [_frame(ev) for stem, ev in segments.items() if ev and stem not in done]
    return pl.concat(frames, how="diagonal_relaxed") if frames else _frame([])


def measure_frames(path: str | Path) -> tuple[pl.DataFrame, pl.DataFrame | None, pl.DataFrame | None]:
    """(impressions, clicks, conversions) of a log, shaped for :class:`ctrkit.measure.attribution.Attribution`."""
    df = read_events(path)
    imps, clicks, convs = (_drop_empty(df.filter(pl.col("kind") == k)) for k in KINDS)
    if imps.height == 0:
        raise DataError(f"{path}: the event log has no impressions yet")
    return imps, clicks if clicks.height else None, convs if convs.height else None


def attributed_impressions(path: str | Path, config: Any = None, label: str = "click",
                           conversion: str | None = None, time: str | None = None) -> pl.DataFrame:
    """Impressions that survive attribution (dedup, bot and window rules of ``ctrkit.measure``), each with
    ``label`` 0/1 (a click) joined from the click events by ``ctrkit.measure.attribution``; every feature column kept.
    With ``conversion`` and conversion events in the log, also that column: 0/1, a conversion attributed. The
    logged impression time is ``timestamp`` (UTC), and ``time`` too (a schema's time column) where the impressions
    do not carry a column of that name."""
    from ctrkit.measure.attribution import Attribution
    from ctrkit.measure.engine import make_engine

    imps, clicks, convs = measure_frames(path)
    if clicks is None:  # no click yet: every impression is a non-click
        clicks = pl.DataFrame({"event_id": ["-"], "impression_id": ["-"], "timestamp": [0.0]}).clear()
    engine = make_engine("duckdb", threads=2)
    try:
        Attribution(engine, imps, clicks, convs, config, {"impression_id": "impression_id", "timestamp": "timestamp"})
        out = pl.from_pandas(engine.query("SELECT * FROM ctr_events WHERE _status = 0 ORDER BY _ts, position"))
    finally:
        engine.close()
    keep = [c for c in out.columns if not c.startswith("_") and c not in ("kind", "event_id", label, conversion)]
    stamp = pl.from_epoch((pl.col("timestamp") * 1e6).round().cast(pl.Int64), "us").dt.replace_time_zone("UTC")
    labels = [pl.col("_click").cast(pl.Int8).alias(label)]
    if conversion and convs is not None:
        labels.append(pl.col("_conv").cast(pl.Int8).alias(conversion))
    out = out.select([*keep, *labels]).with_columns(stamp.alias("timestamp"))
    return out.with_columns(pl.col("timestamp").alias(time)) if time and time not in out.columns else out
