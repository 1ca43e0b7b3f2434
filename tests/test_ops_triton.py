"""Triton kernels of the fused attention op (``efficientvit_det.ops.cga_triton``).

On the CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before triton is imported) against the PyTorch reference, on tiny shapes: float32
(the kernels take no float64) and float16; bfloat16 is skipped while the interpreter computes
bfloat16 dots wrongly. Compilation for real GPUs is checked offline by
``tools/triton_compile_check.py`` (a subset runs here); the CUDA test runs the compiled kernels
when a GPU is present.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from efficientvit_det.ops import cascaded_group_attention
from efficientvit_det.ops.cga_reference import cga_reference
from efficientvit_det.testing import max_rel_err

ROOT = Path(__file__).resolve().parents[1]


def _kernels():
    """cga_triton with interpreted kernels (re-decorated if imported before the env was set)."""
    if os.environ.get('TRITON_INTERPRET') != '1':
        pytest.skip('TRITON_INTERPRET is not 1 in this environment (conftest.py sets it)')
    from triton.runtime.interpreter import InterpretedFunction

    from efficientvit_det.ops import cga_triton
    if not isinstance(cga_triton._cga_fwd_kernel, InterpretedFunction):
        cga_triton = importlib.reload(cga_triton)
    return cga_triton


def _inputs(B, C, H, W, heads, kernels, key_dim=16, ws=7, val_dim=None, seed=0):
    """Random BN-folded weights in the op's layout (float64; small kernels zero-embedded)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    cin = C // heads
    vd = cin if val_dim is None else val_dim
    K = max(kernels)
    dw_w = torch.zeros(heads, key_dim, K, K, dtype=torch.float64)
    for h, k in enumerate(kernels):
        o = (K - k) // 2
        dw_w[h, :, o:o + k, o:o + k] = r(key_dim, k, k) / k
    return [r(B, C, H, W), r(heads, 2 * key_dim + vd, cin) * cin ** -0.5,
            r(heads, 2 * key_dim + vd) * 0.5, dw_w, r(heads, key_dim) * 0.1, r(heads, ws * ws),
            r(C, heads * vd) * (heads * vd) ** -0.5, r(C) * 0.1]


def _reference(ins, gy, key_dim, ws):
    """Output and input gradients of the reference (float64 autograd)."""
    leaves = [t.detach().double().requires_grad_(True) for t in ins]
    y = cga_reference(*leaves, key_dim, ws)
    y.backward(gy.double())
    return y.detach(), [t.grad for t in leaves]


# (B, C, H, W, heads, kernels, key_dim, ws, val_dim)
CFGS = [
    pytest.param(2, 32, 9, 10, 2, (5, 3), 16, 7, None, id='batch2-partial-windows'),
    pytest.param(1, 48, 3, 5, 3, (3, 3, 1), 16, 7, None, id='map-smaller-than-window'),
    pytest.param(1, 32, 1, 1, 2, (7, 5), 16, 7, None, id='1x1-map'),
    pytest.param(1, 96, 5, 6, 2, (7, 5), 16, 7, None, id='cin48-not-pow2'),
    pytest.param(2, 24, 5, 9, 2, (3, 1), 4, 3, None, id='cin12-kd4-ws3-odd'),
    pytest.param(1, 20, 6, 6, 1, (5,), 8, 4, 12, id='one-head-vd12-cin20'),
]


@pytest.mark.parametrize('B,C,H,W,heads,kernels,kd,ws,vd', CFGS)
def test_forward_backward_match_reference_fp32(B, C, H, W, heads, kernels, kd, ws, vd):
    ct = _kernels()
    ins = [t.float() for t in _inputs(B, C, H, W, heads, kernels, kd, ws, vd, seed=2)]
    gy = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0))
    yr, gr = _reference(ins, gy, kd, ws)
    y = ct.forward(*ins, kd, ws, kd ** -0.5)
    grads = ct.backward(gy, *ins, kd, ws, kd ** -0.5)
    assert y.dtype == torch.float32 and y.shape == (B, C, H, W)
    assert max_rel_err(y, yr) < 2e-5
    names = ('x', 'qkv_w', 'qkv_b', 'dw_w', 'dw_b', 'attn_bias', 'proj_w', 'proj_b')
    for name, a, b, t in zip(names, grads, gr, ins):
        assert a.dtype == t.dtype, name
        assert max_rel_err(a, b) < 2e-5, (name, max_rel_err(a, b))


def test_public_op_autograd_through_triton():
    """The registered op with ``backend='triton'``: autograd reaches every input. m4 stage 1
    (C // heads = 32: the weights need no padding)."""
    _kernels()
    ins = [t.float() for t in _inputs(1, 128, 8, 9, 4, (7, 5, 3, 3), seed=4)]
    gy = torch.randn(1, 128, 8, 9, generator=torch.Generator().manual_seed(1))
    yr, gr = _reference(ins, gy, 16, 7)
    leaves = [t.clone().requires_grad_(True) for t in ins]
    y = cascaded_group_attention(*leaves, key_dim=16, backend='triton')
    y.backward(gy)
    assert max_rel_err(y, yr) < 2e-5
    assert max_rel_err([t.grad for t in leaves], gr) < 2e-5


def _interpreter_dot_error(dtype) -> float:
    """Error of a bare 16x16 ``tl.dot`` in ``dtype`` under the interpreter."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(a_ptr, b_ptr, c_ptr):
        o = tl.arange(0, 16)
        a = tl.load(a_ptr + o[:, None] * 16 + o[None, :])
        b = tl.load(b_ptr + o[:, None] * 16 + o[None, :])
        tl.store(c_ptr + o[:, None] * 16 + o[None, :], tl.dot(a, b))

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).to(dtype) for _ in range(2))
    c = torch.empty(16, 16)
    probe[(1,)](a, b, c)
    return (c - a.float() @ b.float()).abs().max().item()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_with_float32_weights(dtype):
    """Autocast layout: x in half precision, BN-folded weights in float32. Against float64,
    every output and gradient is about as accurate as the reference run in ``dtype``."""
    ct = _kernels()
    err = _interpreter_dot_error(dtype)
    if err > 1e-2:
        pytest.skip(f'the Triton interpreter computes a plain {dtype} tl.dot wrongly (16x16 '
                    f'probe off by {err:.3g}), so {dtype} can only be tested on a GPU')
    ins = [t.float() for t in _inputs(2, 32, 9, 10, 2, (5, 3), seed=6)]
    gy = torch.randn(2, 32, 9, 10, generator=torch.Generator().manual_seed(2))
    yr, gr = _reference(ins, gy, 16, 7)
    half = [t.to(dtype).requires_grad_(True) for t in ins]
    y_half = cga_reference(*half, 16, 7)
    y_half.backward(gy.to(dtype))
    x = ins[0].to(dtype)
    y = ct.forward(x, *ins[1:], 16, 7, 0.25)
    grads = ct.backward(gy.to(dtype), x, *ins[1:], 16, 7, 0.25)
    assert y.dtype == dtype
    assert grads[0].dtype == dtype and all(g.dtype == torch.float32 for g in grads[1:])
    for got, ref_half, exact in zip([y, *grads], [y_half, *(t.grad for t in half)], [yr, *gr]):
        assert max_rel_err(got, exact) <= 2 * max_rel_err(ref_half, exact) + 2e-3


def test_weight_gradients_bitwise_deterministic():
    """Per-window partial sums reduced by torch and cuBLAS GEMMs: no atomics anywhere."""
    ct = _kernels()
    assert 'tl.atomic' not in inspect.getsource(ct)
    ins = [t.float() for t in _inputs(2, 32, 5, 9, 2, (5, 3), seed=8)]
    gy = torch.randn(2, 32, 5, 9, generator=torch.Generator().manual_seed(3))
    first = ct.backward(gy, *ins, 16, 7, 0.25)
    second = ct.backward(gy, *ins, 16, 7, 0.25)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_one_compiled_kernel_per_dtype_for_every_stage():
    """Sizes are runtime arguments: every m0-m5 stage shares the kernels of its dtype."""
    ct = _kernels()
    from efficientvit_det.archs import ARCH_SETTINGS
    problems = ct.stage_problems(ARCH_SETTINGS)
    assert len(problems) == 13 and (384, 4, 7) in problems and (64, 4, 5) in problems
    specs = ct.unique_specs(problems, list(ct.SUPPORTED_DTYPES))
    assert len(specs) == 8  # (fp16, bf16, fp32/tf32, fp32/ieee) x (forward, backward)
    for spec, probs in specs:
        assert sorted(probs) == problems
        ints = [n for n, ty in spec.signature.items() if ty == 'i32']
        runtime = ct._FWD_RUNTIME_INTS if spec.name == 'forward' else ct._BWD_RUNTIME_INTS
        assert ints == list(runtime)  # all of them excluded from specialisation
        for value in spec.constexprs.values():
            assert isinstance(value, str) or value & (value - 1) == 0  # powers of two
        assert min(spec.constexprs['BN'], spec.constexprs['BKD'], spec.constexprs['BC']) >= 16


def test_launch_arguments_are_checked_against_the_compiled_signature():
    ct = _kernels()
    spec = ct.kernel_specs(128, 4, 7, torch.float16)['forward']
    args = {n: (torch.empty(1, dtype=torch.float16) if ty == '*fp16' else
                torch.empty(1) if ty == '*fp32' else 1 if ty == 'i32' else 0.5)
            for n, ty in spec.signature.items()}
    spec.check_args(args)
    with pytest.raises(TypeError, match='x_ptr is \\*fp32, the kernel takes \\*fp16'):
        spec.check_args({**args, 'x_ptr': torch.empty(1)})
    with pytest.raises(ValueError, match='int32'):
        spec.check_args({**args, 'n_win': 2 ** 31})
    with pytest.raises(TypeError, match='missing'):
        spec.check_args({k: v for k, v in args.items() if k != 'ws'})


def test_unsupported_dtype_is_named():
    ct = _kernels()
    ins = _inputs(1, 8, 3, 3, 2, (3, 3), key_dim=4)
    with pytest.raises(TypeError, match='float64'):
        ct.forward(*ins, 4, 7, 0.5)


@pytest.mark.parametrize('matmul,generic,expected', [
    ('tf32', 'none', 'tf32'), ('ieee', 'tf32', 'ieee'), ('none', 'tf32', 'tf32'),
    ('none', 'none', 'ieee'), ('none', 'ieee', 'ieee'),
])
def test_fp32_dot_precision_follows_torch(matmul, generic, expected):
    ct = _kernels()
    assert ct.fp32_dot_precision(matmul, generic) == expected


def test_fp32_dot_precision_reads_torch_settings():
    assert _kernels().fp32_dot_precision() in ('ieee', 'tf32')


def test_compile_spec_refuses_interpreted_kernels():
    ct = _kernels()
    with pytest.raises(RuntimeError, match='interpreter'):
        ct.compile_spec(ct.kernel_specs(64, 4, 5, torch.float16)['forward'], 90)


def _without_interpreter() -> dict:
    env = dict(os.environ)
    env.pop('TRITON_INTERPRET', None)
    return env


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """CI subset of tools/triton_compile_check.py: forward and backward, fp16 and fp32 (ieee,
    the heaviest), from a cold cache; fails if a kernel stops compiling or spills."""
    pytest.importorskip('triton.backends.nvidia')
    out = tmp_path / 'compile.json'
    cmd = [sys.executable, str(ROOT / 'tools' / 'triton_compile_check.py'), '--arch', '90',
           '--dtype', 'fp16', 'fp32', '--precision', 'ieee', '--problem', '128,4,7',
           '--json', str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=_without_interpreter(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(out.read_text())['rows']
    assert sorted((r['kernel'], r['dtype']) for r in rows) == [
        ('backward', 'fp16'), ('backward', 'fp32/ieee'), ('forward', 'fp16'),
        ('forward', 'fp32/ieee')]
    for r in rows:
        assert r['ok'] and r['launcher'] == 'same', r
        assert r['spill_stores'] == r['spill_loads'] == 0, r
        assert r['nc_loads'] == r['atomics'] == 0, r
        assert 0 < r['registers'] <= 255 and r['shared'] > 0, r
    assert 'launcher specialisation: the compiled one' in run.stdout


_CUDA_SCRIPT = textwrap.dedent('''
    import torch
    from efficientvit_det.ops import cga_triton
    from efficientvit_det.ops.cga_reference import cga_reference
    from efficientvit_det.testing import max_rel_err

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 2e-4), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        for B, C, H, W, heads, K in ((2, 128, 20, 27, 4, 7), (1, 144, 5, 3, 3, 7)):
            cin = C // heads
            ins = [torch.randn(B, C, H, W), torch.randn(heads, 32 + cin, cin) * cin ** -0.5,
                   torch.randn(heads, 32 + cin), torch.randn(heads, 16, K, K) / K,
                   torch.randn(heads, 16) * 0.1, torch.randn(heads, 49),
                   torch.randn(C, C) * C ** -0.5, torch.randn(C) * 0.1]
            ins = [t.cuda() for t in ins]
            gy = torch.randn(B, C, H, W, device='cuda')
            leaves = [t.double().requires_grad_(True) for t in ins]
            yr = cga_reference(*leaves, 16, 7)
            yr.backward(gy.double())
            x = ins[0].to(dtype)
            y = cga_triton.forward(x, *ins[1:], 16, 7, 0.25)
            g = cga_triton.backward(gy.to(dtype), x, *ins[1:], 16, 7, 0.25)
            err = [max_rel_err(y, yr)] + [max_rel_err(a, t.grad) for a, t in zip(g, leaves)]
            assert max(err) < tol, (dtype, B, C, err)
    print('cuda ok')
''')


@pytest.mark.parametrize('device', ['cuda'])
def test_compiled_kernels_match_reference_on_gpu(device):
    if not torch.cuda.is_available():
        pytest.skip('no CUDA device: the compiled kernels are only checked offline here')
    run = subprocess.run([sys.executable, '-c', _CUDA_SCRIPT], cwd=ROOT,
                         env=_without_interpreter(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and 'cuda ok' in run.stdout, run.stdout + run.stderr


def test_amp_training_goes_through_the_kernel_with_reference_gradients(monkeypatch):
    """``--amp``: mmengine's AmpOptimWrapper runs the forward under float16 autocast on a GPU.
    The wrapper needs a GPU (and mmengine's CPU autocast only allows bfloat16, which the
    interpreter computes wrongly), so the test enters ``torch.autocast(float16)`` on the CPU
    tensors the interpreter runs. The backbone's attention runs the Triton kernels, and the
    gradients of every backbone weight match the original's module path under the same
    autocast."""

    from efficientvit_det.models.backbones.efficientvit import EfficientViT
    from efficientvit_det.testing import randomize_

    ct = _kernels()
    if _interpreter_dot_error(torch.float16) > 1e-2:
        pytest.skip('the Triton interpreter computes float16 dots wrongly here')
    calls = []
    forward = ct.forward
    monkeypatch.setattr(ct, 'forward', lambda *a: calls.append(a[0].dtype) or forward(*a))
    model = randomize_(EfficientViT('m0', out_indices=(2,), norm_eval=True), seed=3).train()
    # batch 2, several windows: the module path with batch 1 on one window hits a torch 2.14
    # BatchNorm backward bug (docs/facts.md, "Known stack issues")
    x = torch.randn(2, 3, 160, 128, generator=torch.Generator().manual_seed(5))

    def grads(backend, amp=True):
        model.set_attn_backend(backend).zero_grad()
        with torch.autocast('cpu', dtype=torch.float16, enabled=amp):
            loss = model(x)[0].float().square().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    exact = grads('module', amp=False)
    ref = grads('module')
    assert not calls
    got = grads('triton')
    assert calls and set(calls) == {torch.float16}  # autocast reached the kernel in fp16
    assert got.keys() == ref.keys() == exact.keys()
    for name in exact:  # as close to the float32 gradients as the original's path under AMP
        err, ref_err = max_rel_err(got[name], exact[name]), max_rel_err(ref[name], exact[name])
        assert err <= 2 * ref_err + 1e-2, (name, err, ref_err)
