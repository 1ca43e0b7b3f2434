"""The safety net of ``auto`` (efficientvit_det/ops/guard.py), exercised by making the kernels fail.

A kernel is injected around the real one (the C++ extension, or the Triton kernels under the
interpreter): it returns wrong values (the output, or one of the eight gradients) or raises. The
run must continue with the reference's result, under eager, AMP (CPU autocast) and
``torch.compile``; out-of-memory errors must propagate, transient errors must not disable a
shape class, batch 0 must run.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers import cga_inputs

from efficientvit_det.ops import cascaded_group_attention, cpu_extension_status, dispatch, guard
from efficientvit_det.ops import cga as cga_mod

CPU_OK, CPU_WHY = cpu_extension_status()
GRAD_NAMES = ('x', 'qkv_weight', 'qkv_bias', 'dw_weight', 'dw_bias', 'attn_bias', 'proj_weight',
              'proj_bias')
C, HEADS, KERNELS, KD = 32, 2, (5, 3), 16
LABEL = f'(dtype, C, heads, K)=(torch.float32, {C}, {HEADS}, 5)'


class Injected:
    """A kernel module around a real one: ``fault`` None (correct), ``'forward'`` (wrong
    output), ``('grad', i)`` (wrong gradient i), ``'raise-forward'``, ``'raise-backward'``,
    ``'oom'`` (forward out of memory) or ``'transient'`` (the next forward raises once)."""

    def __init__(self, real, fault=None):
        self.real, self.fault = real, fault
        self.calls = {'forward': 0, 'backward': 0}
        self.dtypes = []

    def forward(self, *args):
        self.calls['forward'] += 1
        self.dtypes.append(args[0].dtype)
        if self.fault == 'raise-forward':
            raise RuntimeError('injected: the forward kernel did not launch')
        if self.fault == 'oom':
            raise torch.OutOfMemoryError('injected: CUDA out of memory. Tried to allocate 2 GiB')
        if self.fault == 'transient':
            self.fault = None
            raise RuntimeError('injected: a transient error')
        y = self.real.forward(*args)
        return y * 1.5 + 0.25 if self.fault == 'forward' else y

    def backward(self, *args):
        self.calls['backward'] += 1
        if self.fault == 'raise-backward':
            raise RuntimeError('injected: the backward kernel did not launch')
        grads = list(self.real.backward(*args))
        if isinstance(self.fault, tuple):
            i = self.fault[1]
            grads[i] = grads[i] * 1.5 + 0.25 * grads[i].abs().max()
        return grads


def _real(backend):
    if backend == 'cpu':
        if not CPU_OK:
            pytest.skip(f'C++ extension not built: {CPU_WHY}')
        return dispatch.cpu_extension()[0]
    if os.environ.get('TRITON_INTERPRET') != '1':
        pytest.skip('TRITON_INTERPRET is not 1 (conftest.py sets it)')
    from efficientvit_det.ops import cga_triton
    return cga_triton


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.delenv('EVIT_CGA_VERIFY', raising=False)
    guard.reset()
    yield
    guard.reset()


@pytest.fixture
def inject(monkeypatch):
    """``inject(backend, fault)``: ``auto`` on CPU tensors runs ``backend`` through an
    :class:`Injected` kernel (returned)."""
    def install(backend, fault=None):
        kernel = Injected(_real(backend), fault)
        monkeypatch.setattr(cga_mod, '_kernels', lambda name: kernel)  # called at run time
        if backend == 'triton':  # CPU tensors: route 'auto' to the interpreted Triton kernels
            monkeypatch.setattr(dispatch, '_fused_for', _to_triton)  # one object: no recompile
        return kernel
    return install


def _to_triton(device):
    return 'triton'


def _inputs(B=1, H=7, W=9, seed=0):  # two windows, one of them padded
    return cga_inputs(B, C, H, W, HEADS, KERNELS, KD, dtype=torch.float32, seed=seed)


def _amp_dtype(backend):
    # the interpreter computes bf16 dots wrongly (tests/test_ops_triton.py): fp16 there
    return torch.bfloat16 if backend == 'cpu' else torch.float16


def _run(mode, backend, ins, fn=None):
    """Output and the gradients of every input, ``auto`` through ``fn`` (default: the op)."""
    fn = fn or (lambda *t: cascaded_group_attention(*t, key_dim=KD))
    leaves = [t.detach().clone().requires_grad_(True) for t in ins]
    gy = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(7))
    with torch.autocast('cpu', dtype=_amp_dtype(backend), enabled=mode == 'amp'):
        y = fn(*leaves)
    y.backward(gy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def _expected(mode, backend, ins):
    """The same run on the reference: the reference in the dtypes the forward used."""
    return _run(mode, backend, ins,
                lambda *t: cascaded_group_attention(*t, key_dim=KD, backend='reference'))


def _assert_equal_runs(got, expected, what, exact_output=True, exact_grads=True, rel=2e-2):
    """Bit for bit where the reference's result is returned, else within ``rel`` of it."""
    (y, grads), (ey, egrads) = got, expected
    assert y.dtype == ey.dtype, what
    for name, a, e, exact in (('output', y, ey, exact_output),
                              *((n, g, r, exact_grads) for n, g, r in zip(GRAD_NAMES, grads,
                                                                          egrads))):
        if exact:
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m, n=name: f'{what}: {n}: {m}')
        else:
            err = ((a.double() - e.double()).abs().max() / e.double().abs().max()).item()
            assert err < rel, (what, name, err)


FAULTS = ['forward', *[('grad', i) for i in range(8)], 'raise-forward', 'raise-backward']
# The interpreter runs a Triton kernel at about a second per pass on 2 cores: every fault in
# eager mode; under AMP and torch.compile (the same guard code, reached through autocast or a
# compiled graph) a wrong output, a wrong gradient of each kind of reduction (x: the cascade's
# GEMMs; dw_weight: per-window partial sums) and both raises. The C++ backend runs every fault
# in every mode.
TRITON_FAULTS = ['forward', ('grad', 0), ('grad', 3), 'raise-forward', 'raise-backward']


@pytest.mark.parametrize('mode', ['eager', 'amp', 'compile'])
@pytest.mark.parametrize('backend', ['cpu', 'triton'])
def test_injected_faults_continue_on_the_reference(backend, mode, inject, monkeypatch):
    """Every fault (a wrong output, each wrong gradient, a forward or backward that raises):
    a warning naming the class and the reason, and the run continues with the reference's
    output / gradients, bit for bit; a wrong result keeps the class on the reference."""
    monkeypatch.setenv('EVIT_CGA_VERIFY', '1')  # on CPU too (default: CUDA only)
    ins = _inputs()
    dtype = _amp_dtype(backend) if mode == 'amp' else torch.float32
    op = lambda *t: cascaded_group_attention(*t, key_dim=KD)  # noqa: E731
    fn = torch.compile(op, backend='aot_eager') if mode == 'compile' else op
    for fault in (FAULTS if backend == 'cpu' or mode == 'eager' else TRITON_FAULTS):
        guard.reset()
        kernel = inject(backend, fault)
        expected = _expected(mode, backend, ins)
        with pytest.warns(RuntimeWarning) as rec:
            got = _run(mode, backend, ins, fn)
        what = f'{backend}/{mode}/{fault}'
        # the reference's result where it is returned: the output when the forward failed,
        # the gradients when the backward failed or the forward was found wrong (its class
        # then runs the reference both ways); a transient forward error leaves the backward on
        # the kernel
        exact = dict(exact_output=fault in ('forward', 'raise-forward'),
                     exact_grads=fault != 'raise-forward')
        # the kernel's own results (not the reference's): as close as the dtype allows
        rel = 1e-3 if mode != 'amp' else 0.15
        _assert_equal_runs(got, expected, what, rel=rel, **exact)
        assert kernel.calls['forward'] >= 1 and set(kernel.dtypes) == {dtype}, what
        text = '\n'.join(str(w.message) for w in rec if 'efficientvit_det' in str(w.message))
        assert f'(dtype, C, heads, K)=({dtype}, {C}, {HEADS}, 5)' in text, (what, text)
        if isinstance(fault, tuple):
            assert f'grad {GRAD_NAMES[fault[1]]}' in text, (what, text)
        if fault.startswith('raise') if isinstance(fault, str) else False:
            assert 'did not launch' in text and 'this call runs the PyTorch reference' in text
        else:  # a wrong result: the class moves to the reference for good
            assert 'disagrees with the PyTorch reference' in text and 'from now on' in text
            if backend == 'triton' and fault != 'forward':
                continue  # the same guard code as for C++ (checked there): save interpreter time
            calls = dict(kernel.calls)
            with warnings.catch_warnings():
                warnings.simplefilter('error')
                again = _run(mode, backend, ins, fn)
            _assert_equal_runs(again, expected, what + ' (second run)', rel=rel, **exact)
            if fault == 'forward':
                assert kernel.calls == calls, what  # both directions on the reference
            else:
                assert kernel.calls['backward'] == calls['backward'], what


@pytest.mark.parametrize('backend', ['cpu', 'triton'])
def test_verification_passes_a_correct_kernel_once(backend, inject, monkeypatch, caplog):
    monkeypatch.setenv('EVIT_CGA_VERIFY', '1')
    kernel = inject(backend)
    ins = _inputs()
    with caplog.at_level('INFO', logger='efficientvit_det.ops'):
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            for _ in range(2):
                y, grads = _run('eager', backend, ins)
    verified = [r.getMessage() for r in caplog.records if 'verified' in r.getMessage()]
    assert len(verified) == 2, verified  # forward and backward, logged once each
    assert all(LABEL in m and backend in m for m in verified), verified
    assert kernel.calls == {'forward': 2, 'backward': 2}
    ey, egrads = _expected('eager', backend, ins)
    assert ((y - ey).abs().max() / ey.abs().max()).item() < guard.tolerance(torch.float32)


def test_verification_switch(inject, monkeypatch):
    """Default on CPU: off (a wrong kernel goes unnoticed); ``EVIT_CGA_VERIFY=0|1``."""
    ins = _inputs()
    assert guard.verify_enabled(torch.device('cuda'))
    assert not guard.verify_enabled(torch.device('cpu'))
    monkeypatch.setenv('EVIT_CGA_VERIFY', '0')
    assert not guard.verify_enabled(torch.device('cuda'))
    monkeypatch.delenv('EVIT_CGA_VERIFY')
    inject('cpu', 'forward')
    wrong = cascaded_group_attention(*ins, key_dim=KD)
    ref = cascaded_group_attention(*ins, key_dim=KD, backend='reference')
    assert not torch.allclose(wrong, ref)
    monkeypatch.setenv('EVIT_CGA_VERIFY', '1')
    with pytest.warns(RuntimeWarning, match=r'disagrees with the PyTorch reference: max relative '
                                             r'error [0-9.e+-]+ in output \(bound 0.001\)'):
        torch.testing.assert_close(cascaded_group_attention(*ins, key_dim=KD), ref)


# ---------------------------------------------------------------------------------------------
# the four holes of issue 19: each of these failed on the code before the guard
# ---------------------------------------------------------------------------------------------
def test_amp_backward_fallback_runs_the_reference_in_the_forward_dtypes(inject):
    """bf16 autocast, the backward kernel raises: the reference gradients are computed in the
    dtypes the forward used (was: ``Input type (BFloat16) and bias type (float)``)."""
    inject('cpu', 'raise-backward')
    ins = _inputs()
    expected = _expected('amp', 'cpu', ins)
    with pytest.warns(RuntimeWarning, match=r'backward kernel failed for \(dtype, C, heads, K\)='
                                             r'\(torch.bfloat16, 32, 2, 5\)'):
        got = _run('amp', 'cpu', ins)
    _assert_equal_runs(got, expected, 'amp backward', exact_output=False, rel=0.05)
    assert got[0].dtype == torch.bfloat16 and got[1][0].dtype == torch.float32


def test_torch_compile_falls_back_at_run_time(inject):
    """The kernel fails after the graph was compiled: the compiled run continues on the
    reference (was: the error propagated, the try/except ran only while tracing)."""
    kernel = inject('cpu')
    ins = _inputs()
    fn = torch.compile(lambda *t: cascaded_group_attention(*t, key_dim=KD), backend='aot_eager')
    first = _run('eager', 'cpu', ins, fn)  # compiles, runs the kernel
    assert kernel.calls == {'forward': 1, 'backward': 1}
    kernel.fault = 'raise-forward'
    with pytest.warns(RuntimeWarning, match='did not launch'):
        got = _run('eager', 'cpu', ins, fn)
    # the output is the reference's; the backward stays on the kernel (one failure is not a
    # reason to give up the class)
    _assert_equal_runs(got, _expected('eager', 'cpu', ins), 'compiled fallback',
                       exact_grads=False, rel=1e-4)
    torch.testing.assert_close(got[0], first[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend', ['cpu', 'triton'])
def test_batch_zero_runs_and_disables_nothing(backend, inject):
    """B = 0, forward and backward, through the kernel itself and the op under ``auto``
    (was: ``a.view(B, -1, H * W)`` raised in the Triton host and disabled the class)."""
    real = _real(backend)
    ins = _inputs(B=0)
    y = real.forward(*ins, KD, 7, KD ** -0.5)
    grads = real.backward(torch.zeros_like(ins[0]), *ins, KD, 7, KD ** -0.5)
    assert y.shape == ins[0].shape
    for g, t in zip(grads, ins):
        assert g.shape == t.shape and g.dtype == t.dtype and not g.any()
    kernel = inject(backend)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        out, g = _run('eager', backend, ins)
    assert out.shape == (0, C, 7, 9) and all(not t.any() for t in g)
    assert kernel.calls == {'forward': 1, 'backward': 1}
    assert not any(s.disabled for s in guard._STATE.values())


def test_transient_error_does_not_disable_the_class(inject):
    """One failure falls back for that call only; the next call runs the kernel again
    (was: the class ran the reference until the process ended)."""
    kernel = inject('cpu', 'transient')
    ins = _inputs()
    ref = cascaded_group_attention(*ins, key_dim=KD, backend='reference')
    with pytest.warns(RuntimeWarning, match='transient.*this call runs the PyTorch reference'):
        torch.testing.assert_close(cascaded_group_attention(*ins, key_dim=KD), ref, rtol=0, atol=0)
    cascaded_group_attention(*ins, key_dim=KD)
    assert kernel.calls['forward'] == 2  # back on the kernel


def test_repeated_failures_disable_after_max_failures(inject):
    kernel = inject('cpu', 'raise-forward')
    ins = _inputs()
    with pytest.warns(RuntimeWarning):
        for _ in range(guard.MAX_FAILURES + 2):
            cascaded_group_attention(*ins, key_dim=KD)
    assert kernel.calls['forward'] == guard.MAX_FAILURES


def test_out_of_memory_propagates_and_disables_nothing(inject):
    kernel = inject('cpu', 'oom')
    ins = _inputs()
    with pytest.raises(torch.OutOfMemoryError):
        cascaded_group_attention(*ins, key_dim=KD)
    kernel.fault = None
    cascaded_group_attention(*ins, key_dim=KD)
    assert kernel.calls['forward'] == 2
    assert not any(s.disabled or any(s.failures.values()) for s in guard._STATE.values())


def test_deterministic_failure_disables_at_once(inject):
    """A compile error (Triton's errors, a missing module) is not retried."""
    import triton.compiler.errors as errors
    kernel = inject('cpu')
    ins = _inputs()

    def fails(*args):
        kernel.calls['forward'] += 1
        raise errors.CompilationError('k.py', None, 'injected: does not compile')
    kernel.forward = fails
    with pytest.warns(RuntimeWarning, match='from now on'):
        cascaded_group_attention(*ins, key_dim=KD)
    cascaded_group_attention(*ins, key_dim=KD)
    assert kernel.calls['forward'] == 1


def test_input_too_large_falls_back_for_that_call_only(inject):
    kernel = inject('cpu')
    ins = _inputs()
    forward = kernel.forward

    def too_large(*args):
        kernel.calls['forward'] += 1
        raise guard.InputTooLargeError('injected: too large for 32-bit offsets')
    kernel.forward = too_large
    with pytest.warns(RuntimeWarning, match='other sizes keep the kernel'):
        cascaded_group_attention(*ins, key_dim=KD)
    kernel.forward = forward
    cascaded_group_attention(*ins, key_dim=KD)
    assert kernel.calls['forward'] == 2
    assert not any(s.disabled for s in guard._STATE.values())


def test_explicit_backends_raise_instead(inject):
    inject('cpu', 'raise-forward')
    with pytest.raises(RuntimeError, match='did not launch'):
        cascaded_group_attention(*_inputs(), key_dim=KD, backend='cpu')
    inject('cpu', 'raise-backward')
    leaves = [t.requires_grad_(True) for t in _inputs()]
    y = cascaded_group_attention(*leaves, key_dim=KD, backend='cpu')
    with pytest.raises(RuntimeError, match='backward kernel did not launch'):
        y.sum().backward()


def test_ddp_training_step_continues_on_the_reference(inject, tmp_path):
    """DDP (one gloo process): the backward kernel fails inside the reducer's step; the
    gradients DDP averages are the reference's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from efficientvit_det.models.backbones.efficientvit import LocalWindowAttention
    from efficientvit_det.testing import randomize_

    inject('cpu', 'raise-backward')
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous', rank=0,
                            world_size=1)
    try:
        def grads(backend):
            torch.manual_seed(0)
            mod = randomize_(LocalWindowAttention(C, KD, HEADS, 7, KERNELS, backend)).eval()
            model = DDP(mod)
            x = torch.randn(2, C, 9, 10, generator=torch.Generator().manual_seed(1))
            model(x).square().mean().backward()
            return [p.grad for p in mod.parameters()]
        with pytest.warns(RuntimeWarning, match='backward kernel failed'):
            got = grads('auto')
        expected = grads('module')
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()
