"""The GPU row update: positions sorted by row, each row's run summed and updated once, against the portable
update (``index_add_`` of the positions' gradients, then :func:`update_rows_` at the distinct rows).

Runs on a CUDA device, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``); skipped without Triton.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrkit.data.dataset import Batch
from ctrkit.models import build_model, model_names
from ctrkit.models.base import model_class
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.training import rows_gpu
from ctrkit.training.optim import cowclip, update_rows_
from ctrkit.training.step import BASE_BATCH, TrainStep, large_batch_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not rows_gpu.AVAILABLE or (DEVICE == "cpu" and not INTERPRETED),
                                reason="the row kernels need Triton on a CUDA device or its interpreter")


def check_update(rows: torch.Tensor, n_rows: int, dim: int, optimizer: str, clip: tuple[float, float] | None,
                 row_lr: tuple[float, float] | None, seed: int, fields: int = 0) -> None:
    """The kernels against the reference; ``fields`` > 0 hands them the gradient as a [n / fields, fields, dim]
    slice of a wider tensor, as the backward of a concatenation leaves it."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(len(rows), dim, generator=g)
    weight = torch.randn(n_rows, dim, generator=g)
    state = tuple(torch.rand(n_rows, dim, generator=g) for _ in range(2 if optimizer == "adam" else 1))
    lr = torch.tensor(0.01, dtype=torch.float64)
    # the reference: each distinct row once, with its summed gradient and its number of uses
    r = torch.unique(rows.long())
    summed = torch.zeros(n_rows, dim, dtype=torch.float64).index_add_(0, rows.long(), grad.double())[r].float()
    counts = torch.bincount(rows.long(), minlength=n_rows)[r].float()
    ref_w, ref_state = weight.clone(), tuple(s.clone() for s in state)
    if clip is not None:
        summed = cowclip(summed, ref_w[r], counts, *clip)
    ref_lr = lr if row_lr is None else lr * counts.clamp(max=row_lr[0]).pow(row_lr[1])[:, None]
    update_rows_(ref_w, r, summed, ref_state, optimizer, ref_lr, 0.9, 0.999, 1e-8)

    w, st_ = weight.to(DEVICE), tuple(s.to(DEVICE) for s in state)
    keys, perm = rows_gpu.sort_rows(rows.to(DEVICE))
    given = grad.to(DEVICE)
    if fields:
        wide = torch.zeros(len(rows) // fields, fields + 3, dim, device=DEVICE)
        wide[:, 1:fields + 1] = given.reshape(-1, fields, dim)
        given = wide[:, 1:fields + 1]
        assert not given.is_contiguous()
    rows_gpu.update([(w, given, st_)], keys, perm, lr.to(DEVICE), optimizer, 0.9, 0.999, 1e-8, clip, row_lr)
    torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-5, atol=1e-5)
    for a, b in zip(st_, ref_state, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 16 positions and runs added up 4 blocks at a time: many blocks and long runs on a few rows."""
    monkeypatch.setattr(rows_gpu, "BLOCK_POSITIONS", 16)
    monkeypatch.setattr(rows_gpu, "SPAN_CHUNK", 4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 300), st.integers(1, 60), st.sampled_from([1, 3, 16]), st.floats(1.0, 8.0),
       st.sampled_from(["adam", "adagrad"]), st.sampled_from([None, (0.5, 1e-3)]),
       st.sampled_from([None, (4.0, 1.0), (16.0, 0.5)]), st.integers(0, 2**31 - 1))
def test_update_sums_each_row_once_like_the_portable_update(small_blocks: None, n: int, n_rows: int, dim: int,
                                                             skew: float, optimizer: str,
                                                             clip: tuple[float, float] | None,
                                                             row_lr: tuple[float, float] | None, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = (torch.rand(n, generator=g) ** skew * n_rows).int().clamp(max=n_rows - 1)  # skewed: rows repeat
    check_update(rows, n_rows, dim, optimizer, clip, row_lr, seed)


@pytest.mark.parametrize("hot", [15, 16, 17, 64, 65, 200])
def test_a_run_across_many_blocks_is_updated_once(small_blocks: None, hot: int) -> None:
    # a row used `hot` times between others: runs that end on, just before and just after block ends, and one
    # longer than a chunk of blocks
    rows = torch.cat([torch.tensor([0, 1, 1]), torch.full((hot,), 5), torch.tensor([7, 7, 9]),
                      torch.full((hot,), 2)]).int()
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(hot))]
    check_update(rows, 12, 3, "adam", (1.0, 1e-5), (8.0, 1.0), hot)


def test_update_at_full_size_blocks() -> None:
    g = torch.Generator().manual_seed(0)
    n = 2 * rows_gpu.BLOCK_POSITIONS + 17
    rows = (torch.rand(n, generator=g) ** 4 * 300).int()
    rows[::97] = 11
    check_update(rows, 300, 16, "adam", None, (16.0, 1.0), 1)


@pytest.mark.parametrize("dim", [1, 16])
def test_update_reads_a_slice_of_a_wider_gradient(small_blocks: None, dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    rows = (torch.rand(40 * 7, generator=g) ** 3 * 50).int()
    check_update(rows, 50, dim, "adam", None, (4.0, 1.0), dim, fields=7)


@pytest.mark.parametrize("dims", [(16, 1), (1, 16, 3)])
def test_tables_looked_up_with_the_same_ids_update_together_as_alone(small_blocks: None,
                                                                      dims: tuple[int, ...]) -> None:
    """Tables of any widths in one call (two share a pass; a third goes alone) get what each gets alone, up to
    float32 rounding: on a GPU the shared pass is compiled with other register layouts, so a row's norms and
    updates may round differently (on an H200: at most 1.2e-7 apart, with or without CowClip)."""
    g = torch.Generator().manual_seed(len(dims))
    rows = (torch.rand(30 * 5, generator=g) ** 3 * 40).int()
    keys, perm = rows_gpu.sort_rows(rows.to(DEVICE))
    lr = torch.tensor(0.01, dtype=torch.float64, device=DEVICE)
    made = [(torch.randn(40, d, generator=g), torch.randn(30, 5, d, generator=g),
             (torch.rand(40, d, generator=g), torch.rand(40, d, generator=g))) for d in dims]
    together, alone = ([(w.to(DEVICE, copy=True), grad.to(DEVICE), tuple(s.to(DEVICE, copy=True) for s in st_))
                        for w, grad, st_ in made] for _ in range(2))  # copies, also on a CPU
    rows_gpu.update(together, keys, perm, lr, "adam", 0.9, 0.999, 1e-8, (1.0, 1e-5), (4.0, 1.0))
    for table in alone:
        rows_gpu.update([table], keys, perm, lr, "adam", 0.9, 0.999, 1e-8, (1.0, 1e-5), (4.0, 1.0))
    for (w, _, st_), (w_alone, _, st_alone) in zip(together, alone, strict=True):
        for got, want in zip((w, *st_), (w_alone, *st_alone), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_update_refuses_a_gradient_of_other_positions() -> None:
    keys, perm = rows_gpu.sort_rows(torch.arange(6, dtype=torch.int32, device=DEVICE))
    table = (torch.zeros(6, 2, device=DEVICE), torch.zeros(5, 2, device=DEVICE),
             (torch.zeros(6, 2, device=DEVICE), torch.zeros(6, 2, device=DEVICE)))
    with pytest.raises(ValueError, match="covers 5 positions, the sorted ids 6"):
        rows_gpu.update([table], keys, perm, torch.tensor(0.1, device=DEVICE), "adam", 0.9, 0.999, 1e-8)


def test_update_with_int64_ids(small_blocks: None) -> None:
    rows = (torch.rand(90, generator=torch.Generator().manual_seed(4)) ** 2 * 30).long()
    check_update(rows, 30, 4, "adagrad", (0.5, 1e-3), None, 4)


def fused_or_portable(step: TrainStep, fused: bool) -> TrainStep:
    """``step`` with its row updates through the kernels (``fused``) or the portable update, whatever the device
    (on a CPU the kernels run under Triton's interpreter)."""
    step._fused = fused
    step._grads = [] if fused else [torch.zeros_like(m.weight) for m in step._tables]
    rule = step.rule
    most = max(m.weight.shape[0] for m in step._tables)
    step._counts = (torch.zeros(most, device=step.device) if not fused and rule and (rule.clip or rule.row_lr)
                    else None)
    return step


@pytest.mark.parametrize("name", [n for n in model_names() if n != "gbdt_lr"])
def test_every_model_trains_the_same_through_the_kernels(name: str) -> None:
    """Each model over ids, a numeric, a multi and a sequence field (two heads where it has them), with the
    large-batch rule's row learning rates: one step through the kernels gives the portable update's weights (one:
    in float32, Adam would turn the tables' rounding differences into steps of the dense weights on the next)."""
    multi = model_class(name).multi_head
    spec = FeatureSpec(n_ids=30, field_sizes=(10, 10), sparse_names=("user", "item"), dense_names=("p",),
                       seq_names=("tags", "history"), seq_kinds=("multi", "sequence"), seq_pooling=("mean", "sum"),
                       seq_targets=("", "item"), seq_max=4, label_names=("click", "buy") if multi else ())
    device = torch.device(DEVICE)

    def run(fused: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        overrides = {"emb_l2_scope": "batch"} if name == "lr" else {}
        if "batch_norm" in model_class(name).config_class.__dataclass_fields__:
            overrides["batch_norm"] = False
        m = build_model(name, spec, sparse_grad=True, **overrides).to(device)
        step = fused_or_portable(TrainStep(m, device, lr=0.05, row_updates=True, compile="off", graphs=False,
                                           rule=large_batch_rule("rows", 4 * BASE_BATCH, device, warmup_steps=2)),
                                 fused)
        # Adam divides a row's summed gradient by its size plus eps: where a sum comes out within float32 rounding
        # of zero, the two summation orders would give different steps; a larger eps keeps such a step small
        step.eps = 1e-4
        g = torch.Generator().manual_seed(1)
        ids = torch.stack([torch.randint(0, 10, (48,), generator=g), torch.randint(10, 20, (48,), generator=g)], 1)
        label = (torch.rand(48, 2 if multi else 1, generator=g) < 0.4).float()
        parts = {"ids": ids.int(), "dense": torch.randn(48, 1, generator=g), "label": label if multi else label[:, 0],
                 "seq": torch.randint(10, 30, (48, 2, 4), generator=g).int(),
                 "seq_len": torch.randint(0, 5, (48, 2), generator=g)}
        step(Batch(**{k: v.to(device) for k, v in parts.items()}))
        step.close()
        return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}

    portable, fused = run(False), run(True)
    for k in portable:
        torch.testing.assert_close(fused[k], portable[k], rtol=1e-5, atol=1e-5, msg=k)  # float32 sums, Adam
