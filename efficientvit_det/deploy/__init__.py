"""Deployment: deploy mode of a detector, ONNX export and the pre-/post-processing around it.

``deploy_model`` (:mod:`.mode`), ``export_onnx`` / ``verify_onnx`` / onnxruntime sessions
(:mod:`.onnx_export`), ``preprocess_images`` / ``postprocess`` (:mod:`.postprocess`); graphs
run by onnxruntime or OpenVINO and ``onnx_detect`` (:mod:`.runtime`); int8 (:mod:`.quantize`,
imported on its own); the end-to-end graph with decoding and NMS inside (:mod:`.end2end`, imported on its own); see
``docs/deploy.md``.
"""
from .mode import deploy_model
from .onnx_export import (
                          DEFAULT_OPSET,
                          HEAD_OUTPUT_GROUPS,
                          INPUT_NAME,
                          BackboneOutputs,
                          DetectorRawOutputs,
                          ExportResult,
                          export_onnx,
                          make_session,
                          other_verify_shape,
                          read_metadata,
                          run_session,
                          verify_onnx,
)
from .postprocess import build_bbox_head, class_names, detections_entry, postprocess, preprocess_images
from .runtime import onnx_detect

__all__ = [
    'DEFAULT_OPSET', 'HEAD_OUTPUT_GROUPS', 'INPUT_NAME', 'BackboneOutputs', 'DetectorRawOutputs',
    'ExportResult', 'build_bbox_head', 'class_names', 'deploy_model', 'detections_entry',
    'export_onnx', 'make_session', 'onnx_detect', 'other_verify_shape',
    'postprocess', 'preprocess_images', 'read_metadata', 'run_session',
    'verify_onnx',
]
