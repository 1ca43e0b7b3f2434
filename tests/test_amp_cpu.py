"""``tools/train.py --amp`` without a GPU: bfloat16 autocast on the CPU
(efficientvit_det/engine/amp.py).

This machine has no native bf16 (AMD EPYC, AVX2 only), so the end-to-end run forces the emulated
path with ``EVIT_AMP_CPU_BF16=1``: slow per operation, but the same code as on a CPU with
AMX-BF16 / AVX512-BF16. Losses of a few iterations must match float32 within
``LOSS_TOLERANCE`` (relative): bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%
per operation), a few percent over a network and four optimiser steps.
"""
import json
import os
import os.path as osp
import re
import sys

import pytest
import torch
from mmengine.config import Config

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import PY, ROOT, TOOLS, make_dataset, run, write_tiny_config  # noqa: E402

from efficientvit_det.cli import UserInputError  # noqa: E402
from efficientvit_det.cpu import CpuInfo, cpu_info  # noqa: E402
from efficientvit_det.engine.amp import FORCE_CPU_BF16_ENV, CpuAmpOptimWrapper, configure_amp  # noqa: E402

LOSS_TOLERANCE = 0.05


def _cpu(native: bool) -> CpuInfo:
    return CpuInfo(name='Test CPU', avx2=True, avx512=native, avx512_bf16=native, amx_bf16=False,
                   avx512_vnni=False, avx_vnni=False, amx_int8=False, onednn_bf16=native)


def _cfg():
    return Config(dict(optim_wrapper=dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1))))


def test_configure_amp_per_machine(monkeypatch):
    monkeypatch.delenv(FORCE_CPU_BF16_ENV, raising=False)
    cfg = _cfg()
    assert 'CUDA' in configure_amp(cfg, cuda=True)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.loss_scale == 'dynamic'
    cfg = _cfg()
    assert 'native' in configure_amp(cfg, cuda=False, cpu=_cpu(True))
    assert cfg.optim_wrapper.type == 'CpuAmpOptimWrapper' and 'loss_scale' not in cfg.optim_wrapper
    with pytest.raises(UserInputError, match=f'Test CPU.*neither AMX-BF16 nor AVX512-BF16.*'
                                             f'{FORCE_CPU_BF16_ENV}=1') as info:
        configure_amp(_cfg(), cuda=False, cpu=_cpu(False))
    assert '\n' not in str(info.value)  # printed as one line by efficientvit_det.cli
    monkeypatch.setenv(FORCE_CPU_BF16_ENV, '1')
    cfg = _cfg()
    assert 'emulated' in configure_amp(cfg, cuda=False, cpu=_cpu(False))
    assert cfg.optim_wrapper.type == 'CpuAmpOptimWrapper'


def test_this_machine_gets_the_message_not_mmengines_assertion(monkeypatch, tmp_path):
    """The real CPU probe: here (AVX2 only) ``--amp`` is refused with the one-line reason."""
    monkeypatch.delenv(FORCE_CPU_BF16_ENV, raising=False)
    if cpu_info().native_bf16 or torch.cuda.is_available():
        pytest.skip('this machine runs --amp natively')
    r = run([PY, osp.join(TOOLS, 'train.py'), osp.join(ROOT, 'configs',
                                                     'retinanet_efficientvit_m0_demo.py'),
             '--amp', '--work-dir', tmp_path], check=False, timeout=300,
            env={FORCE_CPU_BF16_ENV: '0'})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: --amp on a CPU'), r.stderr[-2000:]
    assert 'AssertionError' not in r.stderr


def test_wrapper_runs_the_forward_under_bf16_autocast_with_fp32_master_weights():
    layer = torch.nn.Linear(4, 4)
    wrapper = CpuAmpOptimWrapper(optimizer=torch.optim.SGD(layer.parameters(), lr=0.1))
    with wrapper.optim_context(layer):
        y = layer(torch.randn(2, 4))
        assert torch.is_autocast_enabled('cpu') and y.dtype == torch.bfloat16
    wrapper.update_params(y.float().sum())
    assert layer.weight.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')
    with pytest.raises(ValueError, match='dtype'):
        CpuAmpOptimWrapper(optimizer=torch.optim.SGD(layer.parameters(), lr=0.1), dtype='int8')


# the training command with the op's logger on stderr (the verification lines name the kernel)
_LAUNCH = ('import logging, runpy, sys; logging.basicConfig(level=logging.INFO, '
           "format='%(name)s: %(message)s'); sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")


def _scalars(work):
    """Rows of mmengine's ``vis_data/scalars.json`` (training iterations, then evaluation)."""
    scalars = sorted(osp.join(dp, f) for dp, _, fs in os.walk(work) for f in fs
                     if f == 'scalars.json')
    assert scalars, f'no scalars.json under {work}'
    return [json.loads(line) for line in open(scalars[-1])]


def test_train_amp_on_cpu_through_the_fused_op_then_evaluate(tmp_path):
    """A few iterations of the demo config (m0, 64 px, backbone BatchNorms in eval mode so the
    attention runs the fused C++ op) with ``--amp`` and in float32 from the same seed: the
    losses agree within LOSS_TOLERANCE, the attention ran the C++ kernel in bf16 (verified
    against the reference on first use), and the evaluation at the end reports a COCO mAP."""
    from efficientvit_det.ops import cpu_extension_status
    if not cpu_extension_status()[0]:
        pytest.skip(f'C++ extension not built: {cpu_extension_status()[1]}')
    data = make_dataset(tmp_path / 'data', num_train=8, num_val=4, size=64, seed=0)
    cfg = write_tiny_config(tmp_path / 'tiny.py', data, size=64, max_epochs=1, batch_size=2,
                            extra="model.update(backbone=dict(arch='m0', norm_eval=True))\n"
                                  "default_hooks = dict(logger=dict(interval=1))\n")
    env = {FORCE_CPU_BF16_ENV: '1', 'EVIT_CGA_VERIFY': '1'}
    runs = {}
    for name, flags in (('fp32', []), ('amp', ['--amp'])):
        work = tmp_path / name
        r = run([PY, '-c', _LAUNCH, osp.join(TOOLS, 'train.py'), cfg, '--work-dir', work,
                 '--seed', '0', '--deterministic', *flags, '--cfg-options',
                 'model.test_cfg.score_thr=0.0'], timeout=900, env=env)  # untrained: low scores
        runs[name] = (r.stdout + r.stderr, _scalars(work))
    text, amp_rows = runs['amp']
    amp_losses = [r['loss'] for r in amp_rows if 'loss' in r]
    fp32_losses = [r['loss'] for r in runs['fp32'][1] if 'loss' in r]
    assert len(amp_losses) == len(fp32_losses) == 4, (amp_losses, fp32_losses)
    for a, f in zip(amp_losses, fp32_losses):
        assert abs(a - f) <= LOSS_TOLERANCE * abs(f), (amp_losses, fp32_losses)
    assert 'bfloat16 autocast on the CPU' in text
    for direction in ('forward', 'backward'):
        assert re.search(rf'verified the cpu attention {direction} kernel for \(dtype, C, heads, '
                         rf'K\)=\(torch.bfloat16, 64, 4, 5\)', text), text[-4000:]
    assert 'disagrees' not in text and 'kernel failed' not in text
    maps = [r['coco/bbox_mAP'] for r in amp_rows if 'coco/bbox_mAP' in r]  # evaluated at the end
    assert len(maps) == 1 and 0.0 <= maps[0] <= 1.0, amp_rows
