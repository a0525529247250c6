"""The training step: row updates against the sparse-gradient optimizer, CowClip against its formula, the
large-batch rule, compiled against eager, and the asynchronous loss."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrkit.data.dataset import Batch
from ctrkit.models import build_model, model_names
from ctrkit.models.base import model_class
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.training.optim import RowSparseOptimizer, cowclip
from ctrkit.training.step import (BASE_BATCH, MAX_AUTOTUNE, LargeBatchRule, TrainStep, cpu_threads,
                                  large_batch_rule)

SIZES = (40, 25, 7)
SPEC = FeatureSpec(n_ids=sum(SIZES), field_sizes=SIZES, sparse_names=("a", "b", "c"), dense_names=("x", "z"))
CPU = torch.device("cpu")


def batches(n: int, rows: int, seed: int) -> list[Batch]:
    """Random batches over SPEC (ids repeat within a batch, some numerics missing)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor((0,) + tuple(np.cumsum(SIZES[:-1])))
    out = []
    for _ in range(n):
        local = torch.stack([torch.randint(0, s, (rows,), generator=g) for s in SIZES], dim=1)
        dense = torch.randn(rows, 2, generator=g)
        dense[torch.rand(rows, 2, generator=g) < 0.1] = float("nan")
        out.append(Batch(ids=(local + offsets).int(), dense=dense, label=(torch.rand(rows, generator=g) < 0.3).float()))
    return out


def model(name: str = "fm", **overrides: object) -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model(name, SPEC, **{"embed_dim": 4, "hidden": (8,), "sparse_grad": True, **overrides})


def trained(step_kwargs: dict, name: str = "fm", steps: int = 6, **overrides: object) -> dict[str, torch.Tensor]:
    """Weights after ``steps`` steps in float64 (so that two summation orders agree to rounding)."""
    m = model(name, **overrides).double()
    step = TrainStep(m, CPU, lr=0.05, **step_kwargs)
    for b in batches(steps, 64, seed=1):
        step(Batch(ids=b.ids, dense=b.dense.double(), label=b.label.double()))
    step.close()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "rowwise_adagrad"])
def test_row_updates_match_sparse_gradient_optimizer(optimizer: str) -> None:
    sparse = trained({"optimizer": optimizer, "row_updates": False})
    rows = trained({"optimizer": optimizer, "row_updates": True})
    for k in sparse:
        torch.testing.assert_close(rows[k], sparse[k], rtol=1e-9, atol=1e-11, msg=k)


@pytest.mark.parametrize("rule", [LargeBatchRule(scale=4.0, clip_ratio=0.5, clip_floor=1e-3),
                                  LargeBatchRule(scale=4.0, cowclip=False, row_lr_power=0.5),
                                  LargeBatchRule(scale=3.0, clip_ratio=0.5, clip_floor=1e-3, row_lr_power=1.0)])
def test_row_updates_with_large_batch_rules_match_sparse_gradient_optimizer(rule: LargeBatchRule) -> None:
    # no batch norm: Adam would turn the rounding noise of the (gradient-free) bias before it into steps
    sparse = trained({"rule": rule, "row_updates": False}, name="deepfm", batch_norm=False)
    rows = trained({"rule": rule, "row_updates": True}, name="deepfm", batch_norm=False)
    for k in sparse:
        torch.testing.assert_close(rows[k], sparse[k], rtol=1e-9, atol=1e-11, msg=k)


def test_row_updates_touch_only_the_rows_read() -> None:
    m = model()
    before = m.embedding.table.weight.detach().clone()
    step = TrainStep(m, CPU, lr=0.05, row_updates=True)
    b = batches(1, 16, seed=2)[0]
    step(b)
    changed = (m.embedding.table.weight.detach() != before).any(dim=1)
    read = torch.zeros(SPEC.n_ids, dtype=torch.bool)
    read[b.ids.long().reshape(-1)] = True
    assert changed.any()
    assert not (changed & ~read).any()


@pytest.mark.parametrize("name", [n for n in model_names() if n != "gbdt_lr"])  # gbdt_lr: its forest is fitted first
def test_row_updates_match_sparse_gradients_for_every_model(name: str) -> None:
    """Every model, over ids, a numeric field, a multi and a sequence field (and two heads where it has them):
    the tables' row updates from the gradients at the looked-up positions equal the sparse-gradient optimizer."""
    multi = model_class(name).multi_head
    spec = FeatureSpec(n_ids=30, field_sizes=(10, 10), sparse_names=("user", "item"), dense_names=("p",),
                       seq_names=("tags", "history"), seq_kinds=("multi", "sequence"), seq_pooling=("mean", "sum"),
                       seq_targets=("", "item"), seq_max=4, label_names=("click", "buy") if multi else ())

    def run(row_updates: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        overrides = {"emb_l2_scope": "batch"} if name == "lr" else {}
        if "batch_norm" in model_class(name).config_class.__dataclass_fields__:
            overrides["batch_norm"] = False  # Adam turns the rounding noise of a bias before batch norm into steps
        m = build_model(name, spec, sparse_grad=True, **overrides).double()
        step = TrainStep(m, CPU, lr=0.05, row_updates=row_updates)
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            ids = torch.stack([torch.randint(0, 10, (16,), generator=g), torch.randint(10, 20, (16,), generator=g)], 1)
            label = (torch.rand(16, 2 if multi else 1, generator=g) < 0.4).double()
            step(Batch(ids=ids.int(), dense=torch.randn(16, 1, generator=g, dtype=torch.float64),
                       label=label if multi else label[:, 0], seq=torch.randint(10, 30, (16, 2, 4), generator=g).int(),
                       seq_len=torch.randint(0, 5, (16, 2), generator=g)))
        step.close()
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    sparse, rows = run(False), run(True)
    for k in sparse:
        torch.testing.assert_close(rows[k], sparse[k], rtol=1e-9, atol=1e-11, msg=k)


def test_row_updates_take_lookups_of_the_batch_ids_only() -> None:
    m = model()
    step = TrainStep(m, CPU, row_updates=True)
    b = batches(1, 16, seed=2)[0]
    step(b)
    table = m.embedding.table
    with pytest.raises(ValueError, match=r"looked up with ids of shape \(16, 2\)"):
        table(b.ids[:, :2])
    with torch.no_grad():  # validation: a plain lookup of any ids
        assert torch.equal(table(b.ids[:, :2]), table.weight[b.ids[:, :2].long()])
    assert table.weight.grad is None  # the table itself never gets a gradient
    step.close()
    assert table(b.ids[:, :2]).requires_grad  # its own forward is back


def test_a_table_used_outside_its_lookups_is_refused() -> None:
    """Row updates see only the gradients at the looked-up positions: a table whose weight the loss also reads
    another way would lose that gradient, so the first step says so."""
    m = model()
    forward, weight = m.forward, m.embedding.table.weight
    m.forward = lambda batch: forward(batch) + 0.0 * weight.sum()
    step = TrainStep(m, CPU, row_updates=True)
    with pytest.raises(ValueError, match=r"embedding table \(72, 4\) gets gradients outside its lookups"):
        step(batches(1, 16, seed=2)[0])


@pytest.mark.parametrize("row_updates", [False, True])
def test_a_frozen_table_stays_as_it_is_and_the_rest_trains(row_updates: bool) -> None:
    """A table whose weight does not require a gradient (pretrained, frozen) is looked up, never updated, by either
    update path; the first-order table beside it still trains."""
    m = model()
    m.embedding.table.weight.requires_grad_(False)
    frozen = m.embedding.table.weight.detach().clone()
    linear = m.linear.table.weight.detach().clone()
    step = TrainStep(m, CPU, lr=0.05, row_updates=row_updates)
    for b in batches(3, 32, seed=4):
        step(b)
    step.close()
    assert torch.equal(m.embedding.table.weight, frozen)
    assert not torch.equal(m.linear.table.weight, linear)
    assert m.embedding.table.sparse and not m.embedding.table.weight.requires_grad


def test_tables_get_sparse_gradients_back_after_close() -> None:
    m = model()
    step = TrainStep(m, CPU, row_updates=True)
    assert not m.embedding.table.sparse
    step.close()
    assert m.embedding.table.sparse and m.linear.table.sparse


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.floats(0.1, 2.0), st.floats(1e-6, 1e-1), st.integers(0, 10_000))
def test_cowclip_matches_its_formula(rows: int, dim: int, ratio: float, floor: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(rows, dim, generator=g, dtype=torch.float64) * 10 ** torch.randint(-3, 2, (rows, 1), generator=g)
    weight = torch.randn(rows, dim, generator=g, dtype=torch.float64) * 0.01
    counts = torch.randint(1, 5, (rows,), generator=g).double()
    got = cowclip(grad, weight, counts, ratio, floor)
    for i in range(rows):
        gn = math.sqrt(sum(float(x) ** 2 for x in grad[i]))
        wn = math.sqrt(sum(float(x) ** 2 for x in weight[i]))
        limit = float(counts[i]) * max(ratio * wn, floor)
        want = [float(x) * (1.0 if gn <= limit else limit / gn) for x in grad[i]]
        assert got[i].tolist() == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_sparse_optimizer_clips_with_counts() -> None:
    table = torch.nn.Embedding(5, 2, sparse=True)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[3.0, 4.0]] * 5))  # row norm 5
    opt = RowSparseOptimizer([table.weight], lr=1.0, rule="adagrad", clip=(0.1, 1e-5))
    ids = torch.tensor([1, 1, 2])
    (table(ids) * 100).sum().backward()  # row 1: grad (200, 200) over 2 uses; row 2: (100, 100) over 1
    before = table.weight.detach().clone()
    opt.step()
    # adagrad's first step moves each coordinate by lr * g / |g| = lr, whatever the clipped size: check the
    # state instead, where the clipped squared gradient lands: row 1 limit 2 * 0.5 = 1, row 2 limit 0.5
    acc = opt.state[table.weight]["sum"]
    assert acc[1].sum().item() == pytest.approx(1.0)
    assert acc[2].sum().item() == pytest.approx(0.25)
    assert torch.equal(table.weight[0], before[0])


def test_large_batch_rule_is_chosen_on_a_gpu_for_large_batches() -> None:
    gpu = torch.device("cuda")
    assert large_batch_rule("auto", BASE_BATCH, gpu) is None
    assert large_batch_rule("auto", 4 * BASE_BATCH, CPU) is None
    rule = large_batch_rule("auto", 16 * BASE_BATCH, gpu, warmup_steps=10)
    assert rule is not None and rule.scale == 16 and rule.dense_lr_factor == 4 and rule.warmup_steps == 10
    # the default ("rows"): a row's learning rate grows with its uses, no clipping, the L2 unchanged
    assert rule.row_lr == (16, 1.0) and rule.clip is None and rule.l2_factor == 1.0
    assert large_batch_rule("off", 16 * BASE_BATCH, gpu) is None
    paper = large_batch_rule("cowclip", 16 * BASE_BATCH, CPU)
    assert paper is not None and paper.clip == (1.0, 1e-5) and paper.row_lr is None and paper.l2_factor == 16
    assert large_batch_rule("cowclip", BASE_BATCH // 2, CPU).scale == 1.0  # type: ignore[union-attr]
    assert large_batch_rule("rows", 2 * BASE_BATCH, CPU).row_lr == (2.0, 1.0)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="large_batch must be one of"):
        large_batch_rule("lars", 1, CPU)


def test_dense_learning_rate_warms_up_to_sqrt_scale() -> None:
    m = model("deepfm")
    step = TrainStep(m, CPU, lr=0.01, rule=LargeBatchRule(scale=4.0, warmup_steps=4))
    dense_opt = step.opts[-1]
    seen = []
    for b in batches(6, 8, seed=4):
        step(b)
        seen.append(dense_opt.param_groups[0]["lr"])
    assert seen == pytest.approx([0.005, 0.01, 0.015, 0.02, 0.02, 0.02])
    step.set_lr(0.001)
    assert dense_opt.param_groups[0]["lr"] == pytest.approx(0.002)
    assert step.opts[0].param_groups[0]["lr"] == pytest.approx(0.001)


def test_loss_mean_is_the_mean_since_the_last_read() -> None:
    m = model()
    step = TrainStep(m, CPU, lr=0.01)
    bs = batches(3, 32, seed=5)
    assert step.loss_mean() is None
    want = []
    for b in bs:
        with torch.no_grad():
            m.eval()
            want.append(torch.nn.functional.binary_cross_entropy_with_logits(m(b), b.label).item())
            m.train()
        step(b)
    assert step.loss_mean() == pytest.approx(sum(want) / 3, rel=1e-5)
    assert step.loss_mean() is None


def test_compiled_step_matches_eager() -> None:
    # no dropout: compiled code draws its random numbers differently
    eager = trained({"row_updates": True, "compile": "off"}, name="deepfm", steps=3, dropout=0.0)
    compiled = trained({"row_updates": True, "compile": "on"}, name="deepfm", steps=3, dropout=0.0)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)


def test_compiled_step_with_row_updates_has_no_graph_break() -> None:
    """With row updates the whole forward, the tables' lookups included, traces into one compiled graph for
    training and one for validation, with no graph break."""
    from torch._dynamo.utils import counters

    counters.clear()
    m = model("deepfm", batch_norm=False)
    step = TrainStep(m, CPU, lr=0.05, compile="on", row_updates=True)
    for b in batches(4, 64, seed=1):
        step(b)
    m.eval()
    step.logits(batches(1, 64, seed=2)[0])
    step.close()
    assert step._compiled_ok == {"train", "eval"}
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2


def test_compile_max_autotunes_the_forward_and_backward_and_the_eval_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, object]] = []

    def fake_compile(fn: object, **kw: object) -> object:
        seen.append((getattr(fn, "__name__", ""), kw.get("mode")))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    TrainStep(model("deepfm"), CPU, compile="max", row_updates=True)
    TrainStep(model("deepfm"), CPU, compile="on", row_updates=True)
    assert seen == [("_forward_loss", MAX_AUTOTUNE), ("_eval_logits", MAX_AUTOTUNE), ("_forward_loss", None),
                    ("_eval_logits", None)]
    with pytest.raises(ValueError, match="compile must be one of"):
        TrainStep(model("deepfm"), CPU, compile="fast")


def test_eval_logits_are_the_models_compiled_for_full_batches_and_padded_for_the_last() -> None:
    # batch norm in eval mode and dropout off: the compiled eval forward must be the model's eval forward
    m = model("deepfm", dropout=0.3, batch_norm=True)
    step = TrainStep(m, CPU, lr=0.05, compile="on", row_updates=True)
    for b in batches(2, 32, seed=4):
        step(b)
    m.eval()
    full, last = batches(1, 32, seed=5)[0], batches(1, 7, seed=6)[0]
    with torch.no_grad():
        want_full, want_last = m(full), m(last)
    torch.testing.assert_close(step.logits(full), want_full, rtol=1e-5, atol=1e-6)
    seen = []
    compiled = step._compiled["eval"]
    step._compiled["eval"] = lambda b: seen.append(len(b)) or compiled(b)
    torch.testing.assert_close(step.logits(last), want_last, rtol=1e-5, atol=1e-6)
    assert seen == [32]  # the 7 rows repeated up to the compiled size, then cut back
    longer = batches(1, 40, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(step.logits(longer), m(longer), rtol=1e-5, atol=1e-6)
    assert seen == [32]  # a longer batch runs eagerly
    assert step._compiled_ok == {"train", "eval"}
    assert step.logits(full).requires_grad is False


def test_a_failed_eval_compile_warns_and_validates_eagerly() -> None:
    m = model()
    step = TrainStep(m, CPU, compile="on", row_updates=True)

    def broken(batch: Batch) -> None:
        raise RuntimeError("no C++ compiler")

    step._compiled["eval"] = broken
    b = batches(1, 16, seed=9)[0]
    m.eval()
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler.*validating eagerly"):
        got = step.logits(b)
    with torch.no_grad():
        torch.testing.assert_close(got, m(b))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step.logits(b)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="compile must be one of"):
        TrainStep(model(), CPU, compile="yes")
    with pytest.raises(ValueError, match="CUDA graphs need"):
        TrainStep(model(), CPU, graphs=True)


def test_cpu_threads_never_exceed_the_cpus_of_the_process() -> None:
    import os

    n = cpu_threads()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(n + 3)
        TrainStep(model(), CPU)
        assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)


def test_a_failed_compile_warns_and_trains_eagerly() -> None:
    m = model()
    step = TrainStep(m, CPU, lr=0.05, compile="on", row_updates=True)

    def broken(batch: Batch) -> None:
        raise RuntimeError("no C++ compiler")

    step._compiled["train"] = broken
    before = m.embedding.table.weight.detach().clone()
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler.*training eagerly"):
        step(batches(1, 16, seed=6)[0])
    assert not torch.equal(before, m.embedding.table.weight.detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the step stays eager
        step(batches(1, 16, seed=7)[0])


def test_compile_with_sparse_table_gradients_warns_and_trains_eagerly() -> None:
    # inductor cannot build a backward that yields a sparse gradient: it used to fail inside backward()
    m = model("deepfm", dropout=0.0)
    with pytest.warns(UserWarning, match="cannot differentiate into sparse embedding gradients"):
        step = TrainStep(m, CPU, lr=0.05, compile="on", row_updates=False)
    assert step._compiled["train"] is None and step._compiled["eval"] is not None
    ref = model("deepfm", dropout=0.0)
    ref_step = TrainStep(ref, CPU, lr=0.05, compile="off", row_updates=False)
    for b in batches(2, 32, seed=11):
        step(b)
        ref_step(b)
    for (k, got), want in zip(m.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, msg=k)


@pytest.mark.parametrize("row_updates", [False, True])
def test_a_step_restored_from_its_state_continues_exactly(row_updates: bool) -> None:
    bs = batches(5, 32, seed=8)
    rule = LargeBatchRule(scale=2.0, warmup_steps=4)

    def make() -> tuple[torch.nn.Module, TrainStep]:
        m = model("deepfm", dropout=0.0)
        return m, TrainStep(m, CPU, lr=0.02, rule=rule, row_updates=row_updates)

    m1, s1 = make()
    for b in bs[:3]:
        s1(b)
    weights, state = {k: v.clone() for k, v in m1.state_dict().items()}, s1.state_dict()
    for b in bs[3:]:
        s1(b)
    m2, s2 = make()
    m2.load_state_dict(weights)
    s2.load_state_dict(state)
    for b in bs[3:]:
        s2(b)
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="belongs to a step with other"):
        TrainStep(model(), CPU, optimizer="adam", row_updates=row_updates).load_state_dict(
            {**state, "opts": state["opts"][:1]} if len(state["opts"]) > 1 else {**state, "opts": []})


def test_the_first_nonfinite_step_is_kept() -> None:
    step = TrainStep(model(), CPU, lr=0.01)
    bs = batches(4, 16, seed=9)
    step(bs[0])
    assert step.first_nonfinite() is None
    bad = Batch(ids=bs[1].ids, dense=bs[1].dense.clone(), label=bs[1].label)
    bad.dense[0, 0] = float("inf")  # inf * weight - inf ... makes the loss NaN
    step(bad)
    step(bs[2])
    assert step.first_nonfinite() == 2
