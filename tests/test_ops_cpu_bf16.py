"""bfloat16 path of the fused CGA C++ CPU kernel, ``efficientvit_det.ops._cga_cpu`` called directly.

x (and grad_y) bfloat16, weights float32 (as the backbone folds BatchNorm under autocast) or
bfloat16. Oracles: :func:`cga_reference` in float32 on the bf16-rounded inputs, and the same
reference under ``torch.autocast('cpu', torch.bfloat16)``.

Tolerances (bf16 rounds to nearest even with unit roundoff u = 2**-8):

* float32-compute forward (ISAs avx512, avx2, base) and every backward: the kernel computes in
  float32 and rounds once on store, so each bf16 output element is within u * |oracle| of the
  oracle, plus 2e-5 * max |oracle| for float32 rounding near ties; float32 weight grads are
  float32 results (5e-5 of the max, as the float32 tests).
* bf16-dot forward (ISA avx512bf16: the qkv conv, q @ k^T, P @ V and the projection take
  bf16-rounded operands, float32 accumulation, as autocast rounds them): max error <= 1.5e-2 of
  the max (measured <= 8e-3 over these shapes; autocast's own is <= 1e-2), and <= 2e-2 from the
  autocast output (measured <= 1.3e-2).
* against autocast's backward (bf16 matmuls, up to ~0.3 of the max off the float32 oracle on
  these shapes): the kernel's gradients are at least as close to the float32 oracle.
"""
from __future__ import annotations

import os
import sys
from typing import List, Sequence, Tuple

import pytest
import torch
from helpers import cga_inputs

from efficientvit_det.ops.cga_reference import cga_reference
from efficientvit_det.testing import max_rel_err

try:
    from efficientvit_det.ops import _cga_cpu as ext  # type: ignore[attr-defined]
    EXT_WHY = ''
except (ImportError, OSError) as _exc:  # not built, or built against another torch
    ext = None
    EXT_WHY = f'C++ extension efficientvit_det.ops._cga_cpu not available: {_exc}'

pytestmark = pytest.mark.skipif(ext is None, reason=EXT_WHY or 'extension missing')

KD, WS = 16, 7
SCALE = KD ** -0.5
U = 2.0 ** -8  # bf16 unit roundoff (round to nearest even)
NAMES = ('x', 'qkv_w', 'qkv_b', 'dw_w', 'dw_b', 'attn_bias', 'proj_w', 'proj_b')
# (C, heads, q-dw kernels) of every stage of m0-m5
STAGE_CFGS = [(64, 4, (5, 5, 5, 5)), (128, 4, (7, 5, 3, 3)), (144, 3, (7, 5, 3)),
              (192, 3, (7, 5, 3)), (224, 2, (7, 5)), (240, 3, (5, 5, 5)), (256, 4, (7, 5, 3, 3)),
              (288, 3, (7, 5, 3)), (320, 4, (5, 5, 5, 5)), (384, 4, (7, 5, 3, 3))]


def _supported_isas() -> List[str]:
    if ext is None:
        return []
    out = [isa for isa in ('avx512bf16', 'avx512', 'avx2', 'base') if ext.set_isa(isa) == isa]
    ext.set_isa('')
    return out


ISAS = _supported_isas()
BEST = ISAS[0] if ISAS else ''


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    if ext is not None:
        ext.set_isa('')


def make_inputs(B, C, H, W, heads, kernels, seed=0, kd=KD, ws=WS, vd=None
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """bf16 x and float32 BN-folded-like weights (small kernels zero-embedded in K x K)."""
    x, *weights = cga_inputs(B, C, H, W, heads, kernels, kd, ws, torch.float32, seed, vd)
    return x.bfloat16(), weights


def ref_grads(x, weights, gy, autocast=False, kd=KD, ws=WS):
    """Reference output and grads of (x, *weights); float32 math unless ``autocast``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *weights)]
    if autocast:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = cga_reference(*leaves, kd, ws, kd ** -0.5)
    else:
        y = cga_reference(*leaves, kd, ws, kd ** -0.5)
    y.backward(gy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def oracle(x, weights, gy, kd=KD, ws=WS):
    """float32 reference on the bf16 values (x, grad_y and any bf16 weight widened exactly)."""
    return ref_grads(x.float(), [w.float() for w in weights], gy.float(), kd=kd, ws=ws)


def assert_rounded(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """``actual`` (bf16) is ``expected`` rounded once to bf16, up to float32 noise near ties."""
    assert actual.dtype == torch.bfloat16, (what, actual.dtype)
    a, e = actual.float(), expected.float()
    bound = U * e.abs() + 2e-5 * e.abs().max()
    over = ((a - e).abs() - bound).max().item()
    assert over <= 0, f'{what}: off by {over:.3g} beyond one bf16 rounding'


def check_forward(y, y_oracle, y_autocast, isa: str, what: str) -> None:
    assert y.dtype == torch.bfloat16 and y.shape == y_oracle.shape, what
    if isa == 'avx512bf16':
        assert max_rel_err(y.float(), y_oracle) < 1.5e-2, (what, max_rel_err(y.float(), y_oracle))
        assert max_rel_err(y.float(), y_autocast.float()) < 2e-2, what
    else:
        assert_rounded(y, y_oracle, what)


def check_backward(grads, weights, g_oracle, what: str) -> None:
    assert grads[0].dtype == torch.bfloat16, what
    assert_rounded(grads[0], g_oracle[0], f'{what} grad x')
    for name, g, w, go in zip(NAMES[1:], grads[1:], weights, g_oracle[1:]):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, name, g.dtype, w.dtype)
        if w.dtype == torch.bfloat16:
            assert_rounded(g, go, f'{what} grad {name}')
        else:
            err = max_rel_err(g, go)
            assert err < 5e-5, (what, name, err)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('C,heads,kernels', STAGE_CFGS)
def test_all_stage_shapes_against_fp32_and_autocast_reference(C, heads, kernels):
    """Odd maps with partial windows and batch 2 (9x11), a map smaller than a window (3x5)."""
    for i, (B, H, W) in enumerate([(2, 9, 11), (1, 3, 5)]):
        x, w = make_inputs(B, C, H, W, heads, kernels, seed=i)
        gy = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(10 + i)).bfloat16()
        y_o, g_o = oracle(x, w, gy)
        y_a, g_a = ref_grads(x, w, gy, autocast=True)
        tag = f'C={C} {B}x{H}x{W}'
        for isa in dict.fromkeys([BEST, 'avx512' if 'avx512' in ISAS else BEST]):
            ext.set_isa(isa)
            check_forward(ext.forward(x, *w, KD, WS, SCALE), y_o, y_a, isa, f'{tag} {isa}')
        ext.set_isa('')
        grads = ext.backward(gy, x, *w, KD, WS, SCALE)
        check_backward(grads, w, g_o, tag)
        for name, g, go, ga in zip(NAMES, grads, g_o, g_a):  # at least as close as autocast
            assert max_rel_err(g.float(), go) <= max_rel_err(ga.float(), go) + 1e-3, (tag, name)


@pytest.mark.parametrize('isa', ISAS or ['none'])
@pytest.mark.parametrize('B,H,W,C,heads,kernels', [
    (1, 1, 1, 128, 4, (7, 5, 3, 3)),   # 1x1 map
    (1, 15, 8, 144, 3, (7, 5, 3)),     # a right-partial column of windows, bottom partial row
    (2, 7, 7, 128, 4, (7, 5, 3, 3)),   # exactly one window, batch 2
    (1, 14, 16, 144, 3, (7, 5, 3)),    # full rows, right-partial column
])
def test_every_isa_map_sizes(isa, B, H, W, C, heads, kernels):
    assert ext.set_isa(isa) == isa
    x, w = make_inputs(B, C, H, W, heads, kernels, seed=H * 31 + W)
    gy = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(3)).bfloat16()
    y_o, g_o = oracle(x, w, gy)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y_a = cga_reference(x, *w, KD, WS, SCALE)
    tag = f'{isa} C={C} {B}x{H}x{W}'
    check_forward(ext.forward(x, *w, KD, WS, SCALE), y_o, y_a, isa, tag)
    check_backward(ext.backward(gy, x, *w, KD, WS, SCALE), w, g_o, tag)


@pytest.mark.parametrize('isa', ISAS or ['none'])
@pytest.mark.parametrize('B,C,H,W,heads,kernels,kd,ws,vd', [
    (2, 8, 5, 9, 2, (3, 1), 4, 3, None),       # tiny dims: 9-token windows, cin 4, key_dim 4
    (1, 15, 9, 8, 3, (5, 3, 3), 5, 7, None),   # odd key_dim and cin (pairs with a zero half)
    (1, 20, 6, 6, 1, (5,), 8, 4, 12),          # one head: val_dim 12 != cin 20
])
def test_every_isa_odd_dims_windows_and_one_head(isa, B, C, H, W, heads, kernels, kd, ws, vd):
    assert ext.set_isa(isa) == isa
    x, w = make_inputs(B, C, H, W, heads, kernels, seed=C, kd=kd, ws=ws, vd=vd)
    gy = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(4)).bfloat16()
    y_o, g_o = oracle(x, w, gy, kd=kd, ws=ws)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y_a = cga_reference(x, *w, kd, ws, kd ** -0.5)
    tag = f'{isa} C={C} kd={kd} ws={ws}'
    check_forward(ext.forward(x, *w, kd, ws, kd ** -0.5), y_o, y_a, isa, tag)
    check_backward(ext.backward(gy, x, *w, kd, ws, kd ** -0.5), w, g_o, tag)


def test_bf16_and_mixed_weights_grads_in_each_weights_dtype():
    x, w = make_inputs(2, 96, 10, 9, 3, (7, 5, 3), seed=4)
    gy = torch.randn(2, 96, 10, 9, generator=torch.Generator().manual_seed(5)).bfloat16()
    for mix in ([True] * 7, [i % 2 == 0 for i in range(7)]):
        wm = [t.bfloat16() if to_bf16 else t for t, to_bf16 in zip(w, mix)]
        y_o, g_o = oracle(x, wm, gy)
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            y_a = cga_reference(x, *wm, KD, WS, SCALE)
        check_forward(ext.forward(x, *wm, KD, WS, SCALE), y_o, y_a, BEST, f'mix {mix}')
        check_backward(ext.backward(gy, x, *wm, KD, WS, SCALE), wm, g_o, f'mix {mix}')


def test_non_contiguous_x_and_fp32_grad_y():
    x, w = make_inputs(1, 64, 11, 12, 4, (5, 5, 5, 5), seed=6)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
    assert not xt.is_contiguous()
    gy = torch.randn(1, 64, 11, 12, generator=torch.Generator().manual_seed(7))
    y = ext.forward(x, *w, KD, WS, SCALE)
    torch.testing.assert_close(ext.forward(xt, *w, KD, WS, SCALE), y, rtol=0, atol=0)
    g32 = ext.backward(gy, xt, *w, KD, WS, SCALE)  # float32 grad_y is rounded to x's dtype
    gbf = ext.backward(gy.bfloat16(), x, *w, KD, WS, SCALE)
    for a, b in zip(g32, gbf):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_batch_items_and_thread_count_do_not_change_results():
    x, w = make_inputs(3, 64, 16, 13, 4, (5, 5, 5, 5), seed=8)
    y = ext.forward(x, *w, KD, WS, SCALE)
    y1 = ext.forward(x[1:2].contiguous(), *w, KD, WS, SCALE)
    torch.testing.assert_close(y[1:2], y1, rtol=0, atol=0)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y_1t = ext.forward(x, *w, KD, WS, SCALE)
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(y, y_1t, rtol=0, atol=0)


def test_nan_in_x_stays_in_its_window():
    x, w = make_inputs(1, 64, 14, 7, 4, (5, 5, 5, 5), seed=9)
    x[0, 3, 2, 4] = float('nan')  # window (0, 0) only
    y = ext.forward(x, *w, KD, WS, SCALE)
    assert torch.isnan(y[:, :, :7]).all()
    assert torch.isfinite(y[:, :, 7:]).all()


def test_bad_dtypes_are_rejected_with_the_reason():
    x, w = make_inputs(1, 64, 7, 7, 4, (5, 5, 5, 5))
    with pytest.raises(RuntimeError, match='bfloat16 or float32.*qkv_weight'):
        ext.forward(x, w[0].double(), *w[1:], KD, WS, SCALE)
    with pytest.raises(RuntimeError, match="x's dtype.*proj_weight"):
        ext.forward(x.float(), *w[:5], w[5].bfloat16(), w[6], KD, WS, SCALE)
    with pytest.raises(RuntimeError, match='float32, float64 or bfloat16'):
        ext.forward(x.half(), *w, KD, WS, SCALE)


def _cpuinfo_flags() -> Sequence[str]:
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('flags'):
                return line.split(':', 1)[1].split()
    return ()


@pytest.mark.skipif(not (sys.platform.startswith('linux') and os.path.exists('/proc/cpuinfo')),
                    reason='compares with the flags of /proc/cpuinfo (Linux only)')
def test_cpu_bf16_native_and_isa_agree_with_cpuinfo():
    flags = set(_cpuinfo_flags())
    assert ext.cpu_bf16_native() == bool({'avx512_bf16', 'amx_bf16'} & flags)
    avx512 = {'avx512f', 'avx512bw', 'avx512dq', 'avx512vl'} <= flags
    ext.set_isa('')
    assert (ext.isa() == 'avx512bf16') == (avx512 and 'avx512_bf16' in flags)
