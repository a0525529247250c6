"""Row-sparse Adam and Adagrad against torch's own optimizers, row by row."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctrkit.training.optim import RowSparseOptimizer

N_ROWS, DIM = 12, 3


def twin_tables(sparse_b: bool = True, seed: int = 0) -> tuple[nn.Embedding, nn.Embedding]:
    """Two float64 embedding tables with identical starting weights; the first has sparse gradients."""
    torch.manual_seed(seed)
    a = nn.Embedding(N_ROWS, DIM, sparse=True).double()
    b = nn.Embedding(N_ROWS, DIM, sparse=sparse_b).double()
    with torch.no_grad():
        b.weight.copy_(a.weight)
    return a, b


def loss_of(table: nn.Embedding, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient differs per row and per use of a row."""
    return ((table(ids) - target) ** 2).sum()


def step_both(a: nn.Embedding, b: nn.Embedding, opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer,
              ids: torch.Tensor, target: torch.Tensor) -> None:
    """One identical step of two tables with their own optimizers."""
    for table, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        loss_of(table, ids, target).backward()
        opt.step()


def test_adam_matches_torch_sparse_adam() -> None:
    a, b = twin_tables()
    ours = RowSparseOptimizer([a.weight], lr=0.05, rule="adam", betas=(0.8, 0.99), eps=1e-6)
    ref = torch.optim.SparseAdam([b.weight], lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    gen = torch.Generator().manual_seed(1)
    never = torch.tensor([10, 11])
    start = a.weight.detach().clone()
    for _ in range(6):
        ids = torch.randint(0, 10, (5, 4), generator=gen)  # rows 10 and 11 never appear
        ids[0, :2] = ids[1, 0]  # and some rows appear several times in a batch
        target = torch.randn(5, 4, DIM, generator=gen, dtype=torch.float64)
        step_both(a, b, ours, ref, ids, target)
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-12)
    assert not torch.equal(a.weight, start)
    assert torch.equal(a.weight[never], start[never])
    state = ours.state[a.weight]
    assert state["step"] == 6
    assert torch.equal(state["m"][never], torch.zeros(2, DIM)) and torch.equal(state["v"][never], torch.zeros(2, DIM))
    ref_state = ref.state[b.weight]
    torch.testing.assert_close(state["m"], ref_state["exp_avg"], rtol=0, atol=1e-12)
    torch.testing.assert_close(state["v"], ref_state["exp_avg_sq"], rtol=0, atol=1e-12)


def test_adam_float32_matches_sparse_adam_to_1e6() -> None:
    torch.manual_seed(3)
    a = nn.Embedding(N_ROWS, DIM, sparse=True)
    b = nn.Embedding(N_ROWS, DIM, sparse=True)
    with torch.no_grad():
        b.weight.copy_(a.weight)
    ours, ref = RowSparseOptimizer([a.weight], lr=1e-2), torch.optim.SparseAdam([b.weight], lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        ids = torch.randint(0, N_ROWS, (8,), generator=gen)
        step_both(a, b, ours, ref, ids, torch.randn(8, DIM, generator=gen))
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6)


def test_adam_is_lazy_untouched_rows_keep_weights_and_moments() -> None:
    a, _ = twin_tables()
    opt = RowSparseOptimizer([a.weight], lr=0.1)
    loss_of(a, torch.tensor([1, 2]), torch.ones(2, DIM, dtype=torch.float64)).backward()
    opt.step()
    m_after_first = opt.state[a.weight]["m"].clone()
    before = a.weight.detach().clone()
    opt.zero_grad()
    loss_of(a, torch.tensor([3]), torch.ones(1, DIM, dtype=torch.float64)).backward()
    opt.step()
    for row in (1, 2):
        assert torch.equal(a.weight[row], before[row])
        assert torch.equal(opt.state[a.weight]["m"][row], m_after_first[row])
    assert not torch.equal(a.weight[3], before[3])


def test_adagrad_matches_torch_adagrad_when_every_row_is_touched() -> None:
    a, b = twin_tables(sparse_b=False)
    ours = RowSparseOptimizer([a.weight], lr=0.3, rule="adagrad", initial_accumulator=0.1)
    ref = torch.optim.Adagrad([b.weight], lr=0.3, initial_accumulator_value=0.1)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        ids = torch.cat([torch.randperm(N_ROWS, generator=gen), torch.randint(0, N_ROWS, (6,), generator=gen)])
        target = torch.randn(len(ids), DIM, generator=gen, dtype=torch.float64)
        step_both(a, b, ours, ref, ids, target)
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.state[a.weight]["sum"], ref.state[b.weight]["sum"], rtol=0, atol=1e-12)


def test_rowwise_adagrad_two_steps_match_the_literal_formula() -> None:
    a, _ = twin_tables()
    opt = RowSparseOptimizer([a.weight], lr=0.2, rule="rowwise_adagrad", initial_accumulator=0.5)
    w = a.weight.detach().clone()
    acc = torch.full((N_ROWS,), 0.5, dtype=torch.float64)
    for ids in (torch.tensor([1, 3, 3]), torch.tensor([3, 6])):
        targets = torch.ones(len(ids), DIM, dtype=torch.float64)
        opt.zero_grad()
        loss_of(a, ids, targets).backward()
        opt.step()
        g = torch.zeros_like(w).index_add_(0, ids, 2 * (w[ids] - targets))  # d/dw of sum (w - t)^2
        rows = ids.unique()
        acc[rows] += (g[rows] ** 2).mean(dim=1)
        w[rows] -= 0.2 * g[rows] / (acc[rows].sqrt() + 1e-10).unsqueeze(1)
        torch.testing.assert_close(a.weight, w, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[a.weight]["sum"], acc, rtol=0, atol=1e-12)


def test_adagrad_untouched_rows_stay_unchanged() -> None:
    a, _ = twin_tables()
    opt = RowSparseOptimizer([a.weight], lr=0.3, rule="adagrad", initial_accumulator=0.5)
    before = a.weight.detach().clone()
    loss_of(a, torch.tensor([0, 4]), torch.zeros(2, DIM, dtype=torch.float64)).backward()
    opt.step()
    rest = torch.tensor([i for i in range(N_ROWS) if i not in (0, 4)])
    assert torch.equal(a.weight[rest], before[rest])
    assert torch.equal(opt.state[a.weight]["sum"][rest], torch.full((len(rest), DIM), 0.5, dtype=torch.float64))
    assert not torch.equal(a.weight[0], before[0])


@pytest.mark.parametrize("rule", ["adam", "adagrad", "rowwise_adagrad"])
def test_duplicate_ids_in_a_batch_are_summed(rule: str) -> None:
    a, _ = twin_tables()
    opt = RowSparseOptimizer([a.weight], lr=0.1, rule=rule, betas=(0.9, 0.999))
    w = a.weight.detach().clone()
    targets = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [2.0, 0.0, -2.0]], dtype=torch.float64)
    loss_of(a, torch.tensor([5, 5, 5]), targets).backward()
    opt.step()
    g = (2 * (w[5] - targets)).sum(dim=0)
    state = opt.state[a.weight]
    if rule == "adam":
        torch.testing.assert_close(state["m"][5], 0.1 * g, rtol=0, atol=1e-12)
        torch.testing.assert_close(state["v"][5], 0.001 * g * g, rtol=0, atol=1e-12)
        step = 0.1 * (0.001 ** 0.5) / 0.1
        want = w[5] - step * (0.1 * g) / ((0.001 * g * g).sqrt() + 1e-8)
    elif rule == "rowwise_adagrad":  # one accumulator per row: the mean of the row's squared gradient
        assert state["sum"].shape == (N_ROWS,)
        torch.testing.assert_close(state["sum"][5], (g * g).mean(), rtol=0, atol=1e-12)
        want = w[5] - 0.1 * g / ((g * g).mean().sqrt() + 1e-10)
    else:
        torch.testing.assert_close(state["sum"][5], g * g, rtol=0, atol=1e-12)
        want = w[5] - 0.1 * g / (g.abs() + 1e-10)
    torch.testing.assert_close(a.weight[5], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["adam", "adagrad", "rowwise_adagrad"])
def test_tables_sharing_ids_in_one_optimizer_step_as_if_alone(rule: str) -> None:
    torch.manual_seed(3)
    tables = [nn.Embedding(N_ROWS, d, sparse=True).double() for d in (DIM, 1, DIM)]
    alone = [nn.Embedding(N_ROWS, t.embedding_dim, sparse=True).double() for t in tables]
    for t, u in zip(tables, alone):
        with torch.no_grad():
            u.weight.copy_(t.weight)
    together = RowSparseOptimizer([t.weight for t in tables], lr=0.05, rule=rule)
    separate = [RowSparseOptimizer([u.weight], lr=0.05, rule=rule) for u in alone]
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        ids = torch.randint(0, N_ROWS, (6, 3), generator=gen)
        other = torch.randint(0, N_ROWS, (6, 3), generator=gen)
        # the first two tables see the same ids (their distinct rows are shared), the third its own
        for group, opts in ((tables, [together]), (alone, separate)):
            for o in opts:
                o.zero_grad()
            sum(((t(i) - 1.0) ** 3).sum() for t, i in zip(group, (ids, ids, other))).backward()
            for o in opts:
                o.step()
        for t, u in zip(tables, alone):
            torch.testing.assert_close(t.weight, u.weight, rtol=0, atol=1e-12)


def test_dense_gradients_raise_a_clear_error() -> None:
    table = nn.Embedding(4, 2, sparse=False)
    opt = RowSparseOptimizer([table.weight])
    table(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


def test_parameters_without_gradients_are_skipped() -> None:
    a, _ = twin_tables()
    opt = RowSparseOptimizer([a.weight])
    before = a.weight.detach().clone()
    opt.step()
    assert torch.equal(a.weight, before) and not opt.state[a.weight]


@pytest.mark.parametrize("kwargs, match", [({"rule": "sgd"}, "rule"), ({"lr": 0.0}, "lr"), ({"lr": -1.0}, "lr")])
def test_bad_settings_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RowSparseOptimizer([nn.Parameter(torch.zeros(2, 2))], **kwargs)
