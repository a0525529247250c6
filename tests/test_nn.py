"""Shared layers against literal, loop-by-loop versions of their formulas (float64, small random input)."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from ctrkit.data.dataset import Batch
from ctrkit.nn import mlp as mlp_module
from ctrkit.nn.embedding import FeatureEmbedding, FeatureLinear, FeatureSpec
from ctrkit.nn.interactions import FactorizationMachine, pairwise_and_squares
from ctrkit.nn.mlp import MLP, Dropout, _dot, _Linear, linear_relu

SIZES = (4, 3, 5)


def make_spec(sizes: tuple[int, ...] = SIZES, n_dense: int = 2) -> FeatureSpec:
    """A spec whose sparse fields have ``sizes`` ids each, laid out one after another."""
    return FeatureSpec(n_ids=sum(sizes), field_sizes=tuple(sizes),
                       sparse_names=tuple(f"c{i}" for i in range(len(sizes))),
                       dense_names=tuple(f"x{j}" for j in range(n_dense)))


def random_inputs(spec: FeatureSpec, batch: int, gen: torch.Generator,
                  missing: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset ids (field f's local id plus the sizes of the fields before it) and dense values with NaNs."""
    offsets = [sum(spec.field_sizes[:f]) for f in range(spec.n_sparse)]
    ids = torch.zeros(batch, spec.n_sparse, dtype=torch.int64)
    for f, size in enumerate(spec.field_sizes):
        ids[:, f] = torch.randint(0, size, (batch,), generator=gen) + offsets[f]
    dense = torch.randn(batch, spec.n_dense, generator=gen, dtype=torch.float64)
    dense[torch.rand(batch, spec.n_dense, generator=gen) < missing] = float("nan")
    return ids, dense


def fm_loop(emb: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} <e_i, e_j> per sample, by the double loop over field pairs."""
    b, f, _ = emb.shape
    out = torch.zeros(b, dtype=emb.dtype)
    for s in range(b):
        for i in range(f):
            for j in range(i + 1, f):
                out[s] += torch.dot(emb[s, i], emb[s, j])
    return out


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 5), n_fields=st.integers(1, 7), dim=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_fm_equals_double_loop_over_field_pairs(batch: int, n_fields: int, dim: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, n_fields, dim, generator=gen, dtype=torch.float64) * 3
    got = FactorizationMachine()(emb)
    assert got.shape == (batch,)
    torch.testing.assert_close(got, fm_loop(emb), rtol=0, atol=1e-9)
    pair, squares, vectors = pairwise_and_squares(emb)
    assert vectors is emb  # no copy asked for
    torch.testing.assert_close(pair, got, rtol=0, atol=0)
    torch.testing.assert_close(squares, emb.pow(2).sum(dim=(1, 2)), rtol=0, atol=1e-9)


def test_pairwise_and_squares_gradient_matches_finite_differences() -> None:
    emb = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: pairwise_and_squares(e)[:2], (emb,))
    # either output alone (the other gets no gradient)
    assert torch.autograd.gradcheck(lambda e: pairwise_and_squares(e)[0], (emb,))
    assert torch.autograd.gradcheck(lambda e: pairwise_and_squares(e)[1], (emb,))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 4), n_fields=st.integers(1, 5), n_extra=st.integers(1, 3), dim=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_pairwise_and_squares_with_fields_given_by_their_sums(batch: int, n_fields: int, n_extra: int, dim: int,
                                                               seed: int) -> None:
    """Fields given only by (sum of vectors, sum of squared norms) count as if they were in emb: value and
    gradients of both outputs."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, n_fields, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    more = torch.randn(batch, n_extra, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    pair, squares, _ = pairwise_and_squares(emb, (more.sum(dim=1), more.pow(2).sum(dim=(1, 2))))
    whole = torch.cat([emb, more], dim=1)
    torch.testing.assert_close(pair, fm_loop(whole.detach()), rtol=0, atol=1e-9)
    torch.testing.assert_close(squares, whole.pow(2).sum(dim=(1, 2)), rtol=0, atol=1e-9)
    w = torch.randn(2, batch, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((w[0] * pair + w[1] * squares).sum(), (emb, more))
    want_pair, want_sq, _ = pairwise_and_squares(torch.cat([emb, more], dim=1))
    want = torch.autograd.grad((w[0] * want_pair + w[1] * want_sq).sum(), (emb, more))
    for g, x in zip(got, want, strict=True):
        torch.testing.assert_close(g, x, rtol=0, atol=1e-9)
    assert torch.autograd.gradcheck(lambda e, s, q: pairwise_and_squares(e, (s, q))[:2],
                                    (emb, more.sum(dim=1).detach().requires_grad_(),
                                     more.pow(2).sum(dim=(1, 2)).detach().requires_grad_()))


def test_pairwise_and_squares_stay_float32_under_bf16_autocast() -> None:
    emb = torch.randn(8, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pair, squares, _ = pairwise_and_squares(emb)
    assert pair.dtype == squares.dtype == torch.float32
    torch.testing.assert_close(pair, FactorizationMachine()(emb))


def test_fm_single_field_has_no_pairs() -> None:
    emb = torch.randn(4, 1, 3, dtype=torch.float64)
    assert torch.equal(FactorizationMachine()(emb), torch.zeros(4, dtype=torch.float64))


def test_embedding_looks_up_rows_of_one_table_and_scales_numeric_vectors() -> None:
    torch.manual_seed(0)
    spec = make_spec()
    layer = FeatureEmbedding(spec, dim=4).double()
    ids, dense = random_inputs(spec, 16, torch.Generator().manual_seed(1))
    dense[0, 0] = float("nan")
    dense[1, 1] = 0.0
    out = layer(Batch(ids, dense))
    assert out.shape == (16, spec.n_fields, 4)
    table = layer.table.weight
    assert table.shape == (spec.n_ids, 4)
    for s in range(16):
        for f in range(spec.n_sparse):
            assert torch.equal(out[s, f], table[ids[s, f]])
        for j in range(spec.n_dense):
            x = dense[s, j]
            want = layer.dense_missing[j] if math.isnan(x) else x * layer.dense_vec[j]
            torch.testing.assert_close(out[s, spec.n_sparse + j], want, rtol=0, atol=1e-12)
    assert torch.equal(out[1, spec.n_sparse + 1], torch.zeros(4, dtype=torch.float64))


def test_embedding_without_fields_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no fields"):
        FeatureEmbedding(FeatureSpec(n_ids=0, field_sizes=(), sparse_names=(), dense_names=()), 4)


def test_embedding_missing_values_keep_gradients_finite() -> None:
    spec = make_spec()
    layer = FeatureEmbedding(spec, dim=3)
    ids, dense = random_inputs(spec, 8, torch.Generator().manual_seed(2), missing=0.5)
    layer(Batch(ids, dense.float())).pow(2).sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert layer.dense_missing.grad.abs().sum() > 0


def test_embedding_sparse_only_dense_only_and_sparse_gradients() -> None:
    spec = make_spec(n_dense=0)
    layer = FeatureEmbedding(spec, dim=5, sparse=True)
    ids, _ = random_inputs(spec, 6, torch.Generator().manual_seed(3))
    out = layer(Batch(ids, torch.zeros(6, 0)))
    assert out.shape == (6, 3, 5)
    out.sum().backward()
    assert layer.table.weight.grad.is_sparse

    dense_only = FeatureSpec(n_ids=0, field_sizes=(), sparse_names=(), dense_names=("a", "b", "c"))
    layer = FeatureEmbedding(dense_only, dim=2)
    dense = torch.tensor([[1.0, float("nan"), -2.0]])
    out = layer(Batch(torch.zeros(1, 0, dtype=torch.int64), dense))
    assert out.shape == (1, 3, 2)
    assert torch.equal(out[0, 1], layer.dense_missing[1])
    assert torch.equal(out[0, 2], -2.0 * layer.dense_vec[2])


@pytest.mark.parametrize("sizes,n_dense,dim", [(SIZES, 2, 4), (SIZES, 0, 4), ((), 3, 5), (SIZES, 2, 2)])
def test_project_folds_numeric_columns_to_the_same_layer(sizes: tuple[int, ...], n_dense: int, dim: int) -> None:
    """project(emb, batch, layer) is layer(emb.flatten(1)), and every weight gets the same gradient."""
    torch.manual_seed(4)
    spec = FeatureSpec(n_ids=sum(sizes), field_sizes=sizes, sparse_names=tuple(f"c{i}" for i in range(len(sizes))),
                       dense_names=tuple(f"x{j}" for j in range(n_dense)))
    emb_layer = FeatureEmbedding(spec, dim=dim).double()
    linear = nn.Linear(spec.n_fields * dim, 7).double()
    ids, dense = random_inputs(spec, 12, torch.Generator().manual_seed(5), missing=0.4)
    batch = Batch(ids, dense)
    params = [*emb_layer.parameters(), *linear.parameters()]
    want = linear(emb_layer(batch).flatten(1))
    want_grads = torch.autograd.grad(want.pow(2).sum(), params, allow_unused=True, materialize_grads=True)
    for numeric in (True, False):  # the field vectors given with, or without, the numeric fields
        got = emb_layer.project(emb_layer.fields(batch, numeric=numeric), batch, linear, numeric=numeric)
        got_grads = torch.autograd.grad(got.pow(2).sum(), params, allow_unused=True, materialize_grads=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-11)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 6), n_dense=st.integers(1, 4), dim=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_numeric_sums_are_the_sums_of_the_numeric_fields_vectors(rows: int, n_dense: int, dim: int,
                                                                  seed: int) -> None:
    spec = FeatureSpec(n_ids=0, field_sizes=(), sparse_names=(), dense_names=tuple(f"x{j}" for j in range(n_dense)))
    torch.manual_seed(seed)
    layer = FeatureEmbedding(spec, dim=dim).double()
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, n_dense, generator=gen, dtype=torch.float64)
    dense[torch.rand(rows, n_dense, generator=gen) < 0.3] = float("nan")
    vectors = layer(Batch(torch.zeros(rows, 0, dtype=torch.int64), dense))  # [rows, n_dense, dim]
    total, squares = layer.numeric_sums(Batch(torch.zeros(rows, 0, dtype=torch.int64), dense))
    want_total, want_squares = vectors.sum(dim=1), vectors.pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(total, want_total, rtol=0, atol=1e-12)
    torch.testing.assert_close(squares, want_squares, rtol=0, atol=1e-12)
    # the parameters' gradients too, for any weighting of the two results
    a, b = torch.randn_like(total), torch.randn_like(squares)
    params = [layer.dense_vec, layer.dense_missing]
    got = torch.autograd.grad((a * total).sum() + (b * squares).sum(), params)
    want = torch.autograd.grad((a * want_total).sum() + (b * want_squares).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_embedding_rejects_bad_dim() -> None:
    with pytest.raises(ValueError, match="dim"):
        FeatureEmbedding(make_spec(), dim=0)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 6), n_dense=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_linear_term_equals_literal_sum(batch: int, n_dense: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    spec = make_spec(n_dense=n_dense)
    layer = FeatureLinear(spec).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    ids, dense = random_inputs(spec, batch, gen)
    got = layer(Batch(ids, dense))
    assert got.shape == (batch,)
    w, wd, wm, b = layer.table.weight[:, 0], layer.dense_w, layer.dense_missing, layer.bias[0]
    for s in range(batch):
        want = b + sum(w[ids[s, f]] for f in range(spec.n_sparse))
        for j in range(n_dense):
            x = dense[s, j]
            want = want + (wm[j] if math.isnan(x) else x * wd[j])
        torch.testing.assert_close(got[s], want, rtol=0, atol=1e-12)


def test_linear_starts_at_zero_and_handles_dense_only() -> None:
    spec = FeatureSpec(n_ids=0, field_sizes=(), sparse_names=(), dense_names=("a",))
    layer = FeatureLinear(spec)
    out = layer(Batch(torch.zeros(3, 0, dtype=torch.int64), torch.tensor([[1.0], [float("nan")], [2.0]])))
    assert torch.equal(out, torch.zeros(3))


def layer_types(m: nn.Module) -> list[type]:
    """The classes of a sequential module's children, in order."""
    return [type(c) for c in m]


def test_mlp_layouts() -> None:
    plain = MLP(8, (16, 4), out_dim=1)
    assert layer_types(plain) == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(c.in_features, c.out_features) for c in plain if isinstance(c, nn.Linear)] == [(8, 16), (16, 4), (4, 1)]
    assert plain.out_features == 1

    full = MLP(8, (16, 4), out_dim=2, dropout=0.25, batch_norm=True)
    block = [nn.Linear, nn.BatchNorm1d, nn.ReLU, Dropout]
    assert layer_types(full) == block + block + [nn.Linear]
    assert all(c.p == 0.25 for c in full if isinstance(c, Dropout))
    assert full(torch.randn(5, 8)).shape == (5, 2)

    body = MLP(8, (16,), out_dim=None)
    assert layer_types(body) == [nn.Linear, nn.ReLU]
    assert body.out_features == 16
    assert MLP(3, (), out_dim=None).out_features == 3
    assert layer_types(MLP(3, (), out_dim=1)) == [nn.Linear]


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 9), n_in=st.integers(1, 7), n_out=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_linear_relu_is_relu_of_the_layer_with_its_gradients(b: int, n_in: int, n_out: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out).double()
    x = torch.randn(b, n_in, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(b, n_out, generator=gen, dtype=torch.float64)
    want = torch.relu(layer(x))
    got = linear_relu(x, layer)
    params = [x, layer.weight, layer.bias]
    assert torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 9), n_x=st.integers(1, 6), n_rest=st.integers(1, 4), relu=st.booleans(),
       rest_grad=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_linear_with_rest_columns_is_the_layer_over_both(b: int, n_x: int, n_rest: int, relu: bool, rest_grad: bool,
                                                         seed: int) -> None:
    """_Linear over x and the columns ``rest`` after it equals the layer over their concatenation, with every
    gradient; ``rest`` gets an input gradient only where it asks for one."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_x + n_rest, 5).double()
    x = torch.randn(b, n_x, generator=gen, dtype=torch.float64, requires_grad=True)
    rest = torch.randn(b, n_rest, generator=gen, dtype=torch.float64, requires_grad=rest_grad)
    grad = torch.randn(b, 5, generator=gen, dtype=torch.float64)
    want = layer(torch.cat([x, rest], 1))
    want = torch.relu(want) if relu else want
    got = _Linear.apply(x, layer.weight, layer.bias, relu, rest)
    params = [x, layer.weight, layer.bias] + ([rest] if rest_grad else [])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_mlp_first_weight_with_rest_columns_on_every_path() -> None:
    """with_first_weight(x, w, rest) equals the MLP over [x, rest] with w as its first weight, whether the first
    layer runs fused, through oneDNN or plainly (an output layer alone, a layer without a bias)."""
    torch.manual_seed(3)
    for net in (MLP(7, (6, 4), out_dim=1), MLP(7, (), out_dim=2), MLP(7, (5,), out_dim=None, batch_norm=True)):
        net = net.double().eval()
        x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        rest = torch.randn(4, 2, dtype=torch.float64)
        weight = torch.randn(net[0].out_features, 7, dtype=torch.float64, requires_grad=True)
        got = net.with_first_weight(x, weight, rest)
        ref = copy.deepcopy(net)
        with torch.no_grad():
            ref[0].weight.copy_(weight)
        want = nn.Sequential.forward(ref, torch.cat([x, rest], 1))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        gx, = torch.autograd.grad(got.sum(), [x])
        wx, = torch.autograd.grad(want.sum(), [x])
        torch.testing.assert_close(gx, wx, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 9), n_in=st.integers(1, 9), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_dot_is_the_one_logit_layer_in_float32(b: int, n_in: int, bias: bool, seed: int) -> None:
    """mlp._dot (a GPU MLP's one-logit output layer) is F.linear with its gradients; bf16 inputs give float32."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, 1, bias=bias).double()
    x = torch.randn(b, n_in, generator=gen, dtype=torch.float64, requires_grad=True)
    got, want = _dot(x, layer.weight, layer.bias), layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    params = [x, *layer.parameters()]
    grad = torch.randn(b, 1, generator=gen, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    half = _dot(x.detach().bfloat16(), layer.weight.float(), None)
    assert half.dtype == torch.float32


def test_linear_relu_under_bf16_autocast_is_the_autocast_layer() -> None:
    """The product runs in bf16 as nn.Linear's would; gradients come back in each input's own dtype."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    x = torch.randn(6, 12, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        want = torch.relu(layer(x))
        got = linear_relu(x, layer)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    params = [x, layer.weight, layer.bias]
    grad = torch.randn(6, 5, dtype=torch.bfloat16)
    for g, w in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad), strict=True):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


needs_onednn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                       and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                                  reason="this torch has no oneDNN linear")


@contextlib.contextmanager
def through_onednn(calls: list[int]) -> Iterator[None]:
    """Float32 products sent to oneDNN (``CTRKIT_CPU_GEMM=onednn``), each product appending to ``calls``."""
    from ctrkit import devices

    real = torch.ops.mkldnn._linear_pointwise
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("CTRKIT_CPU_GEMM", "onednn")
        devices.onednn_fp32.cache_clear()
        monkeypatch.setattr(mlp_module, "_onednn_linear",
                            lambda *a: calls.append(1) or real(*a[:3], "relu" if a[3] else "none", [], ""))
        try:
            yield
        finally:
            devices.onednn_fp32.cache_clear()


@needs_onednn
@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 40), n_in=st.integers(1, 30), hidden=st.lists(st.integers(1, 30), min_size=1, max_size=3),
       seed=st.integers(0, 2**31 - 1), sliced=st.booleans())
def test_mlp_through_onednn_equals_the_layers_in_float64(b: int, n_in: int, hidden: list[int], seed: int,
                                                          sliced: bool) -> None:
    """With float32 products sent to oneDNN, the MLP's output and every gradient equal the layers' own in float64
    to float32 precision (a slice of a wider input too: its rows are strided); the pre-activations are kept away
    from 0 so that rounding cannot flip a ReLU."""
    calls: list[int] = []
    with through_onednn(calls):
        gen = torch.Generator().manual_seed(seed)
        net = MLP(n_in, hidden, out_dim=1)
        with torch.no_grad():
            for layer in net:
                if isinstance(layer, nn.Linear):  # biases far from 0, weights positive: no pre-activation near 0
                    layer.weight.uniform_(0.1, 1.0, generator=gen)
                    layer.bias.copy_(torch.where(torch.rand(layer.bias.shape, generator=gen) < 0.5, -50.0, 1.0))
        wide = torch.rand(b, n_in + 3, generator=gen) + 0.1
        x = (wide[:, 2:2 + n_in] if sliced else wide[:, :n_in].contiguous()).requires_grad_()
        grad = torch.randn(b, 1, generator=gen)
        got = net(x)
        assert len(calls) == len(hidden) + 1
        net64 = MLP(n_in, hidden, out_dim=1).double()
        net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
        x64 = x.detach().double().requires_grad_()
        want = nn.Sequential.forward(net64, x64)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        got_g = torch.autograd.grad(got, [x, *net.parameters()], grad)
        want_g = torch.autograd.grad(want, [x64, *net64.parameters()], grad.double())
        for g, w in zip(got_g, want_g, strict=True):
            assert g.dtype == torch.float32 and g.shape == w.shape
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * (1 + float(w.abs().max())))


def assert_is_float64_result(net: nn.Module, x: torch.Tensor, got: torch.Tensor) -> None:
    """``got`` = ``net(x)`` in float32 is what a float64 copy of ``net`` gives, and so are the gradients of ``x``
    and of every parameter, to float32 precision."""
    ref = copy.deepcopy(net).double()
    x64 = x.detach().double().requires_grad_()
    want = ref(x64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, [x, *net.parameters()], grad),
                    torch.autograd.grad(want, [x64, *ref.parameters()], grad.double()), strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * (1 + float(w.abs().max())))


@needs_onednn
@pytest.mark.parametrize("block", ["cross_v2", "factorized"])
def test_other_blocks_linear_layers_go_through_onednn_with_the_layers_results(block: str) -> None:
    """DCN-V2's cross layers and FinalNet's factorized interaction call ``linear``: with float32 products sent to
    oneDNN they give their float64 results, gradients included, to float32 precision."""
    from ctrkit.nn.gating import FactorizedInteraction
    from ctrkit.nn.interactions import CrossNetV2

    calls: list[int] = []
    with through_onednn(calls):
        torch.manual_seed(0)
        net = CrossNetV2(12, 3) if block == "cross_v2" else FactorizedInteraction(12, 5)
        x = torch.randn(33, 12, requires_grad=True)
        got = net(x)
        assert len(calls) == (3 if block == "cross_v2" else 1)
        assert_is_float64_result(net, x, got)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_over_fields_goes_through_onednn_with_the_layers_results(bias: bool) -> None:
    """``linear`` over [B, F, in] (AutoInt's projections, with no bias): the layer's float64 results and
    gradients, through oneDNN; a narrow input's weight gradient through BLAS (``ONEDNN_WEIGHT_GRAD_MIN``)."""
    for n_in in (5, mlp_module.ONEDNN_WEIGHT_GRAD_MIN):
        calls: list[int] = []
        with through_onednn(calls):
            torch.manual_seed(0)
            layer = nn.Linear(n_in, 7, bias=bias)
            x = torch.randn(6, 4, n_in, requires_grad=True)
            got = mlp_module.linear(x, layer)
            assert got.shape == (6, 4, 7) and len(calls) == 1
            assert_is_float64_result(layer, x, got)
            assert len(calls) == (3 if n_in >= mlp_module.ONEDNN_WEIGHT_GRAD_MIN else 2)


@needs_onednn
def test_onednn_stays_out_of_bf16_float64_and_compiled_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN's float32 products serve float32 only, outside autocast, and not inside torch.compile (Inductor
    chooses its own kernels): there the MLP gives what it gives with BLAS."""
    from ctrkit import devices

    monkeypatch.setenv("CTRKIT_CPU_GEMM", "onednn")
    devices.onednn_fp32.cache_clear()
    calls: list[int] = []
    monkeypatch.setattr(mlp_module, "_onednn_linear", lambda *a: calls.append(1) / 0)
    try:
        net = MLP(6, (5,), out_dim=1)
        x = torch.randn(4, 6)
        with torch.autocast("cpu", torch.bfloat16):
            net(x)
        net.double()(x.double())
        net.float()
        torch.testing.assert_close(torch.compile(net)(x), nn.Sequential.forward(net, x))
        assert calls == []
    finally:
        devices.onednn_fp32.cache_clear()


@pytest.mark.parametrize("kwargs, match", [({"in_dim": 0, "hidden": (4,)}, "input size"),
                                           ({"in_dim": 4, "hidden": (4,), "dropout": 1.0}, "dropout"),
                                           ({"in_dim": 4, "hidden": (4,), "dropout": -0.1}, "dropout")])
def test_mlp_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MLP(**kwargs)


def test_feature_spec_round_trip() -> None:
    spec = make_spec()
    d = spec.to_dict()
    assert d["field_sizes"] == list(SIZES)
    assert FeatureSpec.from_dict(d) == spec
    assert (spec.n_sparse, spec.n_dense, spec.n_fields) == (3, 2, 5)


def test_dropout_keeps_rate_and_scales() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 256, requires_grad=True)
    d = Dropout(0.3).train()
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    assert torch.allclose(y[kept], x[kept] / 0.7)
    y.sum().backward()
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.7))
    assert (x.grad[~kept] == 0).all()
    d.eval()
    assert d(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)
