"""The GPU claim kernel: one owning position per distinct row, and each row's count of uses.

Runs on a CUDA device, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``); skipped without Triton.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrkit.training import rows_gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not rows_gpu.AVAILABLE or (DEVICE == "cpu" and not INTERPRETED),
                                reason="the claim kernel needs Triton on a CUDA device or its interpreter")


def check_claim(rows: torch.Tensor, n_rows: int, count: bool) -> None:
    owner = torch.full((n_rows,), -7, dtype=torch.int32, device=DEVICE)
    counts = torch.zeros(n_rows, device=DEVICE) if count else None
    rows_gpu.claim(rows, owner, counts)
    r = rows.long().cpu()
    seen = torch.zeros(n_rows, dtype=torch.bool)
    seen[r] = True
    own = owner.cpu().long()
    assert (own[~seen] == -7).all()  # rows nobody reads keep what they held
    claimed = own[seen]
    assert ((claimed >= 0) & (claimed < len(r))).all()
    assert torch.equal(r[claimed], torch.nonzero(seen).ravel())  # each owner is a position of its own row
    if counts is not None:
        assert torch.equal(counts.cpu(), torch.bincount(r, minlength=n_rows).float())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3 * rows_gpu.BLOCK_POSITIONS + 5), st.integers(1, 3000), st.floats(1.0, 6.0),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_claim_owns_each_read_row_once_and_counts_its_uses(n: int, n_rows: int, skew: float, count: bool,
                                                           seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = (torch.rand(n, generator=g) ** skew * n_rows).int().clamp(max=n_rows - 1)  # skewed: rows repeat
    check_claim(rows.to(DEVICE), n_rows, count)


def test_claim_of_a_row_that_fills_every_block() -> None:
    n = 2 * rows_gpu.BLOCK_POSITIONS + 17
    rows = torch.full((n,), 3, dtype=torch.int32)
    rows[::97] = 11
    check_claim(rows.to(DEVICE), 20, True)
