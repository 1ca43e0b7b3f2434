"""Deployment: deploy-mode (Conv+BN folded) models, ONNX export and post-processing.

See :mod:`efficientvit_det.deploy.onnx_export` and ``docs/deploy.md``.
"""
from .onnx_export import (DEFAULT_OPSET, HEAD_OUTPUT_GROUPS, INPUT_NAME,  # noqa: F401
                          BackboneOutputs, DetectorRawOutputs, ExportResult, build_bbox_head,
                          export_onnx, fuse_for_deploy, load_model, make_session,
                          other_verify_shape, postprocess, preprocess_images, read_metadata,
                          run_session, verify_onnx)

__all__ = [
    'DEFAULT_OPSET', 'HEAD_OUTPUT_GROUPS', 'INPUT_NAME', 'BackboneOutputs', 'DetectorRawOutputs',
    'ExportResult', 'build_bbox_head', 'export_onnx', 'fuse_for_deploy', 'load_model',
    'make_session', 'other_verify_shape', 'postprocess', 'preprocess_images', 'read_metadata',
    'run_session', 'verify_onnx',
]
