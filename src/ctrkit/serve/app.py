"""HTTP scorer and ranker over a bundle (FastAPI): /score, /rank, /events, /health, /metrics, /admin/reload.

Every record goes through the validation and encoding of :meth:`Bundle.predict`, so a bad value gets the answer it
gets anywhere else, as a 422 that names the field; the model runs on the bundle's fastest path (torch, or an ONNX
graph exported into the bundle, timed at load: :mod:`ctrkit.serve.scorer`), which /health names. The records of a
plain /score or /rank body go from its bytes to ids in one compiled pass (:meth:`Encoder.encode_json`; the rest of
the body through orjson and the request models); any other body is parsed with orjson and its records judged
column by column by the validation layer rather than value by value by pydantic, and a body orjson refuses (NaN,
1e999) is judged by the strict models. /rank logs each shown item as an impression (``event_id`` = its
``impression_id``) with its pCTR, score, position and propensity into the event log, and answers once that is on
disk; /events stores clicks and conversions (and client-side impressions) exactly once per ``event_id``. A reload
loads the new bundle beside the old one and swaps a reference, so requests in flight finish on the bundle they
started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import ipaddress
import json
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import polars as pl

try:
    import orjson
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
                                   multiprocess)
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
    from pydantic.json_schema import models_json_schema
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"ctrkit's server needs the 'serve' extra: pip install 'ctrkit[serve]' ({exc})") from exc

from ctrkit.data.readers import DataError
from ctrkit.devices import check_device
from ctrkit.schema import SchemaError
from ctrkit.serve.bundle import Bundle, BundleError
from ctrkit.serve.events import EventLog, EventLogError, PeerClicks, lowest_priority, open_writer
from ctrkit.serve.monitor import LiveMonitor
from ctrkit.serve.rank import RESERVED, choose, laplace_sd, objective_scores, thompson
from ctrkit.serve.scorer import Scorer
from ctrkit.validate import plain_rows

MAX_BATCH = 10_000
PEER_CLICKS_EVERY = 1.0  # seconds between reads of the other workers' clicks (--workers N)
GAUGES_EVERY = 5.0  # seconds between updates of a worker's live gauges (--workers N; a scrape updates its own)
MAX_BODY_BYTES = 32 << 20
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROUTES = ("/score", "/rank", "/events", "/health", "/metrics", "/admin/reload", "/docs", "/openapi.json")

# -- request and response models ---------------------------------------------------------------------
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
Finite = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Text = Annotated[StrictStr, Field(max_length=4096)]
Value = StrictBool | Int64 | Finite | Text | None
Record = dict[Annotated[str, Field(max_length=256)], Value]
Id = Annotated[StrictStr, Field(min_length=1, max_length=128)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Strict):
    """Raw feature records (field -> value) to score, in order."""

    records: list[Record]


class ScoreResponse(_Strict):
    """Calibrated click probabilities, one per record, and the version of the bundle that gave them; a model
    with a head per label gives each head's probabilities by label name (``pctr`` is the first head's)."""

    pctr: list[float]
    heads: dict[str, list[float]] | None = None
    bundle: str


class Explore(_Strict):
    """Epsilon-greedy (each slot shows a uniformly drawn remaining item with probability epsilon) or Thompson
    sampling (``samples`` posterior draws per request; see :mod:`ctrkit.serve.rank`)."""

    method: Literal["epsilon_greedy", "thompson"] = "epsilon_greedy"
    epsilon: Annotated[Finite, Field(ge=0.0, le=1.0)] = 0.1
    samples: Annotated[StrictInt, Field(ge=1, le=100_000)] = 1000
    prior_precision: Annotated[Finite, Field(gt=0.0, le=1e6)] = 1.0


class _RankHead(_Strict):
    """What a ranking request says besides its candidates (read so by the compiled path of /rank)."""

    context: Record = Field(default_factory=dict)
    k: Annotated[StrictInt, Field(ge=1, le=MAX_BATCH)] = 10
    objective: Literal["pctr", "ecpm"] = "pctr"
    explore: Explore | None = None
    request_id: Id | None = None


class RankRequest(_RankHead):
    """A context shared by all candidates, the candidates (optional ``bid``, ``quality``), and k."""

    candidates: Annotated[list[Record], Field(min_length=1)]


class RankedItem(_Strict):
    """One shown item: its candidate index, pCTR, ranking score, slot, impression id and propensity."""

    index: int
    pctr: float
    score: float
    position: int
    impression_id: str
    propensity: float


class RankResponse(_Strict):
    """The shown items in slot order."""

    items: list[RankedItem]
    request_id: str
    bundle: str


class Event(_Strict):
    """An impression, click or conversion; ``event_id`` makes a retry harmless."""

    event_id: Id
    kind: Literal["impression", "click", "conversion"]
    impression_id: Id
    timestamp: Annotated[Finite, Field(ge=0.0, le=1e11)] | None = None
    position: Annotated[StrictInt, Field(ge=1, le=100_000)] | None = None
    revenue: Finite | None = None
    user_id: Text | None = None
    item_id: Text | None = None


class EventsRequest(_Strict):
    """A batch of events."""

    events: Annotated[list[Event], Field(min_length=1, max_length=MAX_BATCH)]


class EventsResponse(_Strict):
    """How many events were stored and how many were already in the log."""

    stored: int
    duplicates: int


class _ScoreBody(ScoreRequest):
    """ScoreRequest as parsed by orjson: the records are judged by the validation layer."""

    records: list[Any]  # type: ignore[assignment]


class _RankBody(RankRequest):
    """RankRequest as parsed by orjson: the candidates are judged by the validation layer."""

    candidates: Annotated[list[Any], Field(min_length=1)]  # type: ignore[assignment]


class ReloadRequest(_Strict):
    """Load the bundle at ``path`` (default: the path the server started with, re-read)."""

    path: Annotated[StrictStr, Field(min_length=1, max_length=4096)] | None = None


def bundle_version(path: str | Path) -> str:
    """A short content hash of a bundle folder's model description and weights."""
    h = hashlib.sha256()
    for part in ("model.json", "weights.safetensors"):
        h.update((Path(path) / part).read_bytes())
    return h.hexdigest()[:12]


@dataclass
class ServerConfig:
    """What ``ctrkit serve`` passes to :func:`create_app`."""

    bundle: Path
    events: Path | None = None
    token: str | None = None
    max_batch: int = MAX_BATCH
    max_body_bytes: int = MAX_BODY_BYTES
    segments: tuple[str, ...] = ()
    monitor_window: int = 100_000
    seed: int | None = None
    threads: int = 1
    watch: float = 0.0
    workers: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, flag in (("max_batch", "--max-batch"), ("threads", "--threads"), ("workers", "--workers"),
                           ("max_body_bytes", "max_body_bytes"), ("monitor_window", "monitor_window")):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.token is not None and not self.token.strip():  # "--token $T" with T unset served with no check
            raise ValueError("--token is empty: give the token requests must send, or leave --token out (and "
                             "CTRKIT_TOKEN unset) to serve without one")
        if not self.watch >= 0:
            raise ValueError(f"--watch must be 0 (off) or a number of seconds, got {self.watch}")
        check_device(self.device)

    def to_env(self) -> str:
        """This configuration as the JSON that :func:`app_from_env` reads in each worker process."""
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()})


@dataclass
class _Live:
    bundle: Bundle
    version: str
    path: Path
    scorer: Scorer


METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's shared folder of the workers' values


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on Windows, where os.kill would end it, every process counts as alive)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return True


def _worker_alive(pid: int) -> bool:
    """Whether worker ``pid`` still runs: the process exists and, where ``/proc`` tells, it is a child of this
    worker's own parent (the server's supervisor), not an unrelated process that was given the dead worker's pid."""
    if not _alive(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:  # the process ended since, or there is no /proc (macOS): then existence is all we know
        return not Path("/proc/self/stat").exists()
    except OSError:
        return True
    return int(stat.rsplit(")", 1)[1].split()[1]) == os.getppid()  # the fields after the name: state, ppid


def _forget_dead_workers(folder: Path) -> None:
    """Take out of the shared metrics ``folder`` the live gauges of worker processes that ended without stopping:
    a worker that the supervisor killed (a missed health check) or the kernel did (out of memory) cannot mark
    itself dead, and its last values would stay in every scrape beside its replacement's. Its counts stay in the
    sums."""
    for path in folder.glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        if pid.isdigit() and not _worker_alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), str(folder))


class _Metrics:
    """The server's Prometheus metrics. Under ``ctrkit serve --workers N`` (``$PROMETHEUS_MULTIPROC_DIR`` set) every
    worker writes its values to that folder and a scrape, whichever worker answers it, reads them all: counters and
    latency summed over the workers, the live monitor's gauges one series per worker (label ``pid``), each over
    the rows that worker scored and the impressions it served (their clicks stored by any worker:
    :class:`~ctrkit.serve.events.PeerClicks`)."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(METRICS_DIR_ENV))
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ctrkit_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("ctrkit_request_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.scored = Counter("ctrkit_scored_records", "Records scored (score and rank)", registry=r)
        self.events = Counter("ctrkit_events", "Events stored, by kind", ["kind"], registry=r)
        self.duplicates = Counter("ctrkit_event_duplicates", "Events whose id was already stored", registry=r)
        self.ratio = Gauge("ctrkit_pred_actual_ratio", "Rolling pred/actual over the monitor window", registry=r,
                           multiprocess_mode="liveall")
        self.psi = Gauge("ctrkit_pctr_psi", "PSI of live pCTR against the training distribution", registry=r,
                         multiprocess_mode="liveall")
        self.input_psi = Gauge("ctrkit_input_psi", "PSI of a live input column against the training rows",
                               ["column"], registry=r, multiprocess_mode="liveall")
        self.reloads = Counter("ctrkit_reloads", "Bundle hot swaps", registry=r)
        self._columns: set[str] = set()  # under --workers N: the input columns this process has set a PSI for

    def set_input_psi(self, values: dict[str, float]) -> None:
        """Set the input PSI gauges to ``values`` (column -> PSI), the columns of the bundle served now. A column
        of a bundle swapped out goes from a one-process server's scrape; under ``--workers N``, where
        prometheus-client cannot remove a series from the shared folder, it reads NaN."""
        if self.multiprocess:
            for column in self._columns - values.keys():
                self.input_psi.labels(column).set(float("nan"))
            self._columns |= values.keys()
        else:
            self.input_psi.clear()
        for column, value in values.items():
            self.input_psi.labels(column).set(value)

    def exposition(self) -> bytes:
        """The Prometheus text of this process, or of every live worker's process (:func:`_forget_dead_workers`)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        _forget_dead_workers(Path(os.environ[METRICS_DIR_ENV]))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self) -> None:
        """A worker that stops takes its live gauges out of the shared folder (its counts stay in the sums)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


class _Guard:
    """ASGI middleware: token check, body size limit (by Content-Length), request count and latency per route."""

    def __init__(self, app: Any, token: str | None, max_body: int, metrics: _Metrics) -> None:
        self.app, self.max_body, self.metrics = app, max_body, metrics
        self.token = token.encode() if token else None

    async def _reply(self, send: Any, status: int, text: str) -> None:
        body = json.dumps({"detail": text}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        assert self.token is not None
        given = headers.get(b"x-ctrkit-token")
        if given is None:
            auth = headers.get(b"authorization", b"")
            given = auth[7:] if auth[:7].lower() == b"bearer " else b""
        return hmac.compare_digest(given, self.token)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = [500]

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        try:
            if self.token is not None and path != "/health" and not self._authorised(headers):
                await self._reply(send_status, 401, "missing or wrong token: send 'Authorization: Bearer TOKEN'")
            elif not length.isdigit() or int(length) > self.max_body:
                await self._reply(send_status, 413, f"request body over {self.max_body} bytes")
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


def _user_error(exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": str(exc)})


_VALUE_TAGS = {"bool", "constrained-int", "float", "constrained-str"}


def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field by its path; one line per field for a field value (not one per JSON type),
    and never the offending input itself, which may be a NaN that JSON cannot carry back."""
    detail: dict[str, str] = {}
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "json_invalid":
            where = f" at character {loc[0]}" if loc else ""
            loc, msg = [], f"the body is not valid JSON{where}: {e.get('ctx', {}).get('error', '')}".rstrip(": ")
        elif loc and loc[-1] in _VALUE_TAGS:
            loc, msg = loc[:-1], "expected a string, a finite number, a boolean or null"
            if isinstance(e.get("input"), int) and not isinstance(e.get("input"), bool):
                msg += " (integers within +-2^63)"
        else:
            msg = str(e.get("msg", "invalid"))
        detail.setdefault(".".join(loc) or "body", msg)
    return JSONResponse(status_code=422, content={"detail": [{"field": k, "msg": v} for k, v in detail.items()]})


async def _parse(request: Request, fast: type[BaseModel], strict: type[BaseModel]) -> Any:
    """The JSON body as ``fast`` (orjson; records left to the validation layer) or, when only Python's json can
    read it (NaN, Infinity, 1e999), as the ``strict`` model, whose errors name each bad value."""
    raw = await request.body()
    try:
        data, model = orjson.loads(raw), fast
    except orjson.JSONDecodeError:
        try:
            data, model = json.loads(raw), strict
        except json.JSONDecodeError as exc:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                           "input": {}, "ctx": {"error": exc.msg}}]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _json(content: dict[str, Any]) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body of a route that reads its body itself."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def exposure_warning(host: str, token: str | None) -> str | None:
    """A warning when the server listens beyond this machine with no token: anyone who reaches the port can then
    score, log events and swap the bundle through /admin/reload."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: only localhost is known to stay on this machine
        loopback = host == "localhost"
    if loopback or token:
        return None
    return (f"warning: serving on {host} without --token: anyone who reaches this port can score, send events "
            "and load another bundle through /admin/reload")


def check_segments(bundle: Bundle, segments: Sequence[str]) -> None:
    """The monitor's segments must be fields of the bundle: a request carries those and nothing else, so any
    other name would put every impression under "None"."""
    unknown = [s for s in segments if s not in bundle.schema.input_columns]
    if unknown:
        raise ValueError(f"--segments {unknown}: not fields of the bundle, which requests carry "
                         f"({bundle.schema.input_columns})")


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI application serving ``config.bundle``."""
    metrics = _Metrics()
    live = _load(config.bundle, config.threads, device=config.device)
    check_segments(live.bundle, config.segments)
    log = None if not config.events else open_writer(config.events) if config.workers > 1 else EventLog(config.events)
    monitor = LiveMonitor(config.monitor_window, config.segments, live.bundle.metrics.get("pctr_reference"),
                          features=live.bundle.metrics.get("feature_reference"), names=_input_names(live.bundle))
    rng = np.random.default_rng(config.seed)
    state: dict[str, Any] = {"live": live, "started": time.time()}
    reload_lock = asyncio.Lock()
    loader = ThreadPoolExecutor(1, thread_name_prefix="ctrkit-loader", initializer=lowest_priority)

    async def swap(path: Path) -> tuple[_Live, _Live]:
        """Load the bundle at ``path`` beside the live one, then make it the live one."""
        async with reload_lock:
            old: _Live = state["live"]
            new = await asyncio.get_running_loop().run_in_executor(loader, _load, path, config.threads, old.scorer,
                                                                     config.device)
            state["live"] = new
            gc.freeze()  # the new bundle's objects join the ones the collector no longer walks
            monitor.reference = new.bundle.metrics.get("pctr_reference")
            monitor.watch_inputs(new.bundle.metrics.get("feature_reference"), _input_names(new.bundle))
            metrics.reloads.inc()
        return old, new

    def publish() -> None:
        """Set the live gauges from the monitor's snapshot."""
        snap = monitor.snapshot()
        ratio = snap["overall"]["ratio"]
        metrics.ratio.set(ratio if math.isfinite(ratio) else float("nan"))
        metrics.psi.set(snap["psi"] if snap["psi"] is not None else float("nan"))
        metrics.set_input_psi(snap["inputs"])

    async def publish_often() -> None:
        """Under ``--workers N``, keep this worker's gauges current: a scrape is answered by one worker and shows
        the gauges every worker last set."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(GAUGES_EVERY)
            await loop.run_in_executor(None, publish)

    async def follow_peers() -> None:
        """Under ``--workers N``, hand this worker's live monitor the clicks the other workers stored: a click
        posted to another process than the one that served its impression counts where the impression is."""
        assert log is not None and config.events is not None
        feed = PeerClicks(config.events, log.path)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PEER_CLICKS_EVERY)
            for impression_id in await loop.run_in_executor(None, feed.read):
                monitor.click(impression_id)

    async def watch() -> None:
        """Reload the live bundle's folder once its files have changed and then stayed as they are for one
        interval (a copy in progress is not read); a folder that does not load leaves the live bundle serving."""
        watched = state["live"].path
        seen = served = _stamp(watched)
        while True:
            await asyncio.sleep(config.watch)
            path = state["live"].path
            stamp = _stamp(path)
            if path != watched:  # /admin/reload moved to another folder: watch that one from here
                watched, seen, served = path, stamp, stamp
            elif stamp != seen:
                seen = stamp
            elif stamp != served and stamp:
                served = stamp
                try:
                    await swap(path)
                    state.pop("watch_error", None)
                except (BundleError, DataError, SchemaError, OSError, ValueError) as exc:
                    state["watch_error"] = f"{path} changed but does not load: {exc}"

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(watch()) if config.watch > 0 else None
        peers = asyncio.create_task(follow_peers()) if config.workers > 1 and log is not None else None
        gauges = asyncio.create_task(publish_often()) if metrics.multiprocess else None
        gc.collect()
        gc.freeze()  # later collections skip what loading made: walking it all stalled a request 150-230 ms
        yield
        for task in (watcher, peers, gauges):
            if task is not None:
                task.cancel()
        loader.shutdown(wait=True)
        if log is not None:
            log.close()
        metrics.close()

    app = FastAPI(title="ctrkit scorer", version=live.version, lifespan=lifespan,
                  description="Click probabilities, ranking with exploration, and the event log of what was shown.")
    app.add_middleware(_Guard, token=config.token, max_body=config.max_body_bytes, metrics=metrics)
    for exc_type in (DataError, SchemaError, BundleError, EventLogError):
        app.add_exception_handler(exc_type, lambda _r, e: _user_error(e))
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.state.ctrkit = state
    app.state.event_log = log
    app.state.monitor = monitor

    def watch_inputs(cur: _Live, encoded: tuple[np.ndarray, np.ndarray] | None, frame: pl.DataFrame | None) -> None:
        """Hand the scored rows' encoded inputs to the live monitor (a frame is encoded for it only when it keeps
        them)."""
        if encoded is not None:
            monitor.inputs(*encoded)
        elif frame is not None and monitor.watches_inputs:
            monitor.inputs(*cur.bundle.encoder.transform_frame(frame))

    def check_size(n: int, what: str) -> None:
        if n > config.max_batch:
            raise DataError(f"{what}: {n} items exceed this server's limit of {config.max_batch} per request")

    @app.post("/score", response_model=ScoreResponse, openapi_extra=_body_doc(ScoreRequest))
    async def score(request: Request) -> Response:
        """Calibrated pCTR of every record, in order (and of every head of a multi-task bundle)."""
        cur: _Live = state["live"]
        raw = await request.body()
        got = cur.bundle.encoder.encode_json(raw, "records", max_records=config.max_batch)
        encoded = None
        if got is not None and got.n and got.rest == b"{}":  # the body holds the records and nothing else
            check_size(got.n, "records")
            encoded = cur.bundle.encoder.finish_json(got)
        if encoded is None:  # not plain, or no compiled path: the request models and the validation layer read it
            req = await _parse(request, _ScoreBody, ScoreRequest)
            check_size(len(req.records), "records")
            encoded = cur.bundle.encoder.encode_records(req.records, None, ())
        frame = None if encoded is not None else cur.scorer.frame(req.records, extra=())
        p = cur.scorer.score_encoded(*encoded) if frame is None else cur.scorer.score(frame)
        watch_inputs(cur, encoded, frame)
        first = p if p.ndim == 1 else p[:, 0]
        metrics.scored.inc(len(first))
        monitor.scored(first)
        out: dict[str, Any] = {"pctr": first.tolist(), "bundle": cur.version}
        if p.ndim == 2:
            out["heads"] = {h: p[:, t].tolist() for t, h in enumerate(cur.bundle.schema.label_columns)}
        return _json(out)

    @app.post("/rank", response_model=RankResponse, openapi_extra=_body_doc(RankRequest))
    async def rank(request: Request) -> Response:
        """The top k candidates by pCTR or eCPM, with exploration, propensities and impression ids."""
        cur: _Live = state["live"]
        raw = await request.body()
        plain = _plain_rank(raw, cur, config.max_batch)
        if plain is None:  # not plain, or no compiled path: the request models and the validation layer read it
            req = await _parse(request, _RankBody, RankRequest)
            check_size(len(req.candidates), "candidates")
            cands = _read_candidates(req, cur)
        else:
            req, cands = plain
            check_size(cands.n, "candidates")
        bids, quality = cands.bids, cands.quality
        pctr = cur.scorer.score(cands.frame) if cands.encoded is None else cur.scorer.score_encoded(*cands.encoded)
        watch_inputs(cur, cands.encoded, cands.frame)
        pctr = pctr if pctr.ndim == 1 else pctr[:, 0]  # a multi-task bundle ranks by its first (click) head
        metrics.scored.inc(len(pctr))
        monitor.scored(pctr)
        scores = objective_scores(pctr, req.objective, bids, quality)
        ex = req.explore
        if ex is not None and ex.method == "thompson":
            scale = None if req.objective == "pctr" else objective_scores(np.ones_like(pctr), "ecpm", bids, quality)
            ids = cands.encoded[0] if cands.encoded is not None else cur.bundle.encoder.transform_frame(cands.frame)[0]
            slate = thompson(_logit(pctr), ids, laplace_sd(cur.bundle, ex.prior_precision), req.k, ex.samples, rng,
                             scale)
        else:
            slate = choose(scores, req.k, ex.epsilon if ex else 0.0, rng)
        request_id = req.request_id or uuid.uuid4().hex
        items = []
        for pos, (i, q) in enumerate(zip(slate.index.tolist(), slate.propensity.tolist()), start=1):
            items.append({"index": i, "pctr": float(pctr[i]), "score": float(scores[i]), "position": pos,
                          "impression_id": uuid.uuid4().hex, "propensity": q})
        if log is not None or config.segments:
            shown = cands.typed(slate.index.tolist())
            now = time.time()
            events = []
            for it, feats, explored in zip(items, shown, slate.explored.tolist()):
                monitor.impression(it["impression_id"], it["pctr"], feats)
                extra = {} if bids is None else {"bid": float(bids[it["index"]])}
                events.append({**feats, **extra, "event_id": it["impression_id"], "kind": "impression",
                               "impression_id": it["impression_id"], "timestamp": now, "request_id": request_id,
                               "position": it["position"], "pctr": it["pctr"], "score": it["score"],
                               "propensity": it["propensity"], "explored": explored,
                               "objective": req.objective, "bundle": cur.version})
            if log is not None:
                await asyncio.wrap_future(log.append_async(events))
        return _json({"items": items, "request_id": request_id, "bundle": cur.version})

    @app.post("/events", response_model=EventsResponse)
    async def events(req: EventsRequest) -> dict[str, Any]:
        """Store impressions, clicks and conversions; an event_id already stored is not stored again."""
        if log is None:
            raise EventLogError("this server has no event log: start it with --events FOLDER")
        batch = [e.model_dump(exclude_none=True) for e in req.events]
        flags = await asyncio.wrap_future(log.append_async(batch))
        for e, new in zip(batch, flags):
            if new:
                metrics.events.labels(e["kind"]).inc()
                if e["kind"] == "click":
                    monitor.click(e["impression_id"])
        dup = flags.count(False)
        metrics.duplicates.inc(dup)
        return {"stored": len(flags) - dup, "duplicates": dup}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the bundle being served and the scoring path."""
        cur: _Live = state["live"]
        return {"status": "ok", "bundle": cur.version, "model": cur.bundle.model_name, "path": str(cur.path),
                "scoring": cur.scorer.describe(), "uptime_s": round(time.time() - state["started"], 3),
                "watch": {"every_s": config.watch, "error": state.get("watch_error")} if config.watch > 0 else None,
                "events": None if log is None else {"path": str(log.path), "stored": len(log)}}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        """Prometheus text: requests, latency, scored records, events, live pred/actual and PSI (of pCTR, and of
        each input column where the bundle holds its training rows' reference)."""
        # tens of ms over the windows (the input columns' bins): off the event loop, which keeps serving meanwhile
        await asyncio.get_running_loop().run_in_executor(None, publish)
        return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    async def reload(req: ReloadRequest | None = None) -> dict[str, Any]:
        """Load a bundle and swap it in; requests already running finish on the previous one."""
        old, new = await swap(Path(req.path) if req and req.path else state["live"].path)
        return {"bundle": new.version, "previous": old.version, "path": str(new.path),
                "scoring": new.scorer.backend}

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus the request models of the routes that parse their own bodies."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            _, defs = models_json_schema([(ScoreRequest, "validation"), (RankRequest, "validation")],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


ENV_CONFIG = "CTRKIT_SERVE_CONFIG"


def app_from_env() -> FastAPI:
    """The application of one of ``ctrkit serve --workers N``'s processes, configured by ``$CTRKIT_SERVE_CONFIG``."""
    import torch

    cfg = json.loads(os.environ[ENV_CONFIG])
    cfg["bundle"] = Path(cfg["bundle"])
    cfg["events"] = Path(cfg["events"]) if cfg["events"] else None
    cfg["segments"] = tuple(cfg["segments"])
    torch.set_num_threads(cfg["threads"])
    return create_app(ServerConfig(**cfg))


def _load(path: Path, threads: int = 1, live: Scorer | None = None, device: str = "cpu") -> _Live:
    try:
        bundle = Bundle.load(path)
        return _Live(bundle, bundle_version(path), Path(path),
                     Scorer(bundle, path, threads, like=live, device=device))
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: {exc}") from exc


def _stamp(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, size and modification time of every file under a bundle folder (empty when it is gone)."""
    try:
        return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()))
    except OSError:  # a file went away while listed: the folder is changing
        return ()


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-7, 1.0 - 1e-7)
    return np.log(q / (1.0 - q))


def _input_names(bundle: Bundle) -> list[str]:
    """The encoded input columns a live monitor compares with the training rows: sparse fields, then dense."""
    return list(bundle.encoder.sparse_names) + list(bundle.encoder.dense_names)


@dataclass
class _Candidates:
    """A ranking request's candidates as read: encoded (plain ones) or a typed frame (the others), their bids and
    qualities, and ``typed``: the typed features of the candidates at some positions (the shown ones, for the
    impression log; a frame costs a millisecond, so only those are typed)."""

    n: int
    encoded: tuple[np.ndarray, np.ndarray] | None
    frame: pl.DataFrame | None
    bids: np.ndarray | None
    quality: np.ndarray | None
    typed: Callable[[list[int]], list[dict[str, Any]]]


def _plain_rank(raw: bytes, live: _Live, max_batch: int) -> tuple[_RankHead, _Candidates] | None:
    """A ranking request read by the compiled path (:meth:`Encoder.encode_json`: candidates straight from the
    body's bytes to ids) where it is plain; None sends it to the reference path (orjson, the request models, the
    validation layer), which reads such a request the same and says what is wrong with any other."""
    encoder = live.bundle.encoder
    got = encoder.encode_json(raw, "candidates", RESERVED, max_batch)
    if got is None or got.n == 0:
        return None
    try:
        req = _RankHead.model_validate(orjson.loads(got.rest))
    except (orjson.JSONDecodeError, ValidationError):
        return None
    encoded = encoder.finish_json(got, req.context)
    bid, quality = got.extras[:, RESERVED.index("bid")], got.extras[:, RESERVED.index("quality")]
    no_bid = np.isnan(bid)
    if encoded is None or (bid < 0).any() or (quality < 0).any() or (no_bid.any() and not (
            no_bid.all() and req.objective == "pctr")):  # _reserved's errors
        return None
    schema = live.bundle.schema

    def typed(index: list[int]) -> list[dict[str, Any]]:
        return plain_rows([orjson.loads(raw[a:b]) for a, b in got.spans[index].tolist()], schema, req.context)

    return req, _Candidates(got.n, encoded, None, None if no_bid.all() else bid,
                            np.where(np.isnan(quality), 1.0, quality), typed)


def _read_candidates(req: RankRequest, live: _Live) -> _Candidates:
    """The candidates of a request parsed by the request models: plain ones encoded in one compiled pass where
    the extension is built, the others typed by the validation layer (which names any bad value)."""
    encoded = live.bundle.encoder.encode_records(req.candidates, req.context, RESERVED)
    frame = None if encoded is not None else live.scorer.frame(req.candidates, req.context, extra=RESERVED)
    bids = _reserved(req.candidates, "bid", None if req.objective == "pctr" else "required")
    quality = _reserved(req.candidates, "quality", 1.0)
    schema = live.bundle.schema

    def typed(index: list[int]) -> list[dict[str, Any]]:
        if frame is None:
            return plain_rows([req.candidates[i] for i in index], schema, req.context)
        return frame[index].select(pl.col(f.name).cast(pl.Float64, strict=False) if f.kind == "numeric"
                                   else pl.col(f.name) for f in schema.fields).to_dicts()

    return _Candidates(len(req.candidates), encoded, frame, bids, quality, typed)


def _reserved(candidates: list[dict[str, Any]], key: str, default: float | str | None) -> np.ndarray | None:
    """The ``bid`` or ``quality`` of every candidate as a non-negative array (None when none is given)."""
    values = list(map(dict.get, candidates, repeat(key)))  # no Python call per candidate: a ranking has many
    if values.count(None) == len(values) and default != "required":
        return None if default is None else np.full(len(values), float(default))
    out = np.empty(len(values))
    for i, v in enumerate(values):
        if v is None and default not in (None, "required"):
            v = default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise DataError(f"candidates[{i}]: field {key!r} must be a non-negative number, got {v!r}")
        out[i] = float(v)
    return out
