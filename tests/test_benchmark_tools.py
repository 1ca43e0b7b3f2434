"""The benchmark and FLOPs tools run end to end at tiny sizes (1 repeat) and report what they
promise: JSON fields, equal outputs across variants, exact FLOP counts. No timing assertions."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import backbone, common, detector, flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread: on a loaded 2-core machine, tiny ops with 2 OpenMP threads wait on descheduled
# threads (x10 slower); results are the same.
TINY = ['--repeats', '1', '--warmup', '0', '--quiet', '--device', 'cpu', '--threads', '1']
STATS = {'n', 'median_ms', 'mean_ms', 'q1_ms', 'q3_ms', 'iqr_ms', 'min_ms', 'max_ms', 'samples_ms'}


def load(path):
    with open(path) as f:
        return json.load(f)


def test_summarize_and_interleaving():
    s = common.summarize([0.004, 0.001, 0.003, 0.002])
    assert set(s) == STATS
    assert s['median_ms'] == pytest.approx(2.5) and s['min_ms'] == pytest.approx(1.)
    assert s['q1_ms'] == pytest.approx(1.75) and s['q3_ms'] == pytest.approx(3.25)
    calls = []
    stats = common.time_interleaved({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')},
                                    repeats=2, warmup=1, device=torch.device('cpu'))
    assert calls == ['a', 'b', 'a', 'b', 'b', 'a']  # warm-up, then rotating order
    assert stats['a']['n'] == stats['b']['n'] == 2


def test_peak_memory_cpu_sees_a_64mb_tensor():
    mem = common.peak_memory(lambda: torch.ones(16 * 2**20).add_(1), torch.device('cpu'))
    assert mem['peak_mb'] >= mem['base_mb'] and mem['peak_delta_mb'] > 40


def test_dispatcher():
    cmd = [sys.executable, '-m', 'benchmarks']  # from the repository root, as documented
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    for name in ('attention', 'backbone', 'detector', 'train-step', 'flops', 'engines'):
        assert name in out.stdout
    bad = subprocess.run([*cmd, 'nope'], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and 'unknown sub-command' in bad.stderr


def test_backbone_variants_equal_outputs(tmp_path):
    out = tmp_path / 'bb.json'
    backbone.main(['--arch', 'm4', '--inputs', '1x64x96', '2x72x72',
                   '--variants', 'timm', 'module', 'fused', 'deploy', 'deploy+cl', 'onnx',
                   '--json', str(out), *TINY])
    d = load(out)
    assert d['benchmark'] == 'backbone' and d['baseline'] == 'timm'
    assert {'cpu', 'cpu_count', 'torch', 'torch_threads'} <= set(d['machine'])
    assert len(d['results']) == 2 * 6
    assert {r['variant'] for r in d['results']} >= {'deploy+cl', 'onnx'}
    for r in d['results']:
        assert STATS <= set(r)
        assert {'input', 'variant', 'imgs_per_s', 'speedup_vs_baseline',
                'max_rel_err_vs_baseline', 'outputs_equal', 'output_shapes'} <= set(r)
        assert r['max_rel_err_vs_baseline'] < 1e-4, r
    assert d['all_outputs_equal']
    # stride 16/32/64 maps of a 64x96 input, m4 channels
    assert d['results'][0]['output_shapes'] == [[1, 128, 4, 6], [1, 256, 2, 3], [1, 384, 1, 2]]
    assert {f['input'] for f in d['fastest']} == {'1x64x96', '2x72x72'}
    with pytest.raises(argparse.ArgumentTypeError, match='not for onnx'):
        backbone.parse_variant('onnx+cl')


def test_detector_end_to_end_and_parts(tmp_path):
    out = tmp_path / 'det.json'
    detector.main_inference(['--models', 'm4', 'm4+deploy', 'r50', '--shape', '64', '96',
                             '--test-scale', '96', '64', '--json', str(out), *TINY])
    d = load(out)
    assert d['benchmark'] == 'detector' and d['all_outputs_equal']
    by_model = {r['model']: r for r in d['results']}
    assert set(by_model) == {'m4', 'm4+deploy', 'r50'}
    for r in d['results']:
        assert STATS <= set(r['e2e'])
        assert set(r['parts']) == set(detector.PARTS)
        assert r['input_shape'] == [1, 3, 64, 96]  # 64x96 kept, already a multiple of 32
        assert r['manual_vs_e2e_max_rel_err'] < 1e-4
        assert 'speedup_vs_r50' in r
    assert by_model['m4+deploy']['head_outputs_vs'] == 'm4'
    assert by_model['m4+deploy']['head_outputs_max_rel_err'] < 1e-4


def test_train_step_time_and_memory(tmp_path, capfd):
    out = tmp_path / 'train.json'
    detector.main_train(['--models', 'm4', 'm4+module', '--batch', '1', '--shape', '64', '64',
                         '--memory-steps', '1', '--json', str(out), *TINY])
    printed = capfd.readouterr()
    # the table, not mmengine's per-parameter init_weights log (it printed thousands of lines)
    assert 'init_weights' not in printed.out + printed.err and '| model' in printed.out
    d = load(out)
    assert d['benchmark'] == 'train-step' and d['all_losses_finite']
    for r in d['results']:
        assert STATS <= set(r['step'])
        assert r['imgs_per_s'] > 0 and r['trainable_params'] > 0
        mem = r['memory']  # measured in a fresh subprocess
        assert {'method', 'peak_mb', 'peak_delta_mb', 'steps', 'losses'} <= set(mem)
        assert mem['peak_delta_mb'] > 0
    # same weights and data: the fused attention trains like the reference
    a, b = (r['losses'][0] for r in d['results'])
    assert a == pytest.approx(b, rel=1e-4)


def test_flops_match_paper_and_hand_count(tmp_path):
    torch.set_num_threads(1)  # the jit traces run the model; tiny ops (see TINY)
    out = tmp_path / 'flops.json'
    flops.main(['--arch', 'm4', '--shape', '224', '224', '--detector', 'm4', '--json', str(out)])
    d = load(out)
    (bb,) = d['backbones']
    cls = bb['classification']
    assert abs(cls['params_rel_diff']) < 0.01  # 8.8M with the 1000-class head
    assert abs(cls['macs_rel_diff']) < 0.02  # 299M
    assert cls['macs'] == cls['macs_hand']  # analyzer == closed form, exactly
    assert cls['macs_by_operator']['matmul'] > 0  # attention matmuls counted
    det = bb['detection_backbone']
    assert det['macs'] == det['macs_hand'] and det['macs'] > cls['macs']  # padded windows
    (dd,) = d['detectors']
    assert set(dd['parts']) == {'backbone', 'neck', 'heads'}
    assert dd['parts']['backbone']['macs'] == det['macs']
    assert dd['macs'] == sum(p['macs'] for p in dd['parts'].values())


@pytest.mark.parametrize('arch', flops.ARCHS)
def test_hand_count_of_every_arch_is_close_to_the_paper(arch):
    macs = flops.hand_count_macs(arch, 224, 224, classifier=True, window='classification')
    assert abs(macs['total'] / (flops.PAPER[arch]['flops_m'] * 1e6) - 1) < 0.02


def test_flops_subcommand_help():
    out = subprocess.run([sys.executable, '-m', 'benchmarks', 'flops', '-h'],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and '--shape' in out.stdout and '--detector' in out.stdout


def test_attention_subcommand_is_routed(tmp_path):
    from benchmarks.__main__ import main
    out = tmp_path / 'attn.json'
    assert main(['attention', '--stages', 'stage3', '--cases', 'reference,fused',
                      '--no-compile', '--no-backward', '--no-memory', '--json', str(out),
                      *TINY]) == 0
    assert 'stage3/fp32/B1' in load(out)['stages']


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
