"""Registries: efficientvit_det registers into mmdet's, so mmdet configs and tools see it."""
from mmdet.registry import DATASETS, HOOKS, LOOPS, MODELS, TRANSFORMS  # noqa: F401
