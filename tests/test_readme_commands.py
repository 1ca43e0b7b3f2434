"""Every command and snippet of README.md and docs/*.md runs as written, as a user copies it.

Whatever the documents contain when the test runs is checked (nothing here names a command):

* fenced ```` ```bash ```` (or ``sh`` / ``shell``) blocks: one command per line (``\\``
  continues a line, ``#`` starts a comment). They run in order, per document, in a sandbox that
  stands for a fresh clone after the set-up commands (``make demo``): the repository's files, its
  ``.venv``, ``data/synthetic`` (a small copy: 8 train / 4 val images) and
  ``work_dirs/demo/epoch_8.pth`` (the demo config's model, random weights). A command must exit
  0 within :data:`TIMEOUT` seconds, except
  - commands that need what no checkout here can have (:data:`NEEDS_ABSENT`: COCO under
    ``data/coco/``, the released or ImageNet weights under ``checkpoints/``, the COCO configs'
    trained models): they may fail, but only with one line ``error: ...`` and exit status 2;
  - :data:`SKIP`: each pattern with the reason it cannot run here.
  Placeholders (:data:`PLACEHOLDERS`: ``CONFIG``, ``CHECKPOINT``, ...) stand for the demo's
  files; any other all-capitals word used as an argument is an error (write the command
  concretely or add the placeholder here).
* fenced ```` ```python ```` blocks: a block with an ``import`` runs as a script in the
  sandbox; one without is a config fragment: with a ``model`` it is merged into mmdet's own
  RetinaNet-R50 config (``mmdet::retinanet/retinanet_r50_fpn_1x_coco.py``) and the model is
  built, otherwise every ``type='...'`` it names must be registered.
* every command, fenced or inline (`` `python tools/...` ``), runs the project's interpreter,
  ``.venv/bin/python`` (a bare ``python`` lacks mmengine on a fresh machine).
* a shell block whose first line is a comment saying ``your own environment`` (e.g. installing
  into an existing mmdet environment, docs/install.md) is for another interpreter: it is
  neither run nor held to the ``.venv/bin/python`` rule.

Blocks without a language (outputs, trees) are not run.
"""
from __future__ import annotations

import ast
import glob
import os
import os.path as osp
import re
import shlex
import subprocess
import sys
import textwrap
from typing import List, NamedTuple

import pytest

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import DEMO_CONFIG, ROOT, make_dataset  # noqa: E402

DOCS = ['README.md'] + sorted(osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'docs',
                                                                                '*.md')))
SHELL = ('bash', 'sh', 'shell')
TIMEOUT = 240  # seconds per command: a longer one belongs in SKIP, with its duration

#: Commands that cannot run here, each with why; matched with re.search on the command.
SKIP = [
    (r'^make\b', 'the set-up commands themselves (CI runs make test; make demo trains '
                 'for 6 minutes)'),
    (r'scripts/setup_env\.sh', 'the environment set-up (CI runs it)'),
    (r'\bdist_(train|test)\.sh\b|\bslurm_train\.sh\b|\btorchrun\b',
     'starts several processes (GPUs or CPU DDP); tests/test_workflow_ddp.py runs CPU DDP'),
    (r'-m pytest\b', 'the test suite itself'),
    (r'-m benchmarks\b|benchmarks/run_all\.sh', 'benchmarks take minutes; '
                                               'tests/test_benchmark_tools.py runs each in a '
                                               'small form'),
    (r'tools/demo\.py', 'the demo: 6 minutes on 2 cores (make demo)'),
    (r'triton_compile_check\.py|gpu_validate\.py', 'compiles or runs GPU kernels (minutes, '
                                                   'or needs a GPU)'),
    (r'-m efficientvit_det\.datasets\.synthetic', 'writes the full 2200-image dataset the '
                                                  'sandbox stands in for (make demo does)'),
    (r'tools/train\.py\s+configs/mask_rcnn_efficientvit_m4_synthetic\.py',
     'about an hour on 2 cores (the config says so); tests/test_workflow_mask_rcnn.py trains '
     'it shrunk'),
    (r'^pip\b|\bpip install\b', 'installs packages'),
    (r'mmdet/\.mim/tools/|\$T/', "mmdet's own tools (their output is mmdet's, not this project's); "
                                 'tests/test_detector_matrix.py and test_workflow.py run them'),
    (r'^git\b', 'clones or changes the repository'),
    (r'^rm\b', "deletes the demo's outputs, which the sandbox stands in for (make demo remakes them)"),
]

#: May fail here, with one line ``error: ...`` and exit 2 (and may succeed).
NEEDS_ABSENT = (r'data/coco\b|\bcheckpoints/|configs/\w+_coco\.py|work_dirs/m4/|'
                r'work_dirs/\w+_coco/')

#: Placeholders a command may use, and what they stand for in the sandbox.
PLACEHOLDERS = {
    'CONFIG': 'configs/retinanet_efficientvit_m0_demo.py',
    'CHECKPOINT': 'work_dirs/demo/epoch_8.pth',
    'CKPT': 'work_dirs/demo/epoch_8.pth',
    'IMAGE': 'data/synthetic/train/000000.jpg',
    'IMAGES': 'data/synthetic/val',
    'WORK_DIR': 'work_dirs/docs_check',
    'PATH': 'work_dirs/demo/epoch_8.pth',
}
_SHELL_WORDS = {'PYTHON', 'GPUS', 'NNODES', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT',
                'MAX_JOBS', 'FORCE_CUDA', 'CUDA_HOME', 'TORCH_CUDA_ARCH_LIST', 'EVIT_CACHE',
                'OMP_NUM_THREADS', 'PYTHONPATH'}


class Snippet(NamedTuple):
    doc: str
    line: int
    lang: str
    text: str

    def where(self) -> str:
        return f'{self.doc}:{self.line}'


def fenced_blocks(doc: str) -> List[Snippet]:
    """The fenced code blocks of ``doc`` that carry a language."""
    blocks, lang, start, body = [], None, 0, []
    with open(osp.join(ROOT, doc)) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines, 1):
        m = re.match(r'^\s*```(\S*)\s*$', line)
        if m and lang is None:
            lang, start, body = m.group(1).lower(), i + 1, []
        elif m:
            if lang:
                blocks.append(Snippet(doc, start, lang, textwrap.dedent('\n'.join(body))))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def _strip_comment(line: str) -> str:
    """``cmd args  # comment`` -> ``cmd args`` (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if ch in '"\'' and quote in (None, ch):
            quote = None if quote else ch
        elif ch == '#' and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(block: Snippet) -> List[Snippet]:
    cmds, current, first = [], '', 0
    for offset, raw in enumerate(block.text.splitlines()):
        line = _strip_comment(raw)
        if not current:
            first = block.line + offset
        if line.endswith('\\'):
            current += line[:-1] + ' '
            continue
        current += line
        if current.strip():
            cmds.append(Snippet(block.doc, first, 'bash', ' '.join(current.split())))
        current = ''
    return cmds


def own_environment(block: Snippet) -> bool:
    """A shell block for the user's own environment (not this checkout's .venv)."""
    first = block.text.strip().splitlines()[0] if block.text.strip() else ''
    return first.startswith('#') and 'your own environment' in first


def all_commands(doc: str) -> List[Snippet]:
    return [c for b in fenced_blocks(doc) if b.lang in SHELL and not own_environment(b)
            for c in shell_commands(b)]


def skip_reason(cmd: str):
    return next((reason for pattern, reason in SKIP if re.search(pattern, cmd)), None)


def substitute(cmd: str) -> str:
    """Placeholders -> the sandbox's files; an unknown all-capitals argument is an error."""
    words = []
    for word in shlex.split(cmd):
        if word in PLACEHOLDERS:
            word = PLACEHOLDERS[word]
        elif re.fullmatch(r'[A-Z][A-Z0-9_]{2,}', word) and word not in _SHELL_WORDS:
            raise AssertionError(f'unknown placeholder {word!r} in {cmd!r}: write the command '
                                 'with real files, or add it to PLACEHOLDERS')
        words.append(word)
    return ' '.join(shlex.quote(w) if not re.fullmatch(r'[\w./=:,+-]+', w) else w
                    for w in words)


# ---------------------------------------------------------------------------------------------
# static checks (fast)
# ---------------------------------------------------------------------------------------------
_BARE_PYTHON = re.compile(r'(^|[\s;&|(`])python3?\s+(-m\s|-c\s|tools/|benchmarks/|\S+\.py)')


def test_documents_have_commands():
    assert 'README.md' in DOCS and len(DOCS) > 1
    assert any(all_commands(doc) for doc in DOCS)


@pytest.mark.parametrize('doc', DOCS)
def test_commands_use_the_project_python(doc):
    """``.venv/bin/python`` everywhere: a copied ``python tools/...`` fails on a fresh machine
    with ``No module named 'mmengine'``."""
    bad = [c.where() + ': ' + c.text for c in all_commands(doc) if _BARE_PYTHON.search(c.text)]
    with open(osp.join(ROOT, doc)) as f:
        text = re.sub(r'```.*?```', '', f.read(), flags=re.S)  # prose only
    for m in re.finditer(r'`([^`\n]+)`', text):
        if _BARE_PYTHON.search(m.group(1)):
            line = text[:m.start()].count('\n') + 1
            bad.append(f'{doc} (inline, near prose line {line}): {m.group(1)}')
    assert not bad, 'use .venv/bin/python:\n' + '\n'.join(bad)


@pytest.mark.parametrize('doc', DOCS)
def test_placeholders_are_known_and_python_blocks_parse(doc):
    for c in all_commands(doc):
        if not skip_reason(c.text):
            substitute(c.text)
    for b in fenced_blocks(doc):
        if b.lang == 'python':
            ast.parse(b.text, filename=b.where())


# ---------------------------------------------------------------------------------------------
# running them
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def sandbox(tmp_path_factory):
    """A fresh clone after the set-up commands, in small: the repository's files (links), its
    interpreter as .venv/bin/python, data/synthetic and work_dirs/demo/epoch_8.pth."""
    import torch

    from efficientvit_det.apis import init_detector
    from efficientvit_det.datasets.synthetic import CLASSES, PALETTE

    box = tmp_path_factory.mktemp('fresh_clone')
    for name in os.listdir(ROOT):
        if name not in ('.venv', '.git', 'data', 'work_dirs', 'outputs', 'vis', 'checkpoints') \
                and not name.startswith('.'):
            os.symlink(osp.join(ROOT, name), box / name)
    (box / '.venv' / 'bin').mkdir(parents=True)
    shim = box / '.venv' / 'bin' / 'python'
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    shim.chmod(0o755)
    make_dataset(box / 'data' / 'synthetic', num_train=8, num_val=4, size=128, seed=0)
    (box / 'work_dirs' / 'demo').mkdir(parents=True)
    model = init_detector(DEMO_CONFIG)
    torch.save({'meta': {'dataset_meta': {'classes': CLASSES, 'palette': list(PALETTE)},
                         'epoch': 8, 'iter': 2000},
                'state_dict': model.state_dict()}, box / 'work_dirs' / 'demo' / 'epoch_8.pth')
    return box


def _env(box) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    env['OMP_NUM_THREADS'] = '1'  # the 2 CI cores are shared; tiny models gain nothing
    env['HOME'] = os.environ.get('HOME', str(box))
    return env


def run_command(box, cmd: Snippet) -> None:
    reason = skip_reason(cmd.text)
    if reason:
        print(f'skip {cmd.where()}: {cmd.text}  ({reason})')
        return
    line = substitute(cmd.text)
    r = subprocess.run(['bash', '-c', line], cwd=box, env=_env(box), capture_output=True,
                       text=True, timeout=TIMEOUT)
    out = f'{cmd.where()}: {cmd.text}\n--- stdout ---\n{r.stdout[-4000:]}\n' \
          f'--- stderr ---\n{r.stderr[-4000:]}'
    if re.search(NEEDS_ABSENT, cmd.text) and r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ') \
            and 'Traceback' not in r.stdout, f'not a one-line error:\n{out}'
        print(f'ok (fails as expected here) {cmd.where()}: {lines[0]}')
        return
    assert r.returncode == 0, f'failed ({r.returncode}):\n{out}'
    print(f'ok {cmd.where()}: {cmd.text}')


def run_python(box, block: Snippet) -> None:
    tree = ast.parse(block.text)
    if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body):
        script = box / f'snippet_{osp.basename(block.doc)}_{block.line}.py'
        script.write_text(block.text)
        r = subprocess.run([str(box / '.venv' / 'bin' / 'python'), str(script)], cwd=box,
                           env=_env(box), capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, (f'{block.where()} (python snippet) failed:\n'
                                   f'{r.stderr[-4000:]}')
        return
    check_config_fragment(block, tree)


def check_config_fragment(block: Snippet, tree: ast.Module) -> None:
    """A config fragment: merged into mmdet's RetinaNet-R50 config when it has a model (and
    the model built), else its types must be registered."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
             if isinstance(t, ast.Name)}
    if 'model' in names:
        cfg = Config.fromstring("_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']\n"
                                + block.text, '.py')
        init_default_scope('mmdet')
        try:
            MODELS.build(cfg.model)
        except Exception as exc:
            raise AssertionError(f'{block.where()}: the snippet merged into mmdet\'s '
                                 f'RetinaNet-R50 config does not build: {exc}') from None
        return
    import mmdet.registry as regs
    from mmengine.registry import Registry
    registries = [r for r in vars(regs).values() if isinstance(r, Registry)]
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == 'type' and \
                isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            name = node.value.value
            assert any(r.get(name) is not None for r in registries), \
                f'{block.where()}: type {name!r} is not registered'


@pytest.mark.parametrize('doc', DOCS)
def test_document_runs_as_written(doc, sandbox):
    import efficientvit_det  # noqa: F401  (registers the project's types for the fragments)

    for block in fenced_blocks(doc):
        if block.lang in SHELL and own_environment(block):
            print(f'skip {block.where()}: a block for the user\'s own environment')
        elif block.lang in SHELL:
            assignments = []  # NAME=value lines hold for the rest of their block
            for cmd in shell_commands(block):
                if re.fullmatch(r'[A-Za-z_]\w*=\S+', cmd.text):
                    assignments.append(cmd.text)
                    continue
                run_command(sandbox, cmd._replace(text=' '.join([*assignments, cmd.text])))
        elif block.lang == 'python':
            run_python(sandbox, block)
