"""Benchmarks of efficientvit_det on CPU or CUDA (``--device auto|cpu|cuda``).

    python tools/benchmark.py attention  [...]   # the fused cascaded-group-attention op
    python tools/benchmark.py backbone   [...]   # backbone vs timm eager, same weights
    python tools/benchmark.py detector   [...]   # RetinaNet end-to-end per image vs R50
    python tools/benchmark.py train-step [...]   # training step time and peak memory
    python tools/benchmark.py flops      [...]   # params and FLOPs (MACs), no dataset
    python tools/benchmark.py onnx       [...]   # onnxruntime vs PyTorch latency (CPU)

``python tools/benchmark.py SUBCOMMAND -h`` lists each one's options. Every timing
sub-command warms up (a full pass of the largest case first, for the allocator), times the
competitors interleaved in one process, reports median and spread, prints a progress line
on stderr and writes ``--json FILE``.
"""
import os.path as osp
import sys

_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, _ROOT)

COMMANDS = {
    'attention': ('efficientvit_det.benchmarks.attention', 'main'),
    'backbone': ('efficientvit_det.benchmarks.backbone', 'main'),
    'detector': ('efficientvit_det.benchmarks.detector', 'main_inference'),
    'train-step': ('efficientvit_det.benchmarks.detector', 'main_train'),
    'flops': ('efficientvit_det.benchmarks.flops', 'main'),
    'onnx': ('efficientvit_det.benchmarks.onnx_latency', 'main'),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f'unknown sub-command {cmd!r}; choose from {", ".join(COMMANDS)}', file=sys.stderr)
        return 2
    import importlib
    mod_name, fn_name = COMMANDS[cmd]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name != mod_name:
            raise
        print(f'{cmd}: {mod_name} is not available in this checkout', file=sys.stderr)
        return 2
    sys.argv[0] = f'{osp.basename(__file__)} {cmd}'
    getattr(mod, fn_name)(rest)
    return 0


if __name__ == '__main__':
    sys.exit(main())
