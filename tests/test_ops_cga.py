"""Fused cascaded group attention op: the C++ backend against the reference, the reference
against an independent per-window oracle and against timm's module, the op's dispatch.

C++ tests are skipped, saying why, when the extension is not built. The Triton backend has its
own file (tests/test_ops_triton.py).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import cga_inputs

from efficientvit_det.ops import available_backends, cascaded_group_attention, dispatch, guard
from efficientvit_det.ops import cga as cga_mod
from efficientvit_det.ops.cga_reference import cga_reference
from efficientvit_det.testing import saved_tensor_bytes

CPU_OK, CPU_WHY = cga_mod.cpu_extension_status()
needs_cpu = pytest.mark.skipif(not CPU_OK, reason=f'C++ extension not built: {CPU_WHY}')


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def make_inputs(B, C, H, W, heads, kernels, key_dim=16, ws=7, dtype=torch.float32, seed=0):
    return cga_inputs(B, C, H, W, heads, kernels, key_dim, ws, dtype, seed)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def grads_of(fn, inputs, gy):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(leaves)
    y.backward(gy)
    return y.detach(), [t.grad for t in leaves]


# (C, heads, kernels) of every stage of m0..m5 (docs/facts.md), deduplicated
STAGES = {
    'm0': [(64, 4, (5, 5, 5, 5)), (128, 4, (5, 5, 5, 5)), (192, 4, (5, 5, 5, 5))],
    'm1': [(128, 2, (7, 5)), (144, 3, (7, 5, 3)), (192, 3, (7, 5, 3))],
    'm2': [(128, 4, (7, 5, 3, 3)), (192, 3, (7, 5, 3)), (224, 2, (7, 5))],
    'm3': [(128, 4, (5, 5, 5, 5)), (240, 3, (5, 5, 5)), (320, 4, (5, 5, 5, 5))],
    'm4': [(128, 4, (7, 5, 3, 3)), (256, 4, (7, 5, 3, 3)), (384, 4, (7, 5, 3, 3))],
    'm5': [(192, 3, (7, 5, 3)), (288, 3, (7, 5, 3)), (384, 4, (7, 5, 3, 3))],
}
STAGE_CFGS = sorted({c for cs in STAGES.values() for c in cs})
# spatial sizes: odd, not multiples of 7, exactly 7, smaller than a window (1x1, 3x5)
SIZES = [(1, 9, 11), (2, 7, 7), (2, 3, 5), (1, 1, 1), (1, 15, 8)]


# ------------------------------------------------------------------------------------------
# independent oracle: a per-window, per-token loop written from the semantics
# ------------------------------------------------------------------------------------------
def naive_cga(x, qkv_w, qkv_b, dw_w, dw_b, ab, pw, pb, key_dim, ws, scale=None):
    scale = key_dim ** -0.5 if scale is None else scale
    B, C, H, W = x.shape
    heads, D, cin = qkv_w.shape
    vd = D - 2 * key_dim
    K = dw_w.shape[-1]
    R = K // 2
    y = torch.zeros_like(x)
    for b in range(B):
        for wy in range(math.ceil(H / ws)):
            for wx in range(math.ceil(W / ws)):
                X = torch.zeros(ws, ws, C, dtype=x.dtype)  # zero padding
                for i in range(ws):
                    for j in range(ws):
                        if wy * ws + i < H and wx * ws + j < W:
                            X[i, j] = x[b, :, wy * ws + i, wx * ws + j]
                outs, prev = [], None
                for h in range(heads):
                    inp = X[:, :, h * cin:(h + 1) * cin]
                    if prev is not None:
                        inp = inp + prev  # cascade
                    qkv = inp @ qkv_w[h].T + qkv_b[h]  # padded tokens -> bias, not masked
                    q, k, v = qkv[..., :key_dim], qkv[..., key_dim:2 * key_dim], qkv[..., 2 * key_dim:]
                    qd = torch.zeros_like(q) + dw_b[h]
                    for i in range(ws):
                        for j in range(ws):
                            for ky in range(K):
                                for kx in range(K):
                                    ii, jj = i + ky - R, j + kx - R
                                    if 0 <= ii < ws and 0 <= jj < ws:  # zero outside the window
                                        qd[i, j] = qd[i, j] + dw_w[h, :, ky, kx] * q[ii, jj]
                    out = torch.zeros(ws, ws, vd, dtype=x.dtype)
                    keys = [(ii, jj) for ii in range(ws) for jj in range(ws)]
                    kk = torch.stack([k[p] for p in keys])
                    vv = torch.stack([v[p] for p in keys])
                    for i in range(ws):
                        for j in range(ws):
                            bias = torch.stack([ab[h, abs(i - ii) * ws + abs(j - jj)] for ii, jj in keys])
                            a = torch.softmax(kk @ qd[i, j] * scale + bias, dim=0)
                            out[i, j] = a @ vv
                    outs.append(out)
                    prev = out
                Yw = torch.relu(torch.cat(outs, -1)) @ pw.T + pb
                for i in range(ws):
                    for j in range(ws):
                        if wy * ws + i < H and wx * ws + j < W:
                            y[b, :, wy * ws + i, wx * ws + j] = Yw[i, j]
    return y


@pytest.mark.parametrize('B,C,H,W,heads,kernels,kd,ws', [
    (2, 8, 5, 9, 2, (3, 1), 4, 3),
    (1, 12, 9, 8, 3, (5, 3, 3), 4, 7),
    (1, 8, 1, 1, 2, (3, 3), 4, 7),
    (1, 8, 3, 5, 2, (5, 3), 4, 7),
])
def test_reference_matches_naive_loop(B, C, H, W, heads, kernels, kd, ws):
    ins = make_inputs(B, C, H, W, heads, kernels, kd, ws, torch.float64, seed=1)
    torch.testing.assert_close(cga_reference(*ins, kd, ws), naive_cga(*ins, kd, ws),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('H,W', [(7, 7), (9, 12), (3, 5), (1, 1), (14, 15)])
def test_reference_matches_timm_windowed(H, W):
    """timm's LocalWindowAttention (pads and windows like the original) on folded weights."""
    from efficientvit_det.testing import fold_timm_attention, timm_window_attention
    torch.manual_seed(0)
    mod = timm_window_attention(64, num_heads=4, kernels=(7, 5, 3, 3), key_dim=16, window_size=7,
                                seed=3)
    mod = mod.double().eval()
    x = torch.randn(2, 64, H, W, dtype=torch.float64)
    p = fold_timm_attention(mod)
    with torch.no_grad():
        torch.testing.assert_close(cga_reference(x, **p, key_dim=16, window_size=7), mod(x),
                                   rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------
# C++ backend
# ------------------------------------------------------------------------------------------
def _isas():
    if not CPU_OK:
        return ['best']
    from efficientvit_det.ops import _cga_cpu
    out = []
    for isa in ('avx512', 'avx2', 'base'):
        got = _cga_cpu.set_isa(isa)
        if got == isa:
            out.append(isa)
    _cga_cpu.set_isa('')
    return out


ISAS = _isas()


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """Runs the C++ tests once per instruction set this CPU supports, then restores the best."""
    if not CPU_OK:
        pytest.skip(f'C++ extension not built: {CPU_WHY}')
    from efficientvit_det.ops import _cga_cpu
    _cga_cpu.set_isa('' if request.param == 'best' else request.param)
    yield _cga_cpu.isa()
    _cga_cpu.set_isa('')


@needs_cpu
@pytest.mark.parametrize('C,heads,kernels', STAGE_CFGS)
def test_cpu_forward_backward_all_stage_shapes(C, heads, kernels):
    """m0-m5 stage configs, small maps (odd, 7x7, smaller than a window, batch 2)."""
    for i, (B, H, W) in enumerate(SIZES):
        ins = make_inputs(B, C, H, W, heads, kernels, seed=i)
        gy = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(i))
        yr, gr = grads_of(lambda t: cga_reference(*t, 16, 7), ins, gy)
        yc, gc = grads_of(lambda t: cascaded_group_attention(*t, key_dim=16, backend='cpu'), ins, gy)
        assert rel_err(yc, yr) < 2e-5, (B, H, W)
        for name, a, b in zip(('x', 'qkv_w', 'qkv_b', 'dw_w', 'dw_b', 'attn_bias', 'proj_w',
                               'proj_b'), gc, gr):
            assert rel_err(a, b) < 5e-5, (name, B, H, W, rel_err(a, b))


@pytest.mark.parametrize('cfg', [
    (2, 128, 10, 17, 4, (7, 5, 3, 3), 16, 7),   # m4 stage 1, bottom and right partial windows
    (1, 48, 3, 5, 3, (3, 3, 1), 16, 7),          # smaller than a window
    (2, 8, 5, 9, 2, (3, 1), 4, 3),               # odd key_dim / window, not vector multiples
    (1, 20, 6, 6, 1, (5,), 8, 4),                # one head: val_dim != C // heads allowed
])
def test_cpu_every_isa_fp32_and_fp64(cpu_isa, cfg):
    B, C, H, W, heads, kernels, kd, ws = cfg
    ext = dispatch.cpu_extension()[0]
    for dtype, tol in ((torch.float32, 3e-5), (torch.float64, 1e-12)):
        ins = make_inputs(B, C, H, W, heads, kernels, kd, ws, dtype, seed=7)
        if heads == 1:  # val_dim 12 != cin 20
            g = torch.Generator().manual_seed(1)
            ins[1] = torch.randn(1, 2 * kd + 12, C, generator=g, dtype=dtype) * 0.2
            ins[2] = torch.randn(1, 2 * kd + 12, generator=g, dtype=dtype)
            ins[6] = torch.randn(C, 12, generator=g, dtype=dtype) * 0.3
        gy = torch.randn(B, C, H, W, dtype=dtype)
        yr, gr = grads_of(lambda t: cga_reference(*t, kd, ws), ins, gy)
        y = ext.forward(*ins, kd, ws, kd ** -0.5)
        g = ext.backward(gy, *ins, kd, ws, kd ** -0.5)
        assert rel_err(y, yr) < tol, (cpu_isa, dtype)
        for i, (a, b) in enumerate(zip(g, gr)):
            assert rel_err(a, b) < tol, (cpu_isa, dtype, i, rel_err(a, b))


@needs_cpu
@pytest.mark.parametrize('cfg', [
    (2, 8, 4, 5, 2, (3, 1), 2, 3),
    (1, 6, 2, 3, 3, (3, 3, 1), 2, 7),
])
def test_cpu_gradcheck_float64(cfg):
    B, C, H, W, heads, kernels, kd, ws = cfg
    ins = [t.requires_grad_(True) for t in make_inputs(B, C, H, W, heads, kernels, kd, ws,
                                                       torch.float64, seed=3)]
    fn = lambda *t: cascaded_group_attention(*t, key_dim=kd, window_size=ws, backend='cpu')  # noqa: E731
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_cpu
def test_cpu_batch_and_threads_consistent():
    """Batch items are independent; results do not depend on the thread count."""
    ins = make_inputs(3, 64, 16, 13, 4, (5, 5, 5, 5), seed=5)
    y = cascaded_group_attention(*ins, key_dim=16, backend='cpu')
    y1 = cascaded_group_attention(ins[0][1:2].contiguous(), *ins[1:], key_dim=16, backend='cpu')
    torch.testing.assert_close(y[1:2], y1, rtol=0, atol=0)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y_1t = cascaded_group_attention(*ins, key_dim=16, backend='cpu')
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(y, y_1t, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# public op: dispatch, autograd plumbing, memory
# ------------------------------------------------------------------------------------------
def test_auto_backend_and_listing():
    x = torch.randn(1, 8, 3, 3)
    assert 'reference' in available_backends('cpu')
    expect = 'cpu' if CPU_OK else 'reference'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert cga_mod.resolve_backend('auto', x) == expect
        assert cga_mod.resolve_backend('auto', x.double()) == expect
        assert cga_mod.resolve_backend('auto', x.bfloat16()) == expect
        assert cga_mod.resolve_backend('auto', x.half()) == 'reference'
    with pytest.raises(ValueError):
        cga_mod.resolve_backend('nope', x)


def test_auto_falls_back_to_reference_and_warns_once(monkeypatch):
    monkeypatch.setattr(dispatch, 'cpu_extension',
                        lambda: (None, 'ImportError: pretend it is missing'))
    guard.reset()
    ins = make_inputs(1, 8, 3, 4, 2, (3, 3), key_dim=4)
    with pytest.warns(RuntimeWarning, match='pretend it is missing'):
        y = cascaded_group_attention(*ins, key_dim=4)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a second warning would raise here
        y2 = cascaded_group_attention(*ins, key_dim=4)
    torch.testing.assert_close(y, cga_reference(*ins, 4, 7))
    torch.testing.assert_close(y2, y)
    with pytest.raises(RuntimeError, match='pretend it is missing'):
        cascaded_group_attention(*ins, key_dim=4, backend='cpu')
    with pytest.raises(RuntimeError, match='pretend it is missing'):
        cascaded_group_attention(*ins, key_dim=4, backend='fused')


def test_bad_shapes_rejected():
    ins = make_inputs(1, 8, 3, 4, 2, (3, 3), key_dim=4)
    with pytest.raises(ValueError):
        cascaded_group_attention(ins[0][:, :6], *ins[1:], key_dim=4)
    with pytest.raises(ValueError):
        cascaded_group_attention(*ins, key_dim=4, window_size=5)  # bias table is 7x7


@needs_cpu
def test_gradients_flow_through_differentiable_folding():
    """Weights computed from leaf parameters (as the backbone folds BN) get their gradients."""
    ins = make_inputs(2, 32, 9, 10, 2, (5, 3), seed=11)
    scale_p = (torch.rand(2, 48, 1) + 0.5).requires_grad_(True)
    x = ins[0].requires_grad_(True)

    def run(backend):
        w = ins[1] * scale_p  # a differentiable "fold"
        return cascaded_group_attention(x, w, *ins[2:], key_dim=16, backend=backend)

    gr = torch.autograd.grad(run('reference').square().sum(), [x, scale_p])
    gc = torch.autograd.grad(run('cpu').square().sum(), [x, scale_p])
    for a, b in zip(gc, gr):
        assert rel_err(a, b) < 5e-5
    # x without grad: only weight grads requested
    y = cascaded_group_attention(ins[0].detach(), ins[1].detach().requires_grad_(), *ins[2:],
                                 key_dim=16, backend='cpu')
    y.sum().backward()


def _saved_bytes(fn, inputs):
    """Bytes the autograd graph saves for backward, excluding the inputs themselves."""
    return saved_tensor_bytes(lambda: fn(inputs), inputs)


@needs_cpu
def test_fused_saves_nothing_but_inputs():
    ins = [t.requires_grad_(True) for t in make_inputs(2, 128, 20, 30, 4, (7, 5, 3, 3))]
    ref = _saved_bytes(lambda t: cga_reference(*t, 16, 7), ins)
    fused = _saved_bytes(lambda t: cascaded_group_attention(*t, key_dim=16, backend='cpu'), ins)
    assert fused == 0
    assert ref > 4 * ins[0].numel() * 4  # the reference keeps qkv, attention maps, ...
