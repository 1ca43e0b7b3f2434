"""``tools/gpu_validate.py --smoke``: every step of the GPU validation at tiny sizes on the CPU
(Triton interpreter), so the one command for a GPU machine keeps working between GPU runs."""
import json
import os.path as osp
import sys

import pytest

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import PY, TOOLS, run  # noqa: E402

STEPS = ['environment', 'compile', 'tests', 'accuracy', 'attention', 'train', 'inference']


def test_gpu_validate_smoke(tmp_path):
    pytest.importorskip('triton.backends.nvidia')
    r = run([PY, osp.join(TOOLS, 'gpu_validate.py'), '--smoke', '--out', tmp_path],
            timeout=900, check=False)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-6000:]
    report = json.loads((tmp_path / 'gpu_validate.json').read_text())
    assert report['smoke'] and report['ok'] and list(report['steps']) == STEPS
    steps = report['steps']
    assert steps['compile']['kernels'] == 1 and steps['compile']['spill_bytes'] == 0
    acc = {r['dtype']: r for r in steps['accuracy']['rows']}
    assert set(acc) == {'fp32', 'fp16'} and all(r['ok'] for r in acc.values())
    assert all(c['equal_losses'] for c in steps['train']['checks'].values())
    assert set(steps['inference']['ms_per_image']) == {'fp32', 'bf16'}
    table = (tmp_path / 'gpu_validate.md').read_text()
    for name in STEPS:
        assert f'| {name} | ok |' in table
