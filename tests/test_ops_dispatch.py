"""The fused attention as a registered torch op and the one decision of what runs
(``ops/dispatch.py``): the backbone's and the op's vocabularies, one plan per forward,
torch.compile / torch.export see one node, autocast behaves as the reference. What ``auto`` does
when a kernel fails: tests/test_ops_guard.py.

Parametrised over devices: the CUDA cases run where a GPU is present and say why they skip
elsewhere (these machines have none)."""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers import cga_inputs

from efficientvit_det.models.backbones.efficientvit import EfficientViT, LocalWindowAttention
from efficientvit_det.ops import ATTN_BACKENDS, BACKENDS, cascaded_group_attention, cpu_extension_status, dispatch
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
        grads = torch.ops.efficientvit_det.cga_backward(y, *ins, 16, 7, 0.25, 'cpu', True)
    assert y.shape == (3, 32, 5, 20) and y.dtype == torch.float32
    assert [g.shape for g in grads] == [t.shape for t in ins]


@needs_cpu_ext
def test_autocast_input_is_cast_like_the_reference():
    ins = make_inputs()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ref = cga_reference(*ins, 16, 7)
        y = cascaded_group_attention(*ins, key_dim=16)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert rel_err(y, ref) < 3e-2


# ---------------------------------------------------------------------------------------------
# the one decision point (ops/dispatch.py)
# ---------------------------------------------------------------------------------------------
def _x(dtype=torch.float32):
    return torch.randn(1, 32, 9, 9, dtype=dtype)


def test_plan_rules():
    plan = dispatch.plan_attention
    assert plan('module', _x(), bn_training=False).kernel == 'module'
    assert plan('auto', _x(), bn_training=True) == dispatch.AttentionPlan(
        'module', False, torch.float32, 'attention BatchNorms in training mode')
    with pytest.raises(RuntimeError, match='needs the attention BatchNorms in eval mode'):
        plan('cpu', _x(), bn_training=True)
    assert plan('reference', _x()).kernel == 'reference'
    auto = plan('auto', _x(), bn_training=False)
    assert (auto.kernel, auto.fallback) == (('cpu', True) if CPU_OK else ('reference', False))
    if CPU_OK:
        assert plan('cpu', _x()) == dispatch.AttentionPlan('cpu', False, torch.float32)
        assert plan('fused', _x()).kernel == 'cpu'
        with pytest.raises(TypeError, match='float16'):
            plan('cpu', _x(torch.float16))
        with torch.autocast('cpu', dtype=torch.bfloat16):  # the compute dtype is autocast's
            assert plan('auto', _x()).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match='fused.*cannot run here'):
        plan('fused', _x(torch.float16))
    with pytest.raises(RuntimeError, match='triton.*CUDA'):
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv('TRITON_INTERPRET', raising=False)
            plan('triton', _x())
    with pytest.raises(ValueError, match="'module' is the backbone's module path"):
        plan('module', _x())  # the op has no module path
    with pytest.raises(ValueError, match='unknown attention backend'):
        plan('flash', _x(), bn_training=False)


def test_plan_in_export_is_plain_ops(monkeypatch):
    monkeypatch.setattr(torch.onnx, 'is_in_onnx_export', lambda: True)
    assert dispatch.plan_attention('cpu', _x(), bn_training=False).kernel == 'module'
    assert dispatch.plan_attention('auto', _x()).kernel == 'reference'


def test_backbone_plans_once_per_forward_and_asks_export_once(monkeypatch):
    """One decision per attention forward: the plan is made once, ONNX export asked once, and
    the op gets the plan (it does not decide again)."""
    model = EfficientViT('m0', attn_backend='auto').eval()
    n_attn = sum(isinstance(m, LocalWindowAttention) for m in model.modules())
    plans, exports, names = [], [], []
    real_plan, real_export = dispatch.plan_attention, torch.onnx.is_in_onnx_export
    real_check = dispatch.check_attn_backend

    def spy_plan(*args, **kwargs):
        plans.append(args[0])
        return real_plan(*args, **kwargs)

    monkeypatch.setattr('efficientvit_det.models.backbones.efficientvit.plan_attention', spy_plan)
    monkeypatch.setattr(dispatch, 'plan_attention', spy_plan)
    monkeypatch.setattr(torch.onnx, 'is_in_onnx_export', lambda: exports.append(1) or real_export())
    monkeypatch.setattr('efficientvit_det.models.backbones.efficientvit.check_attn_backend',
                        lambda b: names.append(b) or real_check(b))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model(torch.randn(1, 3, 64, 64))
    assert len(plans) == len(exports) == n_attn and set(plans) == {'auto'}
    assert not names  # the name was checked when it was set, not per forward


def test_backbone_passes_its_plan_to_the_op(monkeypatch):
    seen = []

    def spy(x, *args, backend='auto', **kwargs):
        seen.append(backend)
        return torch.zeros_like(x)

    monkeypatch.setattr('efficientvit_det.models.backbones.efficientvit.cascaded_group_attention',
                        spy)
    model = EfficientViT('m0', attn_backend='fused').eval()
    if not CPU_OK:
        with pytest.raises(RuntimeError, match='fused'):
            model(torch.randn(1, 3, 64, 64))
        return
    model(torch.randn(1, 3, 64, 64))
    assert seen and {p.kernel for p in seen} == {'cpu'} and not any(p.fallback for p in seen)
    seen.clear()
    model.set_attn_backend('auto')(torch.randn(1, 3, 64, 64))
    assert {(p.kernel, p.fallback) for p in seen} == {('cpu', True)}
    seen.clear()
    model.set_attn_backend('module')(torch.randn(1, 3, 64, 64))
    assert not seen  # the original's module path
    assert all(m.attn_backend == 'module' for m in model.modules()
               if isinstance(m, LocalWindowAttention))


def test_backend_vocabulary_and_the_renamed_value():
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*auto"):
        EfficientViT('m0', attn_backend='flash')
    with pytest.raises(ValueError, match='unknown attention backend'):
        EfficientViT('m0').set_attn_backend('flash')
    assert set(BACKENDS) == {'auto', 'fused', 'reference', 'cpu', 'triton'}
    assert set(ATTN_BACKENDS) == {'auto', 'fused', 'module', 'cpu', 'triton'}
    # the old config value of the module path still works, with a deprecation
    with pytest.warns(DeprecationWarning, match="'reference' is deprecated.*'module'"):
        model = EfficientViT('m0', attn_backend='reference')
    assert model.attn_backend == 'module'
    assert {m.attn_backend for m in model.modules() if isinstance(m, LocalWindowAttention)} == \
        {'module'}
    with pytest.warns(DeprecationWarning):
        assert model.set_attn_backend('reference').attn_backend == 'module'
    with pytest.warns(DeprecationWarning, match='attn_backend'):
        assert EfficientViT('m0', attn_impl='module').attn_backend == 'module'


def test_explicit_backend_needs_eval_mode_batchnorms():
    model = EfficientViT('m0', attn_backend='fused', norm_eval=False).train()
    x = torch.randn(2, 3, 128, 128)
    with pytest.raises(RuntimeError, match="needs the attention BatchNorms in eval mode"):
        model(x)
    model.set_attn_backend('auto')(x)  # the module path while the BatchNorms train


@pytest.mark.parametrize('device', DEVICES)
def test_backbone_fused_equals_reference(device):
    skip_without_fused(device)
    model = randomize_(EfficientViT('m0', attn_backend='module')).to(device).eval()
    x = torch.randn(1, 3, 100, 150, device=device)
    with torch.no_grad():
        expected = model(x)
        got = model.set_attn_backend('fused')(x)
    for a, b in zip(got, expected):
        assert rel_err(a, b) < 1e-4


_TORCH_ONLY = '''
import sys
class Block:  # what a machine without OpenMMLab looks like
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('mmdet', 'mmcv', 'mmengine'):
            raise ModuleNotFoundError(f'No module named {name!r}', name=name.split('.')[0])
sys.meta_path.insert(0, Block())
import torch
import efficientvit_det.ops as ops
from efficientvit_det.ops import cga_reference, dispatch, guard, weights, windows  # noqa
x = torch.randn(1, 8, 3, 3)
assert ops.plan_attention('reference', x).kernel == 'reference'
assert not [m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmcv', 'mmengine')]
print('torch only ok')
'''


def test_ops_import_with_torch_alone():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, '-c', _TORCH_ONLY], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and 'torch only ok' in run.stdout, run.stdout + run.stderr
    for path in (root / 'efficientvit_det' / 'ops').glob('*.py'):
        text = path.read_text()
        assert not any(f'import {m}' in text or f'from {m}' in text
                       for m in ('mmdet', 'mmcv', 'mmengine')), path
