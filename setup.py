"""Install efficientvit_det (use scripts/setup_env.sh for the whole stack, mmcv included).

The optional C++ CPU kernel of the fused cascaded group attention
(``efficientvit_det.ops._cga_cpu``) is built here when torch is importable at build time
(``pip install --no-build-isolation ...``). If it cannot be built the package still installs
and works on the PyTorch reference (a warning is printed here and once at run time).
Set ``EVIT_NO_EXT=1`` to skip the extension.
"""
import os
import sys

from setuptools import find_packages, setup

CGA_SOURCES = ['efficientvit_det/ops/csrc/cga_cpu.cpp']
CGA_DEPENDS = ['efficientvit_det/ops/csrc/cga_cpu_kernel.inc']


def _warn(msg):
    bar = '=' * 78
    print(f'\n{bar}\nWARNING (efficientvit_det): {msg}\nThe package still works; the fused '
          f'attention falls back to the PyTorch reference.\n{bar}\n', file=sys.stderr)


def _extensions():
    """(ext_modules, cmdclass) for the fused-attention C++ kernel, or nothing."""
    if os.environ.get('EVIT_NO_EXT', '0') == '1':
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing (e.g. an isolated build environment)
        _warn(f'torch is not importable at build time ({exc}); the C++ kernel is not built. '
              f'Install with `pip install --no-build-isolation` to build it.')
        return [], {}

    class SafeBuildExt(BuildExtension):
        """Build the extension if possible; never fail the installation because of it."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001
                _warn(f'building the C++ kernel failed: {exc}')

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                _warn(f'building {ext.name} failed: {exc}')

    # Portable build: no -march=native. The kernel compiles its hot loops for AVX-512, AVX2+FMA
    # and baseline x86-64 and picks one at run time (see cga_cpu.cpp).
    cxx = ['-O3', '-std=c++20', '-ffp-contract=fast', '-Wno-psabi']
    link = []
    if sys.platform.startswith('linux'):
        cxx.append('-fopenmp')  # at::parallel_for's OpenMP backend is header-inlined
        link.append('-fopenmp')
    ext = CppExtension('efficientvit_det.ops._cga_cpu', CGA_SOURCES, depends=CGA_DEPENDS,
                       extra_compile_args=cxx, extra_link_args=link)
    return [ext], {'build_ext': SafeBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name='efficientvit_det',
    version='0.1.0',
    description='EfficientViT (MSRA, CVPR 2023) backbones for MMDetection 3.x',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['efficientvit_det', 'efficientvit_det.*']),
    package_data={'efficientvit_det.ops': ['csrc/*.cpp', 'csrc/*.inc']},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires='>=3.9',
    install_requires=['torch>=2.0', 'mmengine>=0.10', 'mmdet>=3.0,<3.4', 'timm>=1.0'],
    # optional engine for exported graphs (tools/onnx_infer.py --engine openvino, docs/deploy.md)
    extras_require={'openvino': ['openvino>=2026.4']},
    license='MIT',
)
