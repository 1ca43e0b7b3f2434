"""The house's rules, held by tests: what imports with torch alone, the one checkpoint loader,
the one inference form (docs/design.md)."""
from __future__ import annotations

import os.path as osp
import subprocess
import sys
import textwrap

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

_BLOCK_OPENMMLAB = textwrap.dedent('''
    import sys
    for name in ('mmdet', 'mmcv', 'mmengine'):
        sys.modules[name] = None  # "import mmdet" now raises ModuleNotFoundError
''')


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', _BLOCK_OPENMMLAB + textwrap.dedent(code)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={'PYTHONPATH': ROOT, 'PATH': '/usr/bin:/bin',
                               'TRITON_INTERPRET': '1', 'OMP_NUM_THREADS': '1'})


def test_ops_import_and_run_with_torch_alone():
    """The fused op is useful without MMDetection (e.g. beside timm's classifiers)."""
    r = _python('''
        import torch
        import efficientvit_det.ops as ops
        from efficientvit_det.archs import ARCH_SETTINGS
        from efficientvit_det.cpu import cpu_info
        assert 'mmdet' not in [m for m in sys.modules if sys.modules[m] is not None]
        g = torch.Generator().manual_seed(0)
        C, heads, kd, K = 64, 4, 16, 5
        vd = C // heads
        w = lambda *s: torch.randn(*s, generator=g) * 0.1
        y = ops.cascaded_group_attention(
            w(1, C, 9, 11), w(heads, 2 * kd + vd, C // heads), w(heads, 2 * kd + vd),
            w(heads, kd, K, K), w(heads, kd), w(heads, 49), w(C, heads * vd), w(C), kd)
        assert y.shape == (1, C, 9, 11) and torch.isfinite(y).all()
        print('ok', sorted(ARCH_SETTINGS), cpu_info().name)
    ''')
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith('ok')


def test_package_import_without_mmdet_registers_nothing_and_says_nothing():
    r = _python('''
        import efficientvit_det
        assert not hasattr(efficientvit_det, 'models')
        print('ok')
    ''')
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.strip() == ''


def test_package_import_registers_everything_in_mmdet():
    """What a config's ``custom_imports=dict(imports=['efficientvit_det'])`` relies on."""
    from mmdet.registry import DATASETS, HOOKS, MODELS, TRANSFORMS

    import efficientvit_det  # noqa: F401
    for registry, name in ((MODELS, 'EfficientViT'), (MODELS, 'EfficientViTFPN'),
                           (DATASETS, 'SafeCocoDataset'), (HOOKS, 'NonFiniteLossHook'),
                           (HOOKS, 'InferenceOptimizationHook'),
                           (TRANSFORMS, 'RobustLoadImageFromFile')):
        assert registry.get(name) is not None, name


def test_mmengine_reads_local_checkpoints_through_the_project_loader(tmp_path, monkeypatch):
    """A Runner's load_from/resume and DetInferencer go through mmengine's CheckpointLoader:
    for local files that is the project's one loader."""
    from mmengine.runner.checkpoint import CheckpointLoader

    from efficientvit_det.checkpoint import safe_load
    calls = []
    real = safe_load.load_checkpoint_file
    monkeypatch.setattr(safe_load, 'load_checkpoint_file',
                        lambda path, map_location='cpu': calls.append(path) or real(path))
    path = str(tmp_path / 'w.pth')
    torch.save({'state_dict': {'a': torch.ones(1)}}, path)
    loaded = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    assert calls == [path] and torch.equal(loaded['state_dict']['a'], torch.ones(1))


def test_benchmarks_and_tools_run_the_same_inference_form(tmp_path, monkeypatch):
    """The detector benchmark's ``+auto`` model and ``tools/infer.py``'s model come from the
    same call with the same arguments, and end up as the same modules."""
    import benchmarks.detector as bench
    from efficientvit_det import apis, inference

    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
    from _workflow_common import write_tiny_config

    assert bench.prepare_inference is inference.prepare_inference is apis.prepare_inference
    calls = []

    def spy(model, precision='auto', deploy=True, log=True):
        calls.append((precision, deploy))
        return inference.prepare_inference(model, precision, deploy, log=False)

    monkeypatch.setattr(bench, 'prepare_inference', spy)
    monkeypatch.setattr(apis, 'prepare_inference', spy)
    cfg = write_tiny_config(tmp_path / 'tiny.py', tmp_path / 'data', size=64)
    bench_model, _ = bench.build_model(f'{cfg}+auto', torch.device('cpu'))
    assert calls == [('auto', True)]

    import cv2
    import numpy as np
    from mmdet.apis import DetInferencer
    img = tmp_path / 'img.png'
    cv2.imwrite(str(img), np.full((64, 64, 3), 128, np.uint8))
    ckpt = tmp_path / 'w.pth'
    torch.save({'state_dict': apis.init_detector(cfg, None, 'cpu').state_dict()}, ckpt)
    built = {}
    real_init = DetInferencer.__init__

    def keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built['model'] = self.model

    monkeypatch.setattr(DetInferencer, '__init__', keep)
    apis.detect_images(cfg, str(ckpt), [str(img)], str(tmp_path / 'out'), 'cpu',
                       show_progress=False)
    assert calls == [('auto', True), ('auto', True)]
    infer_types = [type(m).__name__ for m in built['model'].modules()]
    bench_types = [type(m).__name__ for m in bench_model.modules()]
    assert infer_types == bench_types
