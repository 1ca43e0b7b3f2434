"""Install efficientvit_det (use scripts/setup_env.sh for the whole stack, mmcv included)."""
from setuptools import find_packages, setup

setup(
    name='efficientvit_det',
    version='0.1.0',
    description='EfficientViT (MSRA, CVPR 2023) backbones for MMDetection 3.x',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['efficientvit_det', 'efficientvit_det.*']),
    python_requires='>=3.9',
    install_requires=['torch>=2.0', 'mmengine>=0.10', 'mmdet>=3.0,<3.4', 'timm>=1.0'],
    license='MIT',
)
