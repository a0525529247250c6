"""HAND-WRITTEN REFERENCE, not ctrkit: the plain-PyTorch DeepFM that ctrkit's GPU training path is measured against.

The same design as ``../shared/peers/gpu_plain_ref.py`` (about forty lines of PyTorch: one ``nn.Embedding``
for all categorical fields plus a 1-wide one for the first-order term, numeric fields as scaled vectors,
MLP 400-400-400, BCE, ``torch.compile`` over the whole step, bf16 autocast, fused dense Adam, data resident on
the GPU, rows drawn by a random permutation), but fed the benchmark's own encoded rows instead of random ids,
so that its speed and its test AUC are read on the same data as ctrkit's. ``bench_gpu.py`` runs it in the same
process as ctrkit; the harness's own script runs beside it in the same call, to show this one is as fast.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn


class PlainDeepFM(nn.Module):
    """DeepFM over one table: ids [B, F] (global), dense [B, Fd] (missing = 0) -> logits [B]."""

    def __init__(self, n_ids: int, n_sparse: int, n_dense: int, dim: int = 16, hidden: int = 400) -> None:
        super().__init__()
        self.emb, self.w = nn.Embedding(n_ids, dim), nn.Embedding(n_ids, 1)
        self.dv = nn.Parameter(torch.randn(n_dense, dim) * 0.01)
        self.mlp = nn.Sequential(nn.Linear((n_sparse + n_dense) * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        e = torch.cat([self.emb(x), d.unsqueeze(-1) * self.dv], 1)
        fm = 0.5 * ((e.sum(1) ** 2) - (e ** 2).sum(1)).sum(1)
        return self.w(x).sum((1, 2)) + fm + self.mlp(e.flatten(1)).squeeze(1)


def run(train: dict[str, np.ndarray], test: dict[str, np.ndarray], n_ids: int, batch_size: int,
        warmup_steps: int = 20, seed: int = 0) -> dict[str, Any]:
    """One epoch of full batches after ``warmup_steps`` compiled warm-up steps; samples/s of the timed steps
    (training only, as the harness's script measures it) and the test AUC after the epoch."""
    from ctrkit.evaluate.metrics import auc

    dev = "cuda"
    torch.manual_seed(seed)
    ids = torch.from_numpy(train["ids"]).to(dev)
    dense = torch.from_numpy(np.nan_to_num(train["dense"])).to(dev)
    y = torch.from_numpy(train["label"]).to(dev)
    n = len(y)
    m = PlainDeepFM(n_ids, ids.shape[1], dense.shape[1]).to(dev)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, fused=True)
    lf = nn.BCEWithLogitsLoss()

    def step(x: torch.Tensor, d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            loss = lf(m(x, d).float(), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    cstep = torch.compile(step)
    t0 = time.perf_counter()
    perm = torch.randperm(n, device=dev)
    for i in range(warmup_steps):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        cstep(ids[idx], dense[idx], y[idx])
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    steps = n // batch_size
    perm = torch.randperm(n, device=dev)
    t = time.perf_counter()
    for i in range(steps):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        cstep(ids[idx], dense[idx], y[idx])
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    m.eval()
    preds = []
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        tx = torch.from_numpy(test["ids"]).to(dev)
        td = torch.from_numpy(np.nan_to_num(test["dense"])).to(dev)
        for s in range(0, len(tx), 65536):
            preds.append(torch.sigmoid(m(tx[s:s + 65536], td[s:s + 65536]).float()).cpu().numpy())
    test_auc = auc(test["label"], np.concatenate(preds))
    return {"lib": "hand-written torch.compile reference (bench/gpu_reference.py)", "batch": batch_size,
            "samples_per_s": steps * batch_size / secs, "steps": steps, "seconds": secs,
            "warmup_seconds": compile_s, "test_auc": test_auc}
