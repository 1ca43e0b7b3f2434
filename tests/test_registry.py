"""Registration: import registers; custom_imports works; mmdet's register_all_modules coexists."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str, tmp_path) -> str:
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_registers_and_register_all_modules_coexists(tmp_path):
    out = run_python('''
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        import efficientvit_det
        register_all_modules()
        assert 'EfficientViT' in MODELS.module_dict and 'EfficientViTFPN' in MODELS.module_dict
        b = MODELS.build(dict(type='EfficientViT', arch='m0'))
        r = MODELS.build(dict(type='ResNet', depth=18))
        print(type(b).__name__, type(r).__name__)
    ''', tmp_path)
    assert out.split() == ['EfficientViT', 'ResNet']


def test_custom_imports_in_a_config(tmp_path):
    (tmp_path / 'cfg.py').write_text(textwrap.dedent('''
        custom_imports = dict(imports=['efficientvit_det'], allow_failed_imports=False)
        model = dict(type='EfficientViT', arch='m1', out_indices=(2, 3, 4))
    '''))
    out = run_python('''
        import sys
        from mmengine.config import Config
        from mmdet.registry import MODELS
        assert 'efficientvit_det' not in sys.modules
        cfg = Config.fromfile('cfg.py')
        print(MODELS.build(cfg.model).out_channels)
    ''', tmp_path)
    assert out.strip() == '[128, 144, 192]'
