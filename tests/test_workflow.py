"""End-to-end workflow on a tiny generated dataset, through the real command-line tools:
train -> checkpoint -> test (COCO metric, --out, --show-dir) -> infer (files written);
kill + --resume; mmdet's own tools/train.py running our config."""
import json
import os
import os.path as osp
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import PY, ROOT, TOOLS, load_ckpt, make_dataset, run, write_tiny_config  # noqa: E402


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp('workflow')
    data = make_dataset(base / 'data', num_train=16, num_val=6, size=128, seed=0)
    cfg = write_tiny_config(base / 'tiny.py', data, size=128, max_epochs=1, batch_size=4)
    return base, data, cfg


def test_train_test_infer(tiny):
    base, data, cfg = tiny
    work = base / 'work'
    r = run([PY, osp.join(TOOLS, 'train.py'), cfg, '--work-dir', work])
    ckpt = work / 'epoch_1.pth'
    assert ckpt.is_file(), r.stdout[-3000:]
    state = load_ckpt(str(ckpt))
    assert state['meta']['epoch'] == 1 and state['meta']['iter'] == 4  # 16 images / 4
    assert state['meta']['dataset_meta']['classes'][0] == 'circle'
    assert any('attention_biases' in k for k in state['state_dict'])

    # test: COCO metric, predictions pickle, visualisations
    out_pkl, show = base / 'res.pkl', base / 'show'
    r = run([PY, osp.join(TOOLS, 'test.py'), cfg, ckpt, '--work-dir', base / 'test',
             '--out', out_pkl, '--show-dir', show, '--cfg-options',
             'model.test_cfg.score_thr=0.0'])  # an untrained model: keep low scores
    text = r.stdout + r.stderr
    m = re.search(r'coco/bbox_mAP: ([\d.]+)\s+coco/bbox_mAP_50: ([\d.]+)\s+'
                  r'coco/bbox_mAP_75: ([\d.]+)', text)
    assert m, text[-3000:]
    assert all(0.0 <= float(v) <= 1.0 for v in m.groups())
    with open(out_pkl, 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 6
    assert {'img_id', 'pred_instances'} <= set(preds[0])
    assert preds[0]['pred_instances']['bboxes'].shape[1] == 4
    assert sorted(os.listdir(show)) == [f'{i:06d}.jpg' for i in range(6)]

    # inference: a folder in -> visualisations + JSON out
    out_dir = base / 'infer'
    run([PY, osp.join(TOOLS, 'infer.py'), cfg, ckpt, osp.join(data, 'val'),
         '--out-dir', out_dir, '--device', 'auto', '--score-thr', '0.0',
         '--cfg-options', 'model.test_cfg.score_thr=0.0'])
    assert sorted(os.listdir(out_dir / 'vis')) == [f'{i:06d}.jpg' for i in range(6)]
    with open(out_dir / 'detections.json') as f:
        dets = json.load(f)
    assert [osp.basename(d['image']) for d in dets] == [f'{i:06d}.jpg' for i in range(6)]
    assert dets[0]['width'] == 128 and dets[0]['detections']
    d0 = dets[0]['detections'][0]
    assert set(d0) == {'bbox', 'score', 'label', 'class'} and len(d0['bbox']) == 4
    assert d0['class'] in ('circle', 'square', 'triangle', 'star', 'ring', 'cross')

    # explicit devices: cpu works, cuda is refused with a clear message on this machine
    import torch
    if not torch.cuda.is_available():
        r = run([PY, osp.join(TOOLS, 'infer.py'), cfg, ckpt, osp.join(data, 'val',
                 '000000.jpg'), '--out-dir', base / 'infer_cuda', '--device', 'cuda'],
                check=False)
        assert r.returncode != 0 and 'CUDA is not available' in r.stderr


def _wait_for(path, proc, timeout):
    t0 = time.time()
    while not osp.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f'training exited ({proc.returncode}) before {path}')
        if time.time() - t0 > timeout:
            raise AssertionError(f'no {path} after {timeout} s')
        time.sleep(0.1)


def test_kill_and_resume(tmp_path):
    data = make_dataset(tmp_path / 'data', num_train=20, num_val=2, size=64, seed=1)
    # 3 epochs x 10 iterations (batch 2); no validation
    cfg = write_tiny_config(tmp_path / 'tiny.py', data, size=64, max_epochs=3, batch_size=2,
                            extra='''
        val_cfg = None
        val_dataloader = None
        val_evaluator = None
        default_hooks = dict(checkpoint=dict(max_keep_ckpts=5))
        ''')
    work = tmp_path / 'work'
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(tmp_path / 'first.log', 'w')
    proc = subprocess.Popen([PY, osp.join(TOOLS, 'train.py'), cfg, '--work-dir', str(work)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for(str(work / 'epoch_1.pth'), proc, timeout=240)
        _wait_for(str(work / 'last_checkpoint'), proc, timeout=30)
        os.killpg(proc.pid, signal.SIGKILL)  # the run dies hard, mid epoch 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    with open(work / 'last_checkpoint') as f:
        last = f.read().strip()
    k = int(re.search(r'epoch_(\d+)\.pth', last).group(1))
    assert k < 3, 'the first run finished before it could be killed'
    assert not (work / 'epoch_3.pth').exists()

    # --resume without a path: from work_dir/last_checkpoint (--verbose: mmengine's log lines)
    r = run([PY, osp.join(TOOLS, 'train.py'), cfg, '--work-dir', work, '--resume', '--verbose'])
    text = r.stdout + r.stderr
    assert f'resuming from {last}' in text, text[-3000:]
    assert f'resumed epoch: {k}, iter: {10 * k}' in text
    assert f'Epoch(train) [{k + 1}]' in text
    assert 'Epoch(train) [1]' not in text  # did not start over
    final = load_ckpt(str(work / 'epoch_3.pth'))
    assert final['meta']['epoch'] == 3 and final['meta']['iter'] == 30
    # optimizer (AdamW step counts) and schedulers came back with the checkpoint
    steps = [s['step'] for s in final['optimizer']['state'].values()]
    assert float(max(steps)) == 30

    # --resume PATH: from a given checkpoint
    r = run([PY, osp.join(TOOLS, 'train.py'), cfg, '--work-dir', tmp_path / 'work2',
             '--resume', work / 'epoch_2.pth', '--verbose'])
    text = r.stdout + r.stderr
    assert 'resumed epoch: 2, iter: 20' in text, text[-3000:]
    assert load_ckpt(str(tmp_path / 'work2' / 'epoch_3.pth'))['meta']['iter'] == 30

    r = run([PY, osp.join(TOOLS, 'train.py'), cfg, '--resume', tmp_path / 'missing.pth'],
            check=False)
    assert r.returncode != 0 and 'no checkpoint' in r.stderr


def test_mmdet_own_train_tool_runs_our_config(tiny):
    import mmdet
    base, data, cfg = tiny
    mmdet_train = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py')
    assert osp.isfile(mmdet_train)
    work = base / 'work_mmdet'
    # run from outside the repository: only the installed package and custom_imports
    env = {'PYTHONPATH': ''}
    run([PY, mmdet_train, cfg, '--work-dir', work, '--cfg-options', 'val_cfg=None',
         'val_dataloader=None', 'val_evaluator=None'], env=env, cwd=str(base))
    state = load_ckpt(str(work / 'epoch_1.pth'))
    assert state['meta']['iter'] == 4
    assert any(k.startswith('backbone.') for k in state['state_dict'])
