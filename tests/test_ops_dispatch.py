"""The fused attention as a registered torch op: one backend vocabulary from the backbone's
config to the op, torch.compile / torch.export see one node, an optional kernel that fails
falls back (``auto``) or raises (explicit backends), autocast behaves as the reference.

Parametrised over devices: the CUDA cases run where a GPU is present and say why they skip
elsewhere (these machines have none)."""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers import cga_inputs

from efficientvit_det.models.backbones.efficientvit import EfficientViT, LocalWindowAttention
from efficientvit_det.ops import BACKENDS, cascaded_group_attention, cpu_extension_status
from efficientvit_det.ops import cga as cga_mod
from efficientvit_det.ops.cga_reference import cga_reference
from efficientvit_det.testing import randomize_

CPU_OK, CPU_WHY = cpu_extension_status()
needs_cpu_ext = pytest.mark.skipif(not CPU_OK, reason=f'C++ extension not built: {CPU_WHY}')
DEVICES = [
    'cpu',
    pytest.param('cuda', marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason='no CUDA device on this machine: the CUDA '
        'variant of this test runs on GPU machines only')),
]


def make_inputs(C=32, heads=2, kernels=(5, 3), H=9, W=12, B=2, key_dim=16, device='cpu',
                dtype=torch.float32, seed=0):
    return cga_inputs(B, C, H, W, heads, kernels, key_dim, dtype=dtype, seed=seed, device=device)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def fused_backend(device: str) -> str:
    return 'cpu' if device == 'cpu' else 'triton'


def skip_without_fused(device: str):
    if device == 'cpu' and not CPU_OK:
        pytest.skip(f'C++ extension not built: {CPU_WHY}')


@pytest.mark.parametrize('device', DEVICES)
def test_fused_op_is_one_registered_node_forward_and_backward(device):
    skip_without_fused(device)
    ins = [t.requires_grad_(True) for t in make_inputs(device=device)]
    y = cascaded_group_attention(*ins, key_dim=16, backend='fused')
    assert 'efficientvit_det_cga' in y.grad_fn.name()  # the registered op's autograd node
    grads = torch.autograd.grad(y.square().sum(), ins)
    ref_y = cga_reference(*ins, 16, 7)
    ref_grads = torch.autograd.grad(ref_y.square().sum(), ins)
    assert rel_err(y, ref_y) < 1e-4
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-3


@needs_cpu_ext
def test_torch_compile_sees_the_op_and_matches_eager():
    ins = make_inputs()
    fn = torch.compile(lambda x, *w: cascaded_group_attention(x, *w, key_dim=16, backend='cpu'),
                       backend='eager', fullgraph=False)
    torch.testing.assert_close(fn(*ins), cascaded_group_attention(*ins, key_dim=16, backend='cpu'))
    x = ins[0].clone().requires_grad_(True)
    fn(x, *ins[1:]).sum().backward()
    x2 = ins[0].clone().requires_grad_(True)
    cga_reference(x2, *ins[1:], 16, 7).sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-4


@needs_cpu_ext
def test_torch_export_keeps_one_cga_node():
    ins = make_inputs(B=1)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.ParameterList([torch.nn.Parameter(t) for t in ins[1:]])

        def forward(self, x):
            return cascaded_group_attention(x, *self.w, key_dim=16, backend='cpu')

    block = Block().eval()
    ep = torch.export.export(block, (ins[0],))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == 'call_function']
    assert sum('efficientvit_det.cga' in t for t in targets) == 1, targets
    torch.testing.assert_close(ep.module()(ins[0]), block(ins[0]))


def test_fake_implementation_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        ins = make_inputs(B=3, H=5, W=20)
        y = torch.ops.efficientvit_det.cga(*ins, 16, 7, 0.25, 'cpu', False)
        grads = torch.ops.efficientvit_det.cga_backward(y, *ins, 16, 7, 0.25, 'cpu')
    assert y.shape == (3, 32, 5, 20) and y.dtype == torch.float32
    assert [g.shape for g in grads] == [t.shape for t in ins]


class _Broken:
    """A kernel module whose forward or backward raises, as a failing compile would."""

    def __init__(self, fail_forward: bool):
        self.fail_forward = fail_forward

    def forward(self, *args):
        if self.fail_forward:
            raise RuntimeError('pretend the kernel did not compile')
        return cga_reference(*args[:8], *args[8:10], args[10]).detach()

    def backward(self, *args):
        raise RuntimeError('pretend the backward kernel did not compile')


@pytest.fixture
def broken_kernels(monkeypatch):
    def install(fail_forward: bool):
        monkeypatch.setattr(cga_mod, '_kernels', lambda backend: _Broken(fail_forward))
        monkeypatch.setattr(cga_mod, '_fused_status', lambda device, dtype: ('cpu', ''))
        monkeypatch.setattr(cga_mod, '_FAILED_CLASSES', set())
        cga_mod._warn_once.cache_clear()
    yield install
    cga_mod._warn_once.cache_clear()


def test_auto_falls_back_when_the_forward_kernel_fails(broken_kernels):
    broken_kernels(fail_forward=True)
    ins = make_inputs()
    with pytest.warns(RuntimeWarning, match='did not compile.*runs the PyTorch reference'):
        y = cascaded_group_attention(*ins, key_dim=16)
    torch.testing.assert_close(y, cga_reference(*ins, 16, 7))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # remembered: no second warning, no second try
        cascaded_group_attention(*ins, key_dim=16)
    with pytest.raises(RuntimeError, match='did not compile'):
        cascaded_group_attention(*ins, key_dim=16, backend='cpu')


def test_auto_falls_back_when_the_backward_kernel_fails(broken_kernels):
    broken_kernels(fail_forward=False)
    ins = [t.requires_grad_(True) for t in make_inputs()]
    y = cascaded_group_attention(*ins, key_dim=16)
    with pytest.warns(RuntimeWarning, match='backward kernel failed'):
        grads = torch.autograd.grad(y.sum(), ins)
    ref = torch.autograd.grad(cga_reference(*ins, 16, 7).sum(), ins)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)
    y = cascaded_group_attention(*ins, key_dim=16, backend='cpu')
    with pytest.raises(RuntimeError, match='backward kernel did not compile'):
        y.sum().backward()


@needs_cpu_ext
def test_autocast_input_is_cast_like_the_reference():
    ins = make_inputs()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ref = cga_reference(*ins, 16, 7)
        y = cascaded_group_attention(*ins, key_dim=16)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert rel_err(y, ref) < 3e-2


def test_backbone_passes_its_backend_to_the_op_unchanged(monkeypatch):
    seen = []

    def spy(x, *args, backend='auto', **kwargs):
        seen.append(backend)
        return torch.zeros_like(x)

    monkeypatch.setattr('efficientvit_det.models.backbones.efficientvit.cascaded_group_attention',
                        spy)
    model = EfficientViT('m0', attn_backend='fused').eval()
    model(torch.randn(1, 3, 64, 64))
    assert seen and set(seen) == {'fused'}
    seen.clear()
    model.set_attn_backend('cpu')(torch.randn(1, 3, 64, 64))
    assert set(seen) == {'cpu'}
    assert all(m.attn_backend == 'cpu' for m in model.modules()
               if isinstance(m, LocalWindowAttention))
    seen.clear()
    model.set_attn_backend('reference')(torch.randn(1, 3, 64, 64))
    assert not seen  # the original's module path


def test_backend_vocabulary_is_validated_once_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*auto"):
        EfficientViT('m0', attn_backend='flash')
    with pytest.raises(ValueError, match='unknown attention backend'):
        EfficientViT('m0').set_attn_backend('flash')
    assert set(BACKENDS) == {'auto', 'fused', 'reference', 'cpu', 'triton'}
    with pytest.warns(DeprecationWarning, match='attn_backend'):
        assert EfficientViT('m0', attn_impl='reference').attn_backend == 'reference'


def test_explicit_backend_needs_eval_mode_batchnorms():
    model = EfficientViT('m0', attn_backend='fused', norm_eval=False).train()
    x = torch.randn(2, 3, 128, 128)
    with pytest.raises(RuntimeError, match="needs the attention BatchNorms in eval mode"):
        model(x)
    model.set_attn_backend('auto')(x)  # the module path while the BatchNorms train


@pytest.mark.parametrize('device', DEVICES)
def test_backbone_fused_equals_reference(device):
    skip_without_fused(device)
    model = randomize_(EfficientViT('m0', attn_backend='reference')).to(device).eval()
    x = torch.randn(1, 3, 100, 150, device=device)
    with torch.no_grad():
        expected = model(x)
        got = model.set_attn_backend('fused')(x)
    for a, b in zip(got, expected):
        assert rel_err(a, b) < 1e-4
