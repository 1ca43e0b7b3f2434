"""Parameters and FLOPs (multiply-accumulates) of EfficientViT backbones and detectors.

No dataset is needed (mmdet's own get_flops.py builds one). Examples::

    python tools/get_flops.py --arch m4 --shape 224 224
    python tools/get_flops.py --arch m0 m1 m2 m3 m4 m5 --backbone-shapes 224x224 800x1344
    python tools/get_flops.py --detector configs/retinanet_efficientvit_m4_coco.py --shape 800 1344
    python tools/get_flops.py --detector m4 r50 --shape 800 1344 --json flops.json

Same as ``python tools/benchmark.py flops``; see efficientvit_det/benchmarks/flops.py for what is
counted (convolutions, linear layers and the attention matmuls; BN folded, element-wise ops not
counted) and the two window semantics (classification vs detection).
"""
import os.path as osp
import sys

_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, _ROOT)

from efficientvit_det.benchmarks.flops import main  # noqa: E402

if __name__ == '__main__':
    main()
