"""A bundle's model on a GPU for serving: each request size replays a CUDA graph captured once.

Scoring a ranking request's thousand candidates is a few microseconds of arithmetic on a GPU, but an eager
forward launches dozens of small kernels and a host copy each way, so it is bound by launch latency. Here the
forward is captured in a CUDA graph per size bucket (powers of two from :data:`MIN_ROWS`): a request is copied
into pinned host buffers, then to the bucket's static device inputs, the graph replays, and the logits come back
through pinned memory. The padding rows past a request hold what an earlier request left there (at first id 0
and missing values): in-vocabulary ids and valid values, whose answers are dropped.

The model runs in fp32 (no TF32), so its answers match the CPU's to float rounding and the scorer can check
them against torch like its other fast paths.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import torch
from torch import nn

from ctrkit.data.dataset import Batch

MIN_ROWS = 64


class GPUError(RuntimeError):
    """No usable CUDA device, or a model this path cannot serve; the message says which."""


def bucket(n: int, max_rows: int) -> int:
    """The captured batch size that holds ``n`` rows: the next power of two from :data:`MIN_ROWS`, at most
    ``max_rows`` (larger requests go in chunks of ``max_rows``)."""
    if n < 1:
        raise ValueError(f"a batch needs at least one row, got {n}")
    size = MIN_ROWS
    while size < n and size < max_rows:
        size *= 2
    return min(size, max_rows)


class GraphedModel:
    """``model(ids, dense)`` -> logits (numpy float32 [n] or [n, heads]) on ``device``, by CUDA graph replay.

    ``max_rows`` is the largest graph captured; a bigger request is scored in chunks. Thread-safe: one request at
    a time uses the staging buffers.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cuda", max_rows: int = 4096) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise GPUError(f"the graphed path runs on a CUDA device, not {self.device}")
        if not torch.cuda.is_available():
            raise GPUError("a CUDA device was asked for but torch sees none (a CPU build of torch, or no GPU)")
        spec = getattr(model, "spec", None)
        if spec is not None and spec.n_seq:
            raise GPUError("the graphed path takes ids and dense only; this model has list fields")
        if max_rows < MIN_ROWS or max_rows & (max_rows - 1):
            raise ValueError(f"max_rows must be a power of two >= {MIN_ROWS}, got {max_rows}")
        self.max_rows = max_rows
        self.model = copy.deepcopy(model).to(self.device).eval()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._host_ids: torch.Tensor | None = None
        self._host_dense: torch.Tensor | None = None
        self._host_out: torch.Tensor | None = None
        self._stream = torch.cuda.Stream(self.device)
        self._done = torch.cuda.Event()
        self._lock = threading.Lock()

    def _capture(self, size: int, ids: np.ndarray, dense: np.ndarray) -> tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                                                               torch.Tensor, torch.Tensor]:
        """Record the forward on ``size`` rows (ids 0, numeric values missing) after two warm-up calls."""
        s_ids = torch.zeros((size, ids.shape[1]), dtype=torch.from_numpy(ids[:0]).dtype, device=self.device)
        s_dense = torch.full((size, dense.shape[1]), float("nan"), dtype=torch.float32, device=self.device)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.no_grad(), torch.cuda.stream(self._stream):
                for _ in range(2):
                    self.model(Batch(s_ids, s_dense))
                self._stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self._stream):
                    s_out = self.model(Batch(s_ids, s_dense)).float()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        entry = (graph, s_ids, s_dense, s_out)
        self._graphs[size] = entry
        return entry

    def _staging(self, ids: np.ndarray, dense: np.ndarray, heads: tuple[int, ...]) -> None:
        """Pinned host buffers of ``max_rows`` rows, made on the first call."""
        if self._host_ids is None:
            self._host_ids = torch.zeros((self.max_rows, ids.shape[1]), dtype=torch.from_numpy(ids[:0]).dtype,
                                         pin_memory=True)
            self._host_dense = torch.zeros((self.max_rows, dense.shape[1]), dtype=torch.float32, pin_memory=True)
            self._host_out = torch.zeros((self.max_rows, *heads), dtype=torch.float32, pin_memory=True)

    def __call__(self, ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """Logits of encoded rows: ids [n, Fs] (the encoder's dtype) and dense [n, Fd] float32, NaN = missing."""
        if len(ids) != len(dense):
            raise ValueError(f"ids has {len(ids)} rows but dense has {len(dense)}")
        if len(ids) == 0:
            raise ValueError("a batch needs at least one row, got 0")
        with self._lock:
            parts = [self._chunk(ids[s:s + self.max_rows], dense[s:s + self.max_rows])
                     for s in range(0, len(ids), self.max_rows)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _chunk(self, ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
        n = len(ids)
        size = bucket(n, self.max_rows)
        graph, s_ids, s_dense, s_out = self._graphs.get(size) or self._capture(size, ids, dense)
        self._staging(ids, dense, tuple(s_out.shape[1:]))
        h_ids, h_dense, h_out = self._host_ids, self._host_dense, self._host_out
        assert h_ids is not None and h_dense is not None and h_out is not None
        h_ids[:n].numpy()[:] = ids
        h_dense[:n].numpy()[:] = dense
        with torch.cuda.stream(self._stream):
            s_ids[:n].copy_(h_ids[:n], non_blocking=True)
            s_dense[:n].copy_(h_dense[:n], non_blocking=True)
            graph.replay()
            h_out[:n].copy_(s_out[:n], non_blocking=True)
            self._done.record(self._stream)
        self._done.synchronize()
        return h_out[:n].numpy().copy()
