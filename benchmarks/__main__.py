"""Benchmarks of efficientvit_det on CPU or CUDA (``--device auto|cpu|cuda``).

    python -m benchmarks attention  [...]   # the fused cascaded-group-attention op
    python -m benchmarks attention-cpu-bf16 [...]  # its C++ kernel: bfloat16 vs float32
    python -m benchmarks backbone   [...]   # backbone vs timm eager, same weights
    python -m benchmarks detector   [...]   # RetinaNet end-to-end per image vs R50
    python -m benchmarks train-step [...]   # training step time and peak memory
    python -m benchmarks flops      [...]   # params and FLOPs (MACs), no dataset
    python -m benchmarks engines    [...]   # CPU engines: PyTorch, onnxruntime, OpenVINO; fp32, int8

``python -m benchmarks SUBCOMMAND -h`` lists each one's options. Every timing
sub-command warms up (a full pass of the largest case first, for the allocator), times the
competitors interleaved in one process, reports median and spread, prints a progress line
on stderr and writes ``--json FILE``.
"""
import importlib
import sys

COMMANDS = {
    'attention': ('benchmarks.attention', 'main'),
    'attention-cpu-bf16': ('benchmarks.cga_cpu_bf16', 'main'),
    'backbone': ('benchmarks.backbone', 'main'),
    'detector': ('benchmarks.detector', 'main_inference'),
    'train-step': ('benchmarks.detector', 'main_train'),
    'flops': ('benchmarks.flops', 'main'),
    'engines': ('benchmarks.engines', 'main'),
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
    mod_name, fn_name = COMMANDS[cmd]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name != mod_name:
            raise
        print(f'{cmd}: {mod_name} is not available in this checkout', file=sys.stderr)
        return 2
    sys.argv[0] = f'python -m benchmarks {cmd}'
    getattr(mod, fn_name)(rest)
    return 0


if __name__ == '__main__':
    sys.exit(main())
