"""Run the peer CTR libraries (FuxiCTR 2.3.10, DeepCTR-Torch 0.3.0) next to ctrkit's own benchmarks.

The peers are driven by the shared harness scripts in ``../shared/peers`` (see its README), run
with the peer virtual environment's interpreter in a subprocess, never imported into ctrkit's
own environment. Each run is measured from outside:

* ``wall_s``: wall time of the whole subprocess;
* ``peak_rss_mb``: the peak, over samples taken every ~50 ms, of the *sum* of the resident set
  sizes of the whole process tree (FuxiCTR transforms data through Ray worker processes, so the
  driver's own RSS would miss most of the memory). Processes that leave the tree by being
  re-parented stay counted, because the run is started under setsid and every process that keeps
  its SID is included. Shared pages (e.g. Ray's object store in /dev/shm) count once per process
  that maps them, so the figure is an upper bound on the memory the run really needs;
* ``results``: the ``RESULT {json}`` lines that the harness prints (``benchutil.record``).

Set up the peer environment first with ``bench/setup_peers.sh``. Paths can be changed with:

``PEERS_PY``              interpreter of the peer venv (default ``/tmp/peers/bin/python``)
``PEERBENCH_DIR``         scratch folder (default ``/tmp/peerbench``), which holds
                          ``polars1/`` (polars 1.44.2 overlay) and ``fuxictr_zoo/`` (DeepFM source)
``PEERS_HARNESS``         the harness folder (default ``<checkout>/../shared/peers``)

Example::

    from bench import peers
    r = peers.fuxictr_preprocess("/tmp/peerbench/data", "/tmp/peerbench/fx")
    print(r["wall_s"], r["peak_rss_mb"], peers.result_value(r, "preprocess_rows_per_s"))
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FRAPPE_FLAGS",
    "FRAPPE_ZOO",
    "PeerEnvError",
    "deepctr_deepfm",
    "frappe_to_csv",
    "fuxictr_frappe",
    "fuxictr_preprocess",
    "fuxictr_train",
    "fuxictr_zoo_frappe",
    "gen_synth_criteo",
    "peer_versions",
    "peers_python",
    "result_value",
    "run_peer",
]

SYNTH_ROWS = 2_000_000
SYNTH_SEED = 20251122

# BARS DeepFM_frappe_x1 settings, as in the harness README's Frappe command for FuxiCTR.
FRAPPE_FLAGS: dict[str, Any] = {
    "ext": "csv", "sep": ",", "schema": "frappe", "dataset_name": "frappe_x1_recon", "min_categr_count": 1,
    "train_rows": 0, "embedding_dim": 10, "emb_reg": 0.05, "net_dropout": 0.2, "batch_norm": True,
    "epochs": 100, "patience": 2, "seed": 2021,
}

# BARS Frappe_x1 settings of other FuxiCTR model-zoo models, as published in reczoo/BARS
# ranking/ctr/<Model>/<Model>_frappe_x1/README.md (the logged params of the leaderboard run): DCNv2_frappe_x1_007
# (FuxiCTR 1.1.0) and FinalMLP_frappe_x1_004 (FuxiCTR 2.0.1). Early stopping on validation AUC, patience 2.
FRAPPE_ZOO: dict[str, dict[str, Any]] = {
    "DCNv2": {"model_structure": "parallel", "use_low_rank_mixture": False, "low_rank": 32, "num_experts": 4,
              "num_cross_layers": 4, "parallel_dnn_hidden_units": [400, 400, 400],
              "stacked_dnn_hidden_units": [500, 500, 500], "dnn_activations": "relu", "net_dropout": 0.4,
              "batch_norm": True, "embedding_dim": 10, "embedding_regularizer": 0.05, "learning_rate": 1e-3,
              "batch_size": 4096, "epochs": 100, "early_stop_patience": 2},
    "FinalMLP": {"mlp1_hidden_units": [400], "mlp1_hidden_activations": "relu", "mlp1_dropout": 0.4,
                 "mlp1_batch_norm": True, "mlp2_hidden_units": [100], "mlp2_hidden_activations": "relu",
                 "mlp2_dropout": 0.4, "mlp2_batch_norm": True, "use_fs": True, "fs_hidden_units": [400],
                 "fs1_context": ["user"], "fs2_context": ["item"], "num_heads": 5, "embedding_dim": 10,
                 "embedding_regularizer": 0.05, "learning_rate": 1e-3, "batch_size": 4096, "epochs": 100,
                 "early_stop_patience": 2},
}


class PeerEnvError(RuntimeError):
    """The peer environment (venv, polars overlay, model-zoo source or harness) is missing."""


# --------------------------------------------------------------------------------------------
# locations


def peers_python() -> Path:
    """Interpreter of the peer venv: ``$PEERS_PY`` or ``/tmp/peers/bin/python``."""
    return Path(os.environ.get("PEERS_PY", "/tmp/peers/bin/python"))


def _scratch() -> Path:
    return Path(os.environ.get("PEERBENCH_DIR", "/tmp/peerbench"))


def _polars_overlay() -> Path:
    return _scratch() / "polars1"


def _zoo() -> Path:
    return _scratch() / "fuxictr_zoo"


def _harness() -> Path:
    env = os.environ.get("PEERS_HARNESS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "peers"


def _datasets() -> Path:
    return _harness().parent / "datasets"


_SETUP_HINT = ("run bench/setup_peers.sh first "
               "(it builds the peer venv, the polars overlay and the model-zoo source)")


def _require(python: bool = True, overlay: bool = False, zoo: Path | None = None) -> Path:
    """Check the pieces a peer stage needs; return the peer interpreter."""
    py = peers_python()
    if python and not (py.is_file() and os.access(py, os.X_OK)):
        raise PeerEnvError(f"peer interpreter {py} not found (set PEERS_PY to override): {_SETUP_HINT}")
    if overlay and not (_polars_overlay() / "polars" / "__init__.py").is_file():
        raise PeerEnvError(f"polars 1.x overlay {_polars_overlay()} not found "
                           f"(FuxiCTR 2.3.10 fails with polars 2.x): {_SETUP_HINT}")
    if zoo is not None and not (zoo / "DeepFM_torch" / "src" / "DeepFM.py").is_file():
        raise PeerEnvError(f"FuxiCTR DeepFM model-zoo source not found under {zoo}: {_SETUP_HINT}")
    if not (_harness() / "benchutil.py").is_file():
        raise PeerEnvError(f"peer harness not found at {_harness()} (set PEERS_HARNESS to its folder)")
    return py


# --------------------------------------------------------------------------------------------
# process-tree memory sampling


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, SID, rss bytes) of one process from /proc/<pid>/stat, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()  # fields[0] is field 3 (state) of proc(5)
    try:
        return int(fields[1]), int(fields[3]), int(fields[21]) * _PAGE
    except (IndexError, ValueError):
        return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _proc_mem(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS, RssAnon, RssShmem) of one process in bytes from /proc/<pid>/status, or None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    vals = {}
    for line in data.split(b"\n"):
        if line.startswith((b"VmRSS:", b"RssAnon:", b"RssShmem:")):
            key, rest = line.split(b":", 1)
            vals[key] = int(rest.split()[0]) * 1024
    if b"VmRSS" not in vals:  # zombie or kernel thread
        return None
    return vals[b"VmRSS"], vals.get(b"RssAnon", 0), vals.get(b"RssShmem", 0)


class _TreeSampler(threading.Thread):
    """Samples the summed RSS of a process tree every `interval` seconds until stopped.

    Linux: reads /proc directly. The set of member pids (descendants of the root plus every
    process with the root's SID, see setsid(2)) is rebuilt from a full /proc scan every `rescan`
    samples; in between only the known members are read, which keeps the sampler's own CPU use
    around 1% of a core.
    Elsewhere psutil is used when it is installed; without either, no memory figure is taken.
    """

    def __init__(self, root: int, interval: float = 0.05, rescan: int = 5):
        super().__init__(daemon=True)
        self.root, self.interval, self.rescan = root, interval, max(1, rescan)
        self.peak_bytes = 0
        self.peak_anon = 0
        self.peak_shmem = 0
        self.peak_procs = 0
        self.samples = 0
        self.members: set[int] = {root}
        self._stop_evt = threading.Event()
        self.mode = "proc" if os.path.isdir("/proc/self") else "psutil"
        if self.mode == "psutil":
            try:
                import psutil  # noqa: F401
            except ImportError:
                self.mode = "none"

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()

    def _scan_members(self) -> set[int]:
        table: dict[int, tuple[int, int, int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _proc_stat(int(name))
                if st is not None:
                    table[int(name)] = st
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        members = {pid for pid, (_, sid, _) in table.items() if sid == self.root}
        stack = [self.root]
        while stack:
            pid = stack.pop()
            if pid in table:
                members.add(pid)
                stack.extend(children.get(pid, ()))
        return members

    def _sample_proc(self, full: bool) -> tuple[int, int]:
        if full:
            self.members = self._scan_members()
        total = anon = shmem = 0
        alive = set()
        for pid in self.members:
            m = _proc_mem(pid)
            if m is not None:
                total += m[0]
                anon += m[1]
                shmem += m[2]
                alive.add(pid)
        self.members = alive | {self.root}
        self.peak_anon = max(self.peak_anon, anon)
        self.peak_shmem = max(self.peak_shmem, shmem)
        return total, len(alive)

    def _sample_psutil(self) -> tuple[int, int]:
        import psutil
        try:
            root = psutil.Process(self.root)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return 0, 0
        total, n = 0, 0
        for p in procs:
            try:
                total += p.memory_info().rss
                n += 1
            except psutil.Error:
                pass
        return total, n

    def run(self) -> None:
        if self.mode == "none":
            return
        i = 0
        while not self._stop_evt.is_set():
            if self.mode == "proc":
                total, n = self._sample_proc(full=(i % self.rescan == 0))
            else:
                total, n = self._sample_psutil()
            self.samples += 1
            self.peak_bytes = max(self.peak_bytes, total)
            self.peak_procs = max(self.peak_procs, n)
            i += 1
            self._stop_evt.wait(self.interval)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def _sweep_leftovers(sid: int, grace: float = 5.0) -> list[int]:
    """Terminate processes still carrying SID `sid` (the run's own, from setsid) after its root exited."""
    if not os.path.isdir("/proc/self"):
        return []
    def left() -> list[int]:
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _proc_stat(int(name))
                if st is not None and st[1] == sid and int(name) != os.getpid():
                    out.append(int(name))
        return out
    pids = left()
    if not pids:
        return []
    deadline = time.monotonic() + grace  # give Ray's own shutdown a moment first
    while pids and time.monotonic() < deadline:
        time.sleep(0.25)
        pids = left()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(1.0)
        pids = left()
        if not pids:
            break
    return pids


# --------------------------------------------------------------------------------------------
# running one stage


def _parse_results(lines: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        i = line.find("RESULT {")
        if i < 0:
            continue
        try:
            out.append(json.loads(line[i + len("RESULT "):]))
        except json.JSONDecodeError:
            pass
    return out


def run_peer(cmd: Sequence[str], env_extra: Mapping[str, str | None] | None = None,
             cwd: str | os.PathLike[str] | None = None, *, timeout: float | None = None,
             log_path: str | os.PathLike[str] | None = None, interval: float = 0.05,
             tail_chars: int = 4000) -> dict[str, Any]:
    """Run one peer stage in a subprocess and measure it from outside.

    Args:
        cmd: the command line (usually the peer interpreter and a harness script with its flags).
        env_extra: variables to set on top of the current environment; a value of None removes
            the variable (e.g. ``{"PYTHONPATH": None}``).
        cwd: working directory of the subprocess.
        timeout: seconds after which the run's process group is killed (returncode then < 0).
        log_path: where to keep the combined stdout+stderr; by default a temporary file that is
            removed afterwards (its tail comes back as ``stdout_tail``).
        interval: sampling interval of the process-tree memory, in seconds.
        tail_chars: how many trailing characters of the output to return.

    Returns:
        dict with ``wall_s`` (float), ``peak_rss_mb`` (peak summed RSS of the process tree in MiB,
        None where it could not be sampled), ``peak_rss_anon_mb`` and ``peak_rss_shmem_mb`` (peaks
        of the summed anonymous and shared-memory parts of that RSS, Linux only: Ray's object store
        is shared memory mapped by several processes, so it is counted several times in the sum,
        while anonymous memory is private to each process), ``peak_procs``, ``returncode``,
        ``results`` (list of the parsed ``RESULT {...}`` rows: lib, model, dataset, metric, value,
        unit, machine, notes), ``stdout_tail``, ``cmd``, ``log_path`` (None when the log was
        temporary) and ``timed_out``.
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in (env_extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    keep_log = log_path is not None
    if keep_log:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    timed_out = False
    with open(log_path, "w+b") if keep_log else tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = _TreeSampler(proc.pid, interval=interval)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                rc = proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                _killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        except BaseException:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            wall = time.perf_counter() - t0
            sampler.stop()
        _sweep_leftovers(proc.pid)
        log.flush()
        log.seek(0)
        text = log.read().decode("utf-8", errors="replace")
    split_mem = bool(sampler.samples) and sampler.mode == "proc"
    return {
        "wall_s": wall,
        "peak_rss_mb": (sampler.peak_bytes / 2**20) if sampler.samples else None,
        "peak_rss_anon_mb": (sampler.peak_anon / 2**20) if split_mem else None,
        "peak_rss_shmem_mb": (sampler.peak_shmem / 2**20) if split_mem else None,
        "peak_procs": sampler.peak_procs,
        "returncode": rc,
        "results": _parse_results(text.splitlines()),
        "stdout_tail": text[-tail_chars:],
        "cmd": [str(c) for c in cmd],
        "log_path": str(log_path) if keep_log else None,
        "timed_out": timed_out,
    }


def result_value(run: Mapping[str, Any], metric: str) -> Any:
    """The value of the last ``RESULT`` row named `metric` in a `run_peer` result (KeyError if none)."""
    for row in reversed(run.get("results", [])):
        if row.get("metric") == metric:
            return row.get("value")
    raise KeyError(f"no RESULT row with metric {metric!r}")


def _flags(options: Mapping[str, Any]) -> list[str]:
    """``{"train_rows": 0, "batch_norm": True, "gpu": None}`` -> ``["--train-rows", "0", "--batch-norm"]``."""
    out: list[str] = []
    for key, val in options.items():
        flag = "--" + key.replace("_", "-")
        if val is None or val is False:
            continue
        if val is True:
            out.append(flag)
        else:
            out += [flag, str(val)]
    return out


def _fuxictr(data_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str], flags: Mapping[str, Any],
             zoo: str | os.PathLike[str] | None, results_path: str | os.PathLike[str] | None,
             **run_kw: Any) -> dict[str, Any]:
    zoo_p = Path(zoo) if zoo is not None else _zoo()
    py = _require(overlay=True, zoo=zoo_p)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cmd = [str(py), str(_harness() / "fuxictr_deepfm.py"), "--data", str(data_dir), "--work", str(work),
           "--zoo", str(zoo_p), *_flags(flags)]
    env = {"PYTHONPATH": str(_polars_overlay()),
           # the harness appends every figure to a JSONL file; keep it out of the read-only harness folder
           "PEER_RESULTS": str(results_path or work / "results.jsonl")}
    return run_peer(cmd, env, cwd=work, **run_kw)


def fuxictr_preprocess(data_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str], *,
                       zoo: str | os.PathLike[str] | None = None,
                       results_path: str | os.PathLike[str] | None = None,
                       **harness_flags: Any) -> dict[str, Any]:
    """FuxiCTR preprocessing (FeatureProcessor + build_dataset: raw TSV -> parquet + feature_map.json).

    Runs ``fuxictr_deepfm.py --stage preprocess`` with the polars 1.x overlay on PYTHONPATH. Its
    ``RESULT`` rows are ``preprocess_rows_per_s`` and ``preprocess_seconds``; the output lands in
    ``<work_dir>/data/<dataset-name>_fx``. Extra keyword arguments become harness flags
    (``min_categr_count=1`` -> ``--min-categr-count 1``); ``timeout``/``log_path`` go to `run_peer`.
    """
    run_kw = {k: harness_flags.pop(k) for k in ("timeout", "log_path") if k in harness_flags}
    return _fuxictr(data_dir, work_dir, {"stage": "preprocess", **harness_flags}, zoo, results_path, **run_kw)


def fuxictr_train(data_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str], *,
                  zoo: str | os.PathLike[str] | None = None,
                  results_path: str | os.PathLike[str] | None = None,
                  **harness_flags: Any) -> dict[str, Any]:
    """FuxiCTR DeepFM training through its own ``model.fit``, then ``model.evaluate`` on test.

    Needs `fuxictr_preprocess` to have run with the same `work_dir`. Harness defaults: one epoch
    on the first 1,000,000 train rows, batch 4096. Keyword arguments become harness flags, e.g.
    ``train_rows=0, epochs=3, max_seconds=60``; ``timeout``/``log_path`` go to `run_peer`.
    ``RESULT`` rows: ``train_samples_per_s``, ``fit_wall_seconds``, ``test_AUC``, ``test_logloss``,
    ``test_eval_seconds``.
    """
    run_kw = {k: harness_flags.pop(k) for k in ("timeout", "log_path") if k in harness_flags}
    return _fuxictr(data_dir, work_dir, {"stage": "train", **harness_flags}, zoo, results_path, **run_kw)


def fuxictr_frappe(frappe_csv_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str], *,
                   zoo: str | os.PathLike[str] | None = None,
                   results_path: str | os.PathLike[str] | None = None, **overrides: Any) -> dict[str, Any]:
    """FuxiCTR DeepFM on Frappe_x1 with the BARS settings (preprocess + train + test in one run).

    `frappe_csv_dir` holds the train/valid/test CSVs written by `frappe_to_csv`. The flags are
    `FRAPPE_FLAGS` (emb 10, MLP 400-400-400, BN, dropout 0.2, embedding reg 0.05, up to 100 epochs
    with early stopping, patience 2, seed 2021); `overrides` replace or add harness flags.
    """
    run_kw = {k: overrides.pop(k) for k in ("timeout", "log_path") if k in overrides}
    return _fuxictr(frappe_csv_dir, work_dir, {**FRAPPE_FLAGS, **overrides}, zoo, results_path, **run_kw)


def fuxictr_zoo_frappe(model: str, frappe_csv_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str], *,
                       seed: int = 2021, zoo: str | os.PathLike[str] | None = None,
                       results_path: str | os.PathLike[str] | None = None, **run_kw: Any) -> dict[str, Any]:
    """FuxiCTR model-zoo `model` (a key of `FRAPPE_ZOO`) on Frappe_x1 with its BARS settings.

    Preprocesses `frappe_csv_dir` (from `frappe_to_csv`) once into `work_dir` with the harness's preprocess stage
    (its ``RESULT`` rows come back as ``preprocess``), then trains with ``bench/fuxictr_zoo_model.py``: FuxiCTR's
    ``model.fit`` with early stopping, then ``model.evaluate`` on test. ``RESULT`` rows: ``fit_wall_seconds``,
    ``train_samples_per_s``, ``epochs``, ``parameters``, ``test_AUC``, ``test_logloss``. ``timeout``/``log_path``
    go to `run_peer`.
    """
    zoo_p = Path(zoo) if zoo is not None else _zoo()
    if model not in FRAPPE_ZOO:
        raise ValueError(f"no BARS Frappe settings for {model!r}; known: {sorted(FRAPPE_ZOO)}")
    if not (zoo_p / model / "src" / f"{model}.py").is_file():
        raise PeerEnvError(f"FuxiCTR {model} model-zoo source not found under {zoo_p}: {_SETUP_HINT}")
    work = Path(work_dir)
    data_dir = work / "data" / f"{FRAPPE_FLAGS['dataset_name']}_fx"
    prep = None
    if not (data_dir / "feature_map.json").is_file():
        keep = ("ext", "sep", "schema", "dataset_name", "min_categr_count")
        prep = fuxictr_preprocess(frappe_csv_dir, work, zoo=zoo_p, results_path=results_path,
                                  **{k: FRAPPE_FLAGS[k] for k in keep})
        if prep["returncode"] != 0:
            return prep
    py = _require(overlay=True)
    cmd = [str(py), str(Path(__file__).resolve().parent / "fuxictr_zoo_model.py"), "--model", model,
           "--data-dir", str(data_dir), "--zoo", str(zoo_p), "--harness", str(_harness()), "--work", str(work),
           "--params", json.dumps(FRAPPE_ZOO[model]), "--seed", str(seed),
           "--dataset-name", str(FRAPPE_FLAGS["dataset_name"]),
           "--results", str(results_path or work / "results.jsonl")]
    run = run_peer(cmd, {"PYTHONPATH": str(_polars_overlay())}, cwd=work, **run_kw)
    return {**run, "preprocess": prep["results"] if prep else None}


def deepctr_deepfm(data_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str], *,
                   results_path: str | os.PathLike[str] | None = None,
                  **harness_flags: Any) -> dict[str, Any]:
    """DeepCTR-Torch DeepFM through its documented example flow (preprocess and fit in one process).

    Keyword arguments become ``deepctr_deepfm.py`` flags (e.g. ``schema="frappe", ext="csv", sep=","``);
    `work_dir` is only the working directory and the default place of the results JSONL.
    """
    py = _require()
    run_kw = {k: harness_flags.pop(k) for k in ("timeout", "log_path") if k in harness_flags}
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cmd = [str(py), str(_harness() / "deepctr_deepfm.py"), "--data", str(data_dir), *_flags(harness_flags)]
    env = {"PYTHONPATH": None, "PEER_RESULTS": str(results_path or work / "results.jsonl")}
    return run_peer(cmd, env, cwd=work, **run_kw)


# --------------------------------------------------------------------------------------------
# data


def gen_synth_criteo(out_dir: str | os.PathLike[str], rows: int = SYNTH_ROWS, seed: int = SYNTH_SEED, *,
                     split: Sequence[int] | None = None, skip_if_present: bool = False,
                     **run_kw: Any) -> dict[str, Any]:
    """Write the seeded synthetic Criteo-shaped data: train.tsv, valid.tsv, test.tsv and meta.json.

    The default is the harness's 2,000,000 rows with seed 20251122, split 1.6M/200k/200k. For other
    row counts the split defaults to 80/10/10. With `skip_if_present`, nothing is run when
    ``out_dir/meta.json`` already describes the same rows, seed and split (the result then has
    ``skipped=True`` and no timings).
    """
    if split is None:
        split = (1_600_000, 200_000, 200_000) if rows == SYNTH_ROWS else (
            rows - 2 * (rows // 10), rows // 10, rows // 10)
    out = Path(out_dir)
    if skip_if_present and (out / "meta.json").is_file() and all(
            (out / f"{s}.tsv").is_file() for s in ("train", "valid", "test")):
        meta = json.loads((out / "meta.json").read_text())
        same = (meta.get("rows"), meta.get("seed"), list(meta.get("split", []))) == (rows, seed, list(split))
        if same:
            return {"wall_s": 0.0, "peak_rss_mb": None, "peak_rss_anon_mb": None, "peak_rss_shmem_mb": None,
                    "peak_procs": 0, "returncode": 0, "results": [], "stdout_tail": "", "cmd": [],
                    "log_path": None, "timed_out": False, "skipped": True}
    py = _require()
    cmd = [str(py), str(_harness() / "gen_synth_criteo.py"), "--out", str(out), "--rows", str(rows),
           "--seed", str(seed), "--split", ",".join(str(int(s)) for s in split)]
    return {**run_peer(cmd, {"PYTHONPATH": None}, **run_kw), "skipped": False}


def frappe_to_csv(out_dir: str | os.PathLike[str], train: str | os.PathLike[str] | None = None,
                  valid: str | os.PathLike[str] | None = None, test: str | os.PathLike[str] | None = None,
                  **run_kw: Any) -> dict[str, Any]:
    """Convert the libFM Frappe files into the Frappe_x1 CSV layout (train.csv, valid.csv, test.csv).

    Defaults: train = ``shared/datasets/frappe_x1_train_reconstructed/frappe.train.libfm.gz``,
    valid/test = ``shared/datasets/frappe_x1_nfm_partial/frappe.{validation,test}.libfm.gz``.
    """
    ds = _datasets()
    train = train or ds / "frappe_x1_train_reconstructed" / "frappe.train.libfm.gz"
    valid = valid or ds / "frappe_x1_nfm_partial" / "frappe.validation.libfm.gz"
    test = test or ds / "frappe_x1_nfm_partial" / "frappe.test.libfm.gz"
    py = _require()
    cmd = [str(py), str(_harness() / "frappe_to_csv.py"), str(train), str(valid), str(test), str(out_dir)]
    return run_peer(cmd, {"PYTHONPATH": None}, **run_kw)


# --------------------------------------------------------------------------------------------
# versions

_VERSIONS_SNIPPET = r"""
import json, platform, sys, sysconfig
from importlib import metadata
out = {"python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "fuxictr", "deepctr-torch", "ray", "pandas", "numpy", "scikit-learn", "pyarrow"):
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out[name] = None
def polars_at(paths):
    for d in metadata.distributions(name="polars", path=paths):
        return d.version
    return None
overlay = sys.argv[1]
out["polars_overlay"] = polars_at([overlay])
out["polars_venv"] = polars_at([sysconfig.get_paths()["purelib"]])
out["polars_used_by_fuxictr"] = out["polars_overlay"] or out["polars_venv"]
print(json.dumps(out))
"""


def peer_versions() -> dict[str, Any]:
    """Versions in the peer venv: python, torch, fuxictr, deepctr-torch, ray, pandas, numpy,
    scikit-learn, pyarrow, and polars both in the venv and in the 1.x overlay that FuxiCTR runs with.
    Reads package metadata only (nothing heavy is imported)."""
    py = _require()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(py), "-c", _VERSIONS_SNIPPET, str(_polars_overlay())], capture_output=True,
                          text=True, env=env, check=True)
    return json.loads(proc.stdout)


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(
        description="Peer-library stages (FuxiCTR / DeepCTR-Torch) with outside timing.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("versions", help="print the peer venv's versions")
    g = sub.add_parser("gen-data", help="synthetic Criteo-shaped TSVs")
    g.add_argument("--out", default=str(_scratch() / "data"))
    g.add_argument("--rows", type=int, default=SYNTH_ROWS)
    g.add_argument("--seed", type=int, default=SYNTH_SEED)
    f = sub.add_parser("frappe-csv", help="Frappe libFM -> CSV")
    f.add_argument("--out", default=str(_scratch() / "frappe"))
    p = sub.add_parser("fx-preprocess", help="FuxiCTR preprocess stage")
    p.add_argument("--data", default=str(_scratch() / "data"))
    p.add_argument("--work", default=str(_scratch() / "fx"))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "versions":
            print(json.dumps(peer_versions(), indent=1))
            return 0
        if args.cmd == "gen-data":
            r = gen_synth_criteo(args.out, args.rows, args.seed, skip_if_present=True)
        elif args.cmd == "frappe-csv":
            r = frappe_to_csv(args.out)
        else:
            r = fuxictr_preprocess(args.data, args.work)
    except PeerEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(r["stdout_tail"][-1500:])
    keys = ("wall_s", "peak_rss_mb", "peak_rss_anon_mb", "peak_rss_shmem_mb", "peak_procs", "returncode")
    print(json.dumps({k: r[k] for k in keys} |
                     {"results": [(x["metric"], x["value"], x["unit"]) for x in r["results"]]}, indent=1))
    return 0 if r["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(_main())
