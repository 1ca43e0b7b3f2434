"""Check a COCO-format annotation file the way ``SafeCocoDataset`` does, before a long run.

    python tools/check_annotations.py data/coco/annotations/instances_train2017.json
    python tools/check_annotations.py ANN.json --classes person car --strict

Exit status 0 when the file is usable (skipped records are counted and named), 1 on an error
that names the file and the record.
"""
import os.path as osp
import sys

_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, _ROOT)

from efficientvit_det.datasets.coco_checks import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
