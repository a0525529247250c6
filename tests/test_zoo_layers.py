"""Every interaction layer of the zoo against a slow, literal version of its paper's formula (float64)."""

from __future__ import annotations

import copy
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given, settings

from ctrkit.nn import attention
from ctrkit.nn.attention import FieldAwareAttention, FieldSelfAttention
from ctrkit.nn.gating import BilinearFusion, FactorizedInteraction, FeatureGate, FieldGate
from ctrkit.nn.mlp import MLP
from ctrkit.nn.interactions import (CIN, BilinearInteraction, CrossNet, CrossNetMix, CrossNetV2, DotInteraction,
                                    FieldAwareInteraction, SENet, field_pairs)

ATOL = 1e-5


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    """Standard normal float64 values from a fixed generator."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randomised(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """The module in float64 with every parameter redrawn (several start at 0 or 1)."""
    module = module.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_field_pairs_are_all_i_below_j() -> None:
    rows, cols = field_pairs(4)
    assert list(zip(rows.tolist(), cols.tolist())) == [(i, j) for i in range(4) for j in range(i + 1, 4)]


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 4), f=st.integers(1, 6), d=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_ffm_equals_its_per_pair_definition(b: int, f: int, d: int, seed: int) -> None:
    emb = rand(b, f, f, d, seed=seed)  # emb[s, i, j] = v_{x_i, f_j}
    want = torch.zeros(b, dtype=torch.float64)
    for s in range(b):
        for i in range(f):
            for j in range(i + 1, f):
                want[s] += torch.dot(emb[s, i, j], emb[s, j, i])
    close(FieldAwareInteraction(f)(emb), want)


@pytest.mark.parametrize("split_half", [True, False])
def test_cin_equals_sum_over_outer_products(split_half: bool) -> None:
    b, m, d, sizes = 3, 4, 5, (6, 4, 3)
    cin = randomised(CIN(m, sizes, split_half))
    x0 = rand(b, m, d)
    prev, pooled = x0, []
    for k, conv in enumerate(cin.convs):
        w = conv.weight[:, :, 0].view(sizes[k], prev.shape[1], m)  # W^{k,h}_{ij}
        h = torch.zeros(b, sizes[k], d, dtype=torch.float64)
        for s in range(b):
            for hh in range(sizes[k]):
                for i in range(prev.shape[1]):
                    for j in range(m):
                        h[s, hh] += w[hh, i, j] * prev[s, i] * x0[s, j]
        if split_half and k < len(sizes) - 1:
            prev, direct = h[:, :sizes[k] // 2], h[:, sizes[k] // 2:]
        else:
            prev = direct = h
        pooled.append(direct.sum(dim=2))
    got = cin(x0)
    assert got.shape == (b, cin.out_features)
    close(got, torch.cat(pooled, dim=1))


def test_cin_rejects_odd_split_sizes() -> None:
    with pytest.raises(ValueError, match="even"):
        CIN(3, (5, 4), split_half=True)


def test_cross_v1_equals_x0_xT_w_plus_b_plus_x() -> None:
    net = randomised(CrossNet(6, 3))
    x0 = rand(4, 6)
    x = x0.clone()
    for l in range(3):
        x = torch.stack([x0[s] * torch.dot(x[s], net.weight[l]) + net.bias[l] + x[s] for s in range(4)])
    close(net(x0), x)


def test_cross_v2_equals_x0_times_Wx_plus_b_plus_x() -> None:
    net = randomised(CrossNetV2(5, 2))
    x0 = rand(3, 5)
    x = x0.clone()
    for layer in net.layers:
        x = torch.stack([x0[s] * (layer.weight @ x[s] + layer.bias) + x[s] for s in range(3)])
    close(net(x0), x)


def test_cross_v2_low_rank_mixture_equals_sum_over_experts() -> None:
    d, r, e, n_layers = 6, 2, 3, 2
    net = randomised(CrossNetMix(d, n_layers, rank=r, experts=e))
    x0 = rand(4, d)
    x = x0.clone()
    for l in range(n_layers):
        rows = []
        for s in range(4):
            g = torch.softmax(net.gates[l].weight @ x[s], dim=0)
            total = torch.zeros(d, dtype=torch.float64)
            for i in range(e):
                inner = torch.tanh(net.c[l, i].T @ torch.tanh(net.v[l, i].T @ x[s]))
                total += g[i] * x0[s] * (net.u[l, i] @ inner + net.bias[l])
            rows.append(total + x[s])
        x = torch.stack(rows)
    close(net(x0), x)


@pytest.mark.parametrize("kind", ["field_all", "field_each", "field_interaction"])
def test_bilinear_equals_vi_W_hadamard_vj(kind: str) -> None:
    f, d = 4, 3
    layer = randomised(BilinearInteraction(f, d, kind))
    emb = rand(2, f, d)
    out, p = [], 0
    for i in range(f):
        for j in range(i + 1, f):
            w = {"field_all": layer.weight, "field_each": layer.weight[i] if kind == "field_each" else None,
                 "field_interaction": layer.weight[p] if kind == "field_interaction" else None}[kind]
            out.append(torch.stack([(emb[s, i] @ w) * emb[s, j] for s in range(2)]))
            p += 1
    close(layer(emb), torch.stack(out, dim=1))


def test_bilinear_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="bilinear kind"):
        BilinearInteraction(3, 2, "field_pair")


def test_senet_equals_squeeze_then_two_relu_layers() -> None:
    f, d = 6, 4
    layer = randomised(SENet(f, reduction=2))
    emb = rand(3, f, d)
    w1, w2 = layer.excite[0].weight, layer.excite[2].weight
    for s in range(3):
        z = torch.tensor([emb[s, i].mean() for i in range(f)], dtype=torch.float64)
        a = torch.relu(w2 @ torch.relu(w1 @ z))
        close(layer(emb)[s], emb[s] * a[:, None])
        close(layer.gates(emb)[s], a)
    assert w1.shape == (3, 6)


def test_dot_interaction_equals_pairwise_dots() -> None:
    x = rand(3, 5, 4)
    want = torch.tensor([[torch.dot(x[s, i], x[s, j]) for i in range(5) for j in range(i + 1, 5)] for s in range(3)],
                        dtype=torch.float64)
    close(DotInteraction(5)(x), want)


@pytest.mark.parametrize("residual, scale, norm, identity", [(True, False, False, False), (False, True, False, False),
                                                             (True, False, True, False), (True, False, True, True),
                                                             (True, True, False, True)])
def test_field_self_attention_equals_autoint_formula(residual: bool, scale: bool, norm: bool, identity: bool) -> None:
    b, f, d, heads = 2, 4, 2, 3
    d_in = heads * d if identity else 3
    layer = randomised(FieldSelfAttention(d_in, d, heads, residual, scale, norm, identity_residual=identity))
    assert (layer.res is None) == (identity or not residual)
    x = rand(b, f, d_in)
    wq, wk, wv = layer.qkv.weight.view(3, heads, d, d_in)
    out, attn = layer(x)
    for s in range(b):
        for i in range(f):
            parts = []
            for h in range(heads):
                scores = torch.stack([torch.dot(wq[h] @ x[s, i], wk[h] @ x[s, j]) for j in range(f)])
                a = torch.softmax(scores / (math.sqrt(d) if scale else 1.0), dim=0)
                close(attn[s, h, i], a)
                parts.append(sum(a[j] * (wv[h] @ x[s, j]) for j in range(f)))
            want = torch.cat(parts)
            if residual:
                want = want + (x[s, i] if identity else layer.res.weight @ x[s, i])
            if norm:  # (v - mean) / sqrt(biased variance + eps) * gamma + beta over the field's heads * d values
                centred = want - want.mean()
                unit = centred / torch.sqrt(centred.pow(2).mean() + layer.norm.eps)
                want = unit * layer.norm.weight + layer.norm.bias
            close(out[s, i], torch.relu(want))


def test_identity_residual_only_where_the_widths_agree() -> None:
    assert FieldSelfAttention(3, 2, 3, identity_residual=True).res is not None  # 3 -> 6: projected
    assert FieldSelfAttention(6, 2, 3, identity_residual=True).res is None
    assert FieldSelfAttention(6, 2, 3, residual=False, identity_residual=True).identity is False


@pytest.mark.parametrize("scale,rows_per_call", [(False, 32768), (True, 32768), (False, 4)])
def test_fused_mix_is_the_plain_attention(scale: bool, rows_per_call: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's training path (fused attention kernels, the batch in parts of ``SDPA_ROWS`` rows) gives the
    outputs and gradients of softmax(q k^T) v."""
    monkeypatch.setattr(attention, "SDPA_ROWS", rows_per_call)
    q, k, v = (rand(6, 2, 7, 4).requires_grad_() for _ in range(3))
    s = 0.5 if scale else 1.0
    want = torch.softmax(q @ k.transpose(-1, -2) * s, dim=-1) @ v
    got = attention.fused_mix(q, k, v, s)
    close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g), strict=True):
        close(a, b)


def test_field_self_attention_without_maps_is_the_same_layer() -> None:
    layer = randomised(FieldSelfAttention(5, 4, 2, True, True, True))
    x = rand(6, 7, 5).requires_grad_()
    out, attn = layer(x)
    fast, none = layer(x, weights=False)
    assert attn.shape == (6, 2, 7, 7) and none is None
    close(fast, out)
    g = torch.randn_like(out)
    close(torch.autograd.grad(fast, x, g)[0], torch.autograd.grad(out, x, g)[0])


def test_fat_attention_equals_per_field_modulated_formula() -> None:
    b, f, d, heads, a_dim, ffn = 2, 3, 4, 2, 3, 5
    layer = randomised(FieldAwareAttention(f, d, heads, a_dim, ffn)).eval()
    x = rand(b, f, d)
    y, attn = layer(x)
    ln1, ln2 = layer.norm1, layer.norm2
    for s in range(b):
        proj = [x[s, i] @ layer.qkv[i] for i in range(f)]  # field i's own Q|K|V projection
        q = [p[:heads * a_dim].view(heads, a_dim) for p in proj]
        k = [p[heads * a_dim:2 * heads * a_dim].view(heads, a_dim) for p in proj]
        v = [p[2 * heads * a_dim:].view(heads, a_dim) for p in proj]
        for i in range(f):
            heads_out = []
            for h in range(heads):
                scores = torch.stack([layer.pair_scale[h, i, j] * torch.dot(q[i][h], k[j][h]) / math.sqrt(a_dim)
                                      + layer.pair_bias[h, i, j] for j in range(f)])
                a = torch.softmax(scores, dim=0)
                close(attn[s, h, i], a)
                heads_out.append(sum(a[j] * v[j][h] for j in range(f)))
            o = torch.cat(heads_out) @ layer.out[i]
            xi = torch.nn.functional.layer_norm(x[s, i] + o, (d,), ln1.weight, ln1.bias, ln1.eps)
            hid = torch.nn.functional.gelu(xi @ layer.ffn_in[i] + layer.ffn_in_bias[i])
            want = torch.nn.functional.layer_norm(xi + hid @ layer.ffn_out[i] + layer.ffn_out_bias[i], (d,),
                                                  ln2.weight, ln2.bias, ln2.eps)
            close(y[s, i], want)


def test_feature_gate_is_two_sigmoid_of_mlp_of_context() -> None:
    gate = randomised(FeatureGate(3, 5, hidden=(4,)))
    x, ctx = rand(2, 5), rand(2, 3, seed=2)
    l1, l2 = gate.mlp[0], gate.mlp[2]
    for s in range(2):
        g = 2 * torch.sigmoid(l2.weight @ torch.relu(l1.weight @ ctx[s] + l1.bias) + l2.bias)
        close(gate(x, ctx)[s], x[s] * g)


@pytest.mark.parametrize("heads", [1, 2])
def test_bilinear_fusion_equals_its_sum_of_terms(heads: int) -> None:
    fusion = randomised(BilinearFusion(4, 6, heads))
    x, y = rand(3, 4), rand(3, 6, seed=3)
    dx, dy = 4 // heads, 6 // heads
    for s in range(3):
        want = fusion.wx.bias[0] + fusion.wx.weight[0] @ x[s] + fusion.wy.weight[0] @ y[s]
        for h in range(heads):
            want = want + x[s, h * dx:(h + 1) * dx] @ fusion.w[h] @ y[s, h * dy:(h + 1) * dy]
        close(fusion(x, y)[s], want)
    with pytest.raises(ValueError, match="heads"):
        BilinearFusion(4, 6, 4)


def test_finalnet_block_pieces_equal_their_formulas() -> None:
    gate = randomised(FieldGate(3))
    emb = rand(2, 3, 4)
    for s in range(2):
        g = torch.stack([sum(gate.mix.weight[i, j] * emb[s, j] for j in range(3)) + gate.mix.bias[i]
                         for i in range(3)])
        close(gate(emb)[s], torch.cat([emb[s], emb[s] * g]))
    fi = randomised(FactorizedInteraction(5, 3))
    x = rand(4, 5)
    w, bias = fi.linear.weight, fi.linear.bias
    for s in range(4):
        h2, h1 = w[:3] @ x[s] + bias[:3], w[3:] @ x[s] + bias[3:]
        close(fi(x)[s], h2 + h1 * h2)
    block = randomised(MLP(5, (3, 2), None, layer=FactorizedInteraction))
    layers = [m for m in block if isinstance(m, FactorizedInteraction)]
    assert len(layers) == 2
    close(block(x), torch.relu(layers[1](torch.relu(layers[0](x)))))


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 9), f=st.integers(1, 6), heads=st.integers(1, 3), d=st.integers(2, 5),
       scale=st.booleans(), norm=st.booleans(), identity=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_cpu_float32_attention_is_the_float64_layer(b: int, f: int, heads: int, d: int, scale: bool, norm: bool,
                                                    identity: bool, seed: int) -> None:
    """The CPU's float32 training path (softmax and mixing by hand, q, k and v gradients written in place) gives
    the outputs and every gradient of the plain float64 layer, to float32 precision. A layer norm over one value
    would only compare float32 rounding, and over two its gradient scales with 1 / |a - b| (in 7 of 300 random
    cases float32 rounding then exceeded the tolerance): with the norm, d >= 3."""
    assume(d >= 3 or not norm)
    d_in = heads * d if identity else 3
    layer64 = randomised(FieldSelfAttention(d_in, d, heads, True, scale, norm, identity_residual=identity), seed)
    layer = copy.deepcopy(layer64).float()
    x64 = rand(b, f, d_in, seed=seed).requires_grad_()
    x = x64.detach().float().requires_grad_()
    got, none = layer(x, weights=False)
    want, _ = layer64(x64)
    assert none is None and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for a, w in zip(torch.autograd.grad(got, [x, *layer.parameters()], g.float()),
                    torch.autograd.grad(want, [x64, *layer64.parameters()], g), strict=True):
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-5 * (1 + float(w.abs().max())))


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1),
       spread=st.sampled_from([1.0, 30.0]))
def test_cpu_softmax_is_torchs(shape: list[int], seed: int, spread: float) -> None:
    """The hand-written CPU softmax over the last dimension: torch's values and gradients, large scores too."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * spread).requires_grad_()
    got, want = attention.softmax(x), torch.softmax(x, dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    g = torch.randn(shape, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               rtol=1e-5, atol=1e-6)


def test_fat_attention_in_float32_is_the_float64_block() -> None:
    layer64 = randomised(FieldAwareAttention(4, 6, heads=2, attn_dim=3, ffn_dim=5))
    layer = copy.deepcopy(layer64).float()
    x64 = rand(5, 4, 6).requires_grad_()
    x = x64.detach().float().requires_grad_()
    (got, a), (want, a64) = layer(x), layer64(x64)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.double(), a64, rtol=1e-4, atol=1e-6)
    g = rand(*want.shape, seed=3)
    for u, w in zip(torch.autograd.grad(got, [x, *layer.parameters()], g.float()),
                    torch.autograd.grad(want, [x64, *layer64.parameters()], g), strict=True):
        torch.testing.assert_close(u.double(), w, rtol=1e-4, atol=1e-5 * (1 + float(w.abs().max())))


@pytest.mark.parametrize(("m", "want"), [(39, (32, 8)), (5, (16, 0)), (16, (16, 0)), (17, (16, 1)), (48, (32, 16)),
                                         (63, (32, 32)), (64, (64, 0)), (33, (32, 2)), (100, (64, 64))])
def test_cin_fields_split_into_a_power_of_two_block_and_a_tail(m: int, want: tuple[int, int]) -> None:
    """The fused CIN's forward multiplies x0's columns as a block and a tail, each a power of two: the block at
    least 16 wide, the tail's product (the tail times the i's of a block) at least 16 deep, together no wider
    than one power of two would be."""
    from ctrkit.nn.cin_gpu import layout, split_fields

    bp, tail = split_fields(m)
    assert (bp, tail) == want
    mp, ib, _, _ = layout(m, 7, 10)
    assert mp == bp + tail >= m and ib * bp <= 256 and (tail == 0 or ib * tail >= 16)

