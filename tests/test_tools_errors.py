"""What a user who gets an input wrong sees from tools/infer.py, tools/test.py and tools/train.py:
one line ``error: ...`` on stderr, exit status 2, no traceback, before anything heavy runs
(efficientvit_det.cli's contract), for a checkpoint that does not fit the config (arch, number
of classes), a missing file, an unsafe pickle and a broken image; and what they see on the happy
path's edges (a broken image in a folder is skipped and named, --resume with nothing to resume
or on a finished run says so). The tools run as subprocesses, as users run them.

The one-line messages themselves are checked in-process (fast) in the second half.
"""
import os
import os.path as osp
import sys

import pytest
import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import FLAGSHIP_CONFIG, PY, TOOLS, make_dataset, run, write_tiny_config  # noqa: E402

CLASSES = ('circle', 'square', 'triangle', 'star', 'ring', 'cross')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A tiny dataset, the m0 test config, its checkpoint (random weights, Runner layout), an
    m1 / 3-class variant of the config, an unsafe pickle and broken images."""
    from efficientvit_det.apis import init_detector

    base = tmp_path_factory.mktemp('tools_errors')
    data = make_dataset(base / 'data', num_train=4, num_val=2, size=64, seed=0)
    cfg = write_tiny_config(base / 'tiny.py', data, size=64, max_epochs=1, batch_size=2)
    m1 = base / 'tiny_m1.py'
    m1.write_text("_base_ = ['tiny.py']\nmodel = dict(backbone=dict(arch='m1'), neck=dict("
                  "in_channels=[128, 144, 192]), bbox_head=dict(num_classes=3))\n")
    ckpt = base / 'm0.pth'
    model = init_detector(cfg)
    torch.save({'meta': {'dataset_meta': {'classes': CLASSES}, 'epoch': 1, 'iter': 2},
                'state_dict': model.state_dict()}, ckpt)
    unsafe = base / 'unsafe.pth'
    torch.save({'state_dict': model.state_dict(), 'hook': os.system}, unsafe)
    broken = base / 'broken'
    broken.mkdir()
    good = osp.join(data, 'val', '000000.jpg')
    with open(good, 'rb') as f:
        jpeg = f.read()
    (broken / 'a_good.jpg').write_bytes(jpeg)
    (broken / 'b_truncated.jpg').write_bytes(jpeg[:len(jpeg) // 2])
    (broken / 'c_empty.jpg').write_bytes(b'')
    return dict(base=base, data=data, cfg=cfg, m1=str(m1), ckpt=str(ckpt), unsafe=str(unsafe),
                broken=str(broken), good=good)


def tool(name, *args, **kw):
    return run([PY, osp.join(TOOLS, name), *map(str, args)], check=False, **kw)


def one_line_error(r, *fragments):
    """Exit 2, stderr is exactly one ``error: ...`` line containing ``fragments``, and no
    traceback anywhere."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    assert 'Traceback' not in r.stdout + r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# a checkpoint that does not fit the config
# ---------------------------------------------------------------------------------------------
def test_infer_refuses_a_checkpoint_of_another_arch_and_classes(setup):
    """The issue's case: an m0 / 6-class checkpoint with the m4 / 80-class COCO config."""
    r = tool('infer.py', FLAGSHIP_CONFIG, setup['ckpt'], setup['good'],
             '--out-dir', setup['base'] / 'out_mismatch')
    line = one_line_error(r, 'backbone arch m0', 'm4 (embed_dims 128/256/384',
                          '6 classes in the checkpoint (circle, square', '80 in the config',
                          '--no-strict')
    assert len(line) < 1000
    assert not (setup['base'] / 'out_mismatch' / 'detections.json').exists()


def test_test_refuses_a_checkpoint_of_another_arch(setup):
    r = tool('test.py', FLAGSHIP_CONFIG, setup['ckpt'], '--work-dir', setup['base'] / 'wt')
    one_line_error(r, 'backbone arch m0', 'in the config')


def test_train_refuses_load_from_of_another_arch_unless_no_strict(setup):
    r = tool('train.py', setup['m1'], '--work-dir', setup['base'] / 'w_m1', '--cfg-options',
             f'load_from={setup["ckpt"]}')
    one_line_error(r, 'load_from', 'backbone arch m0', 'm1 (embed_dims 128/144/192',
                   '6 classes in the checkpoint', '3 in the config', '--no-strict')
    assert not osp.exists(setup['base'] / 'w_m1')  # stopped before the Runner was built


# ---------------------------------------------------------------------------------------------
# missing files
# ---------------------------------------------------------------------------------------------
def test_infer_missing_checkpoint_and_image(setup):
    one_line_error(tool('infer.py', setup['cfg'], setup['base'] / 'nope.pth', setup['good']),
                   'nope.pth')
    one_line_error(tool('infer.py', setup['cfg'], setup['ckpt'], setup['base'] / 'nope.jpg'),
                   'input not found', 'nope.jpg')


def test_test_missing_checkpoint_and_annotations(setup):
    one_line_error(tool('test.py', setup['cfg'], setup['base'] / 'nope.pth'), 'nope.pth')
    r = tool('test.py', setup['cfg'], setup['ckpt'], '--work-dir', setup['base'] / 'w_ann',
             '--cfg-options', f'test_dataloader.dataset.data_root={setup["base"]}/nodata/')
    one_line_error(r, 'test annotation file not found', 'nodata/annotations/instances_val.json',
                   'test_dataloader.dataset.data_root')


def test_train_missing_annotations_and_pretrained_backbone(setup):
    r = tool('train.py', FLAGSHIP_CONFIG, '--work-dir', setup['base'] / 'w_coco')
    one_line_error(r, 'train annotation file not found', 'instances_train2017.json')
    assert not osp.exists(setup['base'] / 'w_coco')
    r = tool('train.py', setup['cfg'], '--work-dir', setup['base'] / 'w_pre', '--cfg-options',
             "model.backbone.init_cfg.type=Pretrained",
             'model.backbone.init_cfg.checkpoint=checkpoints/efficientvit_m0.pth')
    one_line_error(r, 'backbone checkpoint not found: checkpoints/efficientvit_m0.pth',
                   '--cfg-options model.backbone.init_cfg.checkpoint=')


# ---------------------------------------------------------------------------------------------
# unsafe pickles
# ---------------------------------------------------------------------------------------------
def test_unsafe_pickle_is_refused_in_one_line_by_every_tool(setup):
    for r in (tool('infer.py', setup['cfg'], setup['unsafe'], setup['good']),
              tool('test.py', setup['cfg'], setup['unsafe']),
              tool('train.py', setup['cfg'], '--work-dir', setup['base'] / 'w_unsafe',
                   '--resume', setup['unsafe'])):
        line = one_line_error(r, 'refused to load', 'unsafe.pth')
        assert 'weights_only=False' not in line  # torch's advice is not repeated


# ---------------------------------------------------------------------------------------------
# broken images
# ---------------------------------------------------------------------------------------------
def test_infer_skips_and_names_a_broken_image_in_a_folder(setup):
    out = setup['base'] / 'out_broken'
    r = tool('infer.py', setup['cfg'], setup['ckpt'], setup['broken'], '--out-dir', out,
             '--device', 'cpu')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith('skipped ')]
    assert len(skipped) == 2, r.stderr
    assert 'b_truncated.jpg' in skipped[0] and 'c_empty.jpg: zero-byte file' in skipped[1]
    assert os.listdir(out / 'vis') == ['a_good.jpg']
    assert f'detections:      {out / "detections.json"}' in r.stdout
    # nothing readable at all: one line
    one_line_error(tool('infer.py', setup['cfg'], setup['ckpt'],
                        osp.join(setup['broken'], 'c_empty.jpg')), 'none of the 1 input images',
                   'c_empty.jpg')


def test_test_stops_in_one_line_naming_a_broken_image(setup, tmp_path):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(setup['data'], data)
    (data / 'val' / '000001.jpg').write_bytes(b'not an image at all')
    r = tool('test.py', setup['cfg'], setup['ckpt'], '--work-dir', tmp_path / 'w',
             '--cfg-options', f'test_dataloader.dataset.data_root={data}/',
             f'test_evaluator.ann_file={data}/annotations/instances_val.json')
    one_line_error(r, 'cannot load image', '000001.jpg')


def test_train_skips_a_broken_training_image_and_resume_with_nothing_to_resume(setup, tmp_path):
    """Training skips an unreadable image with a warning naming it (docs/robustness.md) and
    goes on; --resume in an empty work dir says so instead of 'Auto resumed ... None'."""
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(setup['data'], data)
    (data / 'train' / '000001.jpg').write_bytes(b'')
    work = tmp_path / 'w'
    r = tool('train.py', setup['cfg'], '--work-dir', work, '--resume', '--no-validate',
             '--cfg-options', f'train_dataloader.dataset.data_root={data}/')
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'--resume: nothing to resume in {work}' in r.stdout
    assert 'Auto resumed' not in r.stdout + r.stderr
    assert '000001.jpg' in r.stdout + r.stderr and 'zero-byte' in r.stdout + r.stderr
    assert 'Config:' not in r.stdout  # the config dump stays in the log file
    assert 'iter 2/2' in r.stdout and f'checkpoint:      {work / "epoch_1.pth"}' in r.stdout
    logs = [osp.join(dp, f) for dp, _, fs in os.walk(work) for f in fs if f.endswith('.log')]
    assert len(logs) == 1 and 'Config:' in open(logs[0]).read()

    # resuming the finished run: says it is finished, trains nothing
    r = tool('train.py', setup['cfg'], '--work-dir', work, '--resume', '--no-validate',
             '--cfg-options', f'train_dataloader.dataset.data_root={data}/')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'nothing to resume' in r.stdout and 'epoch 1 of 1' in r.stdout
    assert len([d for d in os.listdir(work) if osp.isdir(work / d)]) == 1  # no new run


# ---------------------------------------------------------------------------------------------
# the messages, in-process
# ---------------------------------------------------------------------------------------------
def test_mismatch_message_names_arch_classes_and_key_groups(setup):
    from efficientvit_det.apis import build_detector, load_config
    from efficientvit_det.checkpoint.detector import checkpoint_mismatch

    m0 = torch.load(setup['ckpt'], weights_only=True)
    assert checkpoint_mismatch(build_detector(load_config(setup['cfg'])), m0) is None
    msg = checkpoint_mismatch(build_detector(load_config(setup['m1'])), m0, 'm0.pth')
    assert msg.startswith('m0.pth does not fit the model: backbone arch m0 (embed_dims '
                          '64/128/192, depths 1/2/3) in the checkpoint, m1 (embed_dims '
                          '128/144/192, depths 1/2/3) in the config; 6 classes in the '
                          'checkpoint (circle, square, triangle, star, ring, cross), 3 in the '
                          'config; '), msg
    assert '\n' not in msg

    # missing / unexpected keys, summarised by prefix
    sd = dict(m0['state_dict'])
    for k in [k for k in sd if k.startswith('bbox_head.retina_reg')]:
        del sd[k]
    sd['neck.extra.weight'] = torch.zeros(1)
    msg = checkpoint_mismatch(build_detector(load_config(setup['cfg'])), {'state_dict': sd})
    assert '2 tensors missing from the checkpoint: bbox_head.retina_reg.* (2)' in msg
    assert '1 unexpected tensors in the checkpoint: neck.extra.* (1)' in msg


def test_no_strict_loads_the_tensors_that_fit(setup):
    from efficientvit_det.apis import init_detector
    from efficientvit_det.checkpoint.detector import CheckpointMismatchError

    three = write_classes(setup, 3)
    with pytest.raises(CheckpointMismatchError, match='6 classes in the checkpoint'):
        init_detector(three, setup['ckpt'])
    model = init_detector(three, setup['ckpt'], strict=False)
    m0 = torch.load(setup['ckpt'], weights_only=True)['state_dict']
    key = 'backbone.patch_embed.conv1.conv.weight'
    assert torch.equal(model.state_dict()[key], m0[key])
    assert model.state_dict()['bbox_head.retina_cls.weight'].shape[0] == 9 * 3


def write_classes(setup, n):
    path = setup['base'] / f'tiny_{n}cls.py'
    path.write_text(f"_base_ = ['tiny.py']\nmodel = dict(bbox_head=dict(num_classes={n}))\n")
    return str(path)


def test_run_tool_one_line_and_exit_codes(capsys):
    from efficientvit_det.cli import UserInputError, run_tool

    def bad(argv):
        raise UserInputError('first line\nsecond line')

    assert run_tool(bad) == 2
    assert capsys.readouterr().err == 'error: first line second line\n'

    def from_worker(argv):  # DataLoader workers re-raise with the worker's traceback text
        from efficientvit_det.datasets.robust_loading import ImageLoadError
        raise ImageLoadError('Caught ImageLoadError in DataLoader worker process 0.\n'
                             'Original Traceback (most recent call last):\n  File "x.py"\n'
                             'efficientvit_det.datasets.robust_loading.ImageLoadError: '
                             'cannot load image a.jpg: zero-byte file\n')

    assert run_tool(from_worker) == 2
    assert capsys.readouterr().err == 'error: cannot load image a.jpg: zero-byte file\n'
    assert run_tool(lambda argv: 3) == 3 and run_tool(lambda argv: {'a': 1}) == 0
