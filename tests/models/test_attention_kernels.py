"""Maths of the attention kernels (spec sections 1(d), 2(d), 4(d)): identities, gradients, masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.attention import (
    StreamingSketchAttention, attention_lse, attention_lse_reference, ntk_attention, ntk_attention_reference,
    ntk_phi, prefix_attention, sketch_attention, sparse_threshold_attention, sparse_topk_attention, tail_mass,
    taylor_features, topk_schedule,
)
from models.attention.lse import _FUSED_OP

BACKENDS = ["chunked"] + (["fused"] if _FUSED_OP is not None else [])




def rnd(*shape, dtype=torch.float64, seed=None, scale=1.0):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale)


def qkvz(b=2, h=2, nq=6, nk=6, d=4, dtype=torch.float64, zscale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return r(b, h, nq, d), r(b, h, nk, d), r(b, h, nk, d), r(h, d, d) * zscale, r(h, d) * zscale


def pad_mask(b=2, nk=6, n_pad=2):
    m = torch.ones(b, 1, 1, nk, dtype=torch.bool)
    m[-1, ..., nk - n_pad:] = False
    return m


# ---------------------------------------------------------------- lse attention


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,nq,nk,masked", [(False, 6, 6, False), (True, 6, 6, False), (True, 3, 7, False),
                                                 (False, 5, 7, True), (True, 6, 6, True)])
def test_attention_lse_matches_reference_and_gradcheck(backend, causal, nq, nk, masked):
    q, k, v, _, _ = qkvz(nq=nq, nk=nk)
    mask = pad_mask(nk=nk) if masked else None
    out, lse = attention_lse(q, k, v, causal, mask, backend=backend, block=3)
    ro, rl = attention_lse_reference(q, k, v, causal, mask)
    assert torch.allclose(out, ro, atol=1e-12) and torch.allclose(lse, rl, atol=1e-12)
    q, k, v = (t[-1:, :1].clone().requires_grad_() for t in (q, k, v))  # small: gradcheck is O(numel^2)
    mask = mask[-1:] if masked else None
    # both outputs feed the loss, so d lse / d(q, k) is checked (the fused-kernel pitfall)
    f = lambda q, k, v: tuple(x.sin() for x in attention_lse(q, k, v, causal, mask, backend=backend, block=3))
    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


def test_attention_lse_equals_sdpa_float32():
    q, k, v, _, _ = qkvz(b=2, h=3, nq=33, nk=33, d=8, dtype=torch.float32)
    for causal in (False, True):
        out, _ = attention_lse(q, k, v, causal)
        assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-5)


def test_attention_lse_bad_shape_and_backend():
    q = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"\[batch, heads, n, d\]"):
        attention_lse(q, q, q)
    q = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention_lse(q, q, q, backend="magic")


# ---------------------------------------------------------------- NTK-Attention


@pytest.mark.parametrize("causal", [False, True])
def test_ntk_zero_prefix_is_softmax_attention(causal):
    q, k, v, z, zk = qkvz(dtype=torch.float32, nq=9, nk=9)
    out = ntk_attention(q, k, v, torch.zeros_like(z), torch.zeros_like(zk), causal=causal)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,nq,nk,masked", [(False, 6, 6, False), (True, 6, 6, False), (True, 4, 7, False),
                                                 (False, 6, 6, True), (True, 6, 6, True)])
def test_ntk_merge_identity(backend, causal, nq, nk, masked):
    q, k, v, z, zk = qkvz(nq=nq, nk=nk, zscale=3.0)
    mask = pad_mask(nk=nk) if masked else None
    fast = ntk_attention(q, k, v, z, zk, causal=causal, attn_mask=mask, backend=backend)
    ref = ntk_attention_reference(q, k, v, z, zk, causal=causal, attn_mask=mask)
    assert (fast - ref).abs().max() < 1e-12
    # the prefix term actually contributes (the test would pass vacuously otherwise)
    assert (fast - ntk_attention(q, k, v, 0 * z, 0 * zk, causal, mask, backend=backend)).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_ntk_gradcheck_q_k_v_z_zk(backend, causal):
    q, k, v, z, zk = qkvz(b=1, h=2, nq=3, nk=4, d=3, zscale=2.0)
    args = tuple(t.requires_grad_() for t in (q, k, v, z, zk))
    assert torch.autograd.gradcheck(lambda *a: ntk_attention(*a, causal=causal, backend=backend), args,
                                    fast_mode=not causal)
    # and the gradients equal those of the quadratic oracle
    w = rnd(*q.shape, seed=5)
    g_fast = torch.autograd.grad((ntk_attention(*args, causal=causal, backend=backend) * w).sum(), args)
    g_ref = torch.autograd.grad((ntk_attention_reference(*args, causal=causal) * w).sum(), args)
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-10)


def test_ntk_padding_keys_are_ignored():
    q, k, v, z, zk = qkvz(b=1, nq=6, nk=6)
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    mask[..., 4:] = False
    out = ntk_attention(q, k, v, z, zk, attn_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 4:] += 100.0
    v2[:, :, 4:] -= 50.0
    assert torch.allclose(out, ntk_attention(q, k2, v2, z, zk, attn_mask=mask), atol=1e-12)
    # the masked result equals attention over the 4 real keys only
    assert torch.allclose(out, ntk_attention(q, k[:, :, :4], v[:, :, :4], z, zk), atol=1e-12)


def test_ntk_causal_rectangular_offset_and_prefix_on_every_row():
    q, k, v, z, zk = qkvz(b=1, h=1, nq=3, nk=7)
    out = ntk_attention(q, k, v, z, zk, causal=True)
    for i in range(3):  # query i sees keys 0 .. i + (7 - 3); the prefix term on every row
        j = i + 4 + 1
        row = ntk_attention(q[:, :, i:i + 1], k[:, :, :j], v[:, :, :j], z, zk)
        assert torch.allclose(out[:, :, i:i + 1], row, atol=1e-12)
    # future keys do not change earlier rows
    k2 = k.clone()
    k2[:, :, -1] += 10
    assert torch.allclose(ntk_attention(q, k2, v, z, zk, causal=True)[:, :, :2], out[:, :, :2], atol=1e-12)
    assert not torch.allclose(ntk_attention(q, k2, v, z, zk, causal=True)[:, :, 2], out[:, :, 2])


def test_ntk_stable_with_large_scores():
    q, k, v, z, zk = qkvz(nq=8, nk=8, dtype=torch.float32)
    out = ntk_attention(q * 40, k * 40, v, z, zk, causal=True)
    assert torch.isfinite(out).all()


def test_ntk_shape_errors():
    q, k, v, z, zk = qkvz()
    with pytest.raises(ValueError, match="expects z"):
        ntk_attention(q, k, v, z[:, :2], zk)


def _taylor_map(x, p):
    d = x.shape[-1]
    return taylor_features(x, p, scale=d ** -0.5)


def test_ntk_finite_prefix_taylor_approximation_monotone_in_p():
    """Spec 1(d)3: Z = phi_p(P_K)^T P_V, k = phi_p(P_K)^T 1 approximates a finite prefix; error falls with p."""
    d, m, L = 4, 64, 8
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.7
    q, k, v = r(1, 1, L, d), r(1, 1, L, d), r(1, 1, L, d)
    pk, pv = r(1, m, d), r(1, m, d)
    exact = prefix_attention(q, k, v, pk, pv)
    errs = []
    for p in (0, 2, 4, 6):
        fq, fk = _taylor_map(q, p), _taylor_map(pk, p)  # [1,1,L,t], [1,m,t]
        Z = torch.einsum("hmt,hme->hte", fk, pv)
        kk = fk.sum(1)
        a = torch.exp(-attention_lse(q, k, v)[1]).unsqueeze(-1)
        out = (attention_lse(q, k, v)[0] + a * (fq @ Z)) / (1 + a * (fq @ kk.unsqueeze(-1)))
        errs.append((out - exact).abs().max().item())
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.02 * errs[0]


def test_ntk_phi_positive():
    x = torch.linspace(-50, 50, 101).view(1, 1, 1, -1)
    assert (ntk_phi(x) > 0).all()


# ---------------------------------------------------------------- sparse


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_exact_at_k_equal_n(causal):
    q, k, v, _, _ = qkvz(nq=7, nk=7)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert torch.allclose(sparse_topk_attention(q, k, v, 7, causal=causal), ref, atol=1e-12)
    assert torch.allclose(sparse_threshold_attention(q, k, v, 0.0, causal=causal), ref, atol=1e-12)
    assert not torch.allclose(sparse_topk_attention(q, k, v, 2, causal=causal), ref, atol=1e-3)


def test_sparse_identity_tail_mass_and_bound():
    q, k, v, _, _ = qkvz(b=1, h=1, nq=5, nk=12, seed=3)
    s = (q @ k.transpose(-2, -1)) / 2.0
    p = torch.softmax(s, -1)
    exact = p @ v
    taus = []
    for top_k in (1, 3, 6, 12):
        sparse = sparse_topk_attention(q, k, v, top_k)
        sel = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, p.topk(top_k, -1).indices, True)
        tau = (p * ~sel).sum(-1, keepdim=True)
        mu_head = (p * sel) @ v / (1 - tau)
        mu_tail = (p * ~sel) @ v / tau.clamp_min(1e-300)
        diff = exact - sparse
        assert torch.allclose(diff, tau * (mu_tail - mu_head) * (tau > 0), atol=1e-12)
        assert (diff.norm(dim=-1) <= 2 * tau.squeeze(-1) * v.norm(dim=-1).max() + 1e-12).all()
        assert torch.allclose(tau.squeeze(-1), tail_mass(q, k, top_k))
        taus.append(tau)
    assert all((b <= a + 1e-15).all() for a, b in zip(taus, taus[1:]))


def test_sparse_causal_never_selects_masked_entries():
    q, k, v, _, _ = qkvz(b=1, h=1, nq=6, nk=6)
    v2 = v.clone()
    v2[:, :, -1] = 1e6  # a future value must never leak into earlier rows
    out = sparse_topk_attention(q, k * 5, v2, top_k=3, causal=True)
    assert out[:, :, :-1].abs().max() < 1e3
    assert torch.isfinite(out).all()


def test_sparse_padding_respected_and_rows_with_fewer_keys():
    q, k, v, _, _ = qkvz(nq=4, nk=6)
    mask = pad_mask(nk=6, n_pad=4)  # last batch row: only 2 real keys < top_k
    out = sparse_topk_attention(q, k, v, 3, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q[-1:], k[-1:, :, :2], v[-1:, :, :2])
    assert torch.allclose(out[-1:], ref, atol=1e-12)


def test_topk_schedule():
    assert topk_schedule(1024, exponent=0.5) == 32
    assert topk_schedule(1024, alpha=2.0, exponent=0.5) == 64
    assert topk_schedule(10, top_k=50) == 10
    with pytest.raises(ValueError, match="not both"):
        topk_schedule(10, top_k=3, exponent=0.5)
    with pytest.raises(ValueError, match="exponent"):
        topk_schedule(10, exponent=1.5)


# ---------------------------------------------------------------- sketch


def test_taylor_features_kernel():
    x, y = rnd(5, 3, seed=1), rnd(5, 3, seed=2)
    for g in (0, 1, 2, 4):
        kern = (taylor_features(x, g) * taylor_features(y, g)).sum(-1)
        s = (x * y).sum(-1) / math.sqrt(3)
        assert torch.allclose(kern, sum(s ** j / math.factorial(j) for j in range(g + 1)), atol=1e-12)


def test_sketch_error_falls_with_degree_small_entries():
    q, k, v, _, _ = qkvz(b=1, h=1, nq=16, nk=16, d=3)
    q, k = q * 0.6, k * 0.6
    for causal in (False, True):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        errs = [(sketch_attention(q, k, v, g, causal=causal, chunk=5) - ref).abs().max().item() for g in (0, 2, 4, 6)]
        assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
        assert errs[-1] < 1e-3


def test_sketch_streaming_equals_batch_state_and_causal_full_sequence():
    q, k, v, _, _ = qkvz(b=1, h=2, nq=10, nk=10, d=3)
    st = StreamingSketchAttention(degree=2)
    outs = []
    for t in range(10):
        st.update(k[:, :, t], v[:, :, t])
        outs.append(st.query(q[:, :, t]))
    stream = torch.stack(outs, 2)
    assert torch.allclose(stream, sketch_attention(q, k, v, 2, causal=True, chunk=4), atol=1e-12)
    fk = taylor_features(k, 2)
    assert torch.allclose(st.M, fk.transpose(-2, -1) @ v, atol=1e-12)  # M = U2^T V
    assert torch.allclose(st.s, fk.sum(-2), atol=1e-12)  # s = U2^T 1
    # arrival order does not matter for the state
    st2 = StreamingSketchAttention(degree=2)
    for t in reversed(range(10)):
        st2.update(k[:, :, t], v[:, :, t])
    assert torch.allclose(st2.M, st.M, atol=1e-12)


def test_sketch_memory_flat_in_n_while_kv_cache_grows():
    d = 4
    mems = {}
    for n in (16, 256):
        st = StreamingSketchAttention(degree=2)
        kv = rnd(n, 2, d, seed=n, dtype=torch.float32)
        for t in range(n):
            st.update(kv[t, 0], kv[t, 1])
        mems[n] = st.memory_bytes()
    assert mems[16] == mems[256] == (1 + d + d * d) * (d + 1) * 4
    assert 256 * 2 * d * 4 > mems[256]  # a KV cache of 256 tokens already needs more


def test_sketch_padding_and_bad_degree():
    q, k, v, _, _ = qkvz(nq=5, nk=6)
    km = torch.ones(2, 6, dtype=torch.bool)
    km[1, 4:] = False
    out = sketch_attention(q, k, v, 2, key_mask=km)
    assert torch.allclose(out[1:], sketch_attention(q[1:], k[1:, :, :4], v[1:, :, :4], 2), atol=1e-12)
    with pytest.raises(ValueError, match="even"):
        sketch_attention(q, k, v, 3)
    with pytest.raises(ValueError, match="before any update"):
        StreamingSketchAttention().query(q[:, :, 0])


def test_ntk_learned_approximation_beats_no_prefix():
    """Spec 1(d)4: train Z, k (Adam) on a fixed small prefix with scaled weights; error falls far below Z = k = 0."""
    from experiments.ntk_prefix_error import run_m

    torch.manual_seed(0)
    r = run_m(m=8, d=8, L=8, steps=150, batch=16, lr=3e-2, n_val=128, seed=0)
    assert r["mse"] < 0.3 * r["mse_no_prefix"], r


def test_ntk_bfloat16_fused_path():
    q, k, v, z, zk = qkvz(nq=8, nk=8, dtype=torch.float32)
    args = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)] + [z.requires_grad_(), zk]
    out = ntk_attention(*args, causal=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    ref = ntk_attention_reference(*(t.detach().double() for t in args[:3]), z.double(), zk.double(), causal=True)
    assert (out.double() - ref).abs().max() < 5e-2
    assert args[0].grad.dtype == torch.bfloat16 and torch.isfinite(args[0].grad).all()


def test_sparse_threshold_keeps_at_most_one_over_eps():
    q, k, v, _, _ = qkvz(b=1, h=1, nq=4, nk=50)
    eps = 0.1
    s = (q @ k.transpose(-2, -1)) / 2.0
    p = torch.softmax(s, -1)
    keep = p >= eps
    assert (keep.sum(-1) <= 1 / eps).all()
    ref = torch.softmax(s.masked_fill(~(keep | (p == p.amax(-1, keepdim=True))), float("-inf")), -1) @ v
    assert torch.allclose(sparse_threshold_attention(q, k, v, eps), ref, atol=1e-12)


def test_sparse_nC_regime_vs_fixed_window():
    """Spec 2(d)3: for 2(1-C) < beta, the n^C rule's error falls with n while a fixed k's grows; for beta < 2(1-C)
    the n^C rule does not converge either (Gaussian logits, derived heuristic)."""
    from experiments.sparse_error import run

    small, big = (run(2 ** e, 1.5, 0.5, 16, 16, 64, 0) for e in (10, 15))
    assert big["err_nC"] < small["err_nC"] and big["err_fixed"] > small["err_fixed"]
    small, big = (run(2 ** e, 0.5, 0.5, 16, 16, 64, 0) for e in (10, 15))
    assert big["tau_nC"] > small["tau_nC"]


def test_ntk_prefix_dropout_is_a_registered_module_off_in_eval():
    from models.attention import NTKPrefix

    torch.manual_seed(0)
    mod = NTKPrefix(2, 4, init_std=1.0, dropout=0.5).double()
    q, k, v, _, _ = qkvz(h=2)
    mod.train()
    assert not torch.allclose(mod.attend(q, k, v), mod.attend(q, k, v))
    mod.eval()
    assert torch.allclose(mod.attend(q, k, v), ntk_attention(q, k, v, mod.z, mod.zk))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_double_backward_for_gradient_inversion(backend, causal):
    """Attacks differentiate a gradient: gradgradcheck through lse, NTK and explicit prefix attention."""
    q, k, v, z, zk = qkvz(b=1, h=1, nq=3, nk=3, d=2, zscale=2.0)
    args = tuple(t.requires_grad_() for t in (q, k, v, z, zk))
    assert torch.autograd.gradgradcheck(lambda *a: ntk_attention(*a, causal=causal, backend=backend), args,
                                        fast_mode=True)
    pk, pv = rnd(1, 2, 2, seed=9).requires_grad_(), rnd(1, 2, 2, seed=10).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda q, pk: prefix_attention(q, k, v, pk, pv, causal=causal,
                                                                       backend=backend), (q, pk), fast_mode=True)


@pytest.mark.parametrize("causal,masked", [(False, False), (True, False), (True, True)])
def test_prefix_attention_equals_sdpa_over_concatenated_keys(causal, masked):
    q, k, v, _, _ = qkvz(nq=5, nk=5)
    pk, pv = rnd(2, 3, 4, seed=1), rnd(2, 3, 4, seed=2)
    mask = pad_mask(nk=5) if masked else None
    kk = torch.cat([pk.expand(2, -1, -1, -1), k], 2)
    vv = torch.cat([pv.expand(2, -1, -1, -1), v], 2)
    keep = torch.ones(5, 8, dtype=torch.bool)
    if causal:
        keep[:, 3:] = torch.ones(5, 5, dtype=torch.bool).tril()
    keep = keep.expand(2, 1, 5, 8)
    if masked:
        keep = keep & torch.cat([torch.ones(2, 1, 1, 3, dtype=torch.bool), mask], -1)
    ref = F.scaled_dot_product_attention(q, kk, vv, attn_mask=keep)
    assert torch.allclose(prefix_attention(q, k, v, pk, pv, causal=causal, attn_mask=mask), ref, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient_when_some_rows_have_zero_output_gradient(backend):
    """Rows whose loss uses lse only (dO = 0, dlse != 0) take the fused kernel's padded-column path."""
    q, k, v, _, _ = qkvz(b=1, h=1, nq=4, nk=5, d=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    f = lambda q, k, v: (lambda o, l: (o[:, :, :2].sin(), l.sin()))(*attention_lse(q, k, v, backend=backend))
    assert torch.autograd.gradcheck(f, (q, k, v))
