"""Check a COCO-format annotation file the way ``SafeCocoDataset`` does, before a long run.

    python tools/check_annotations.py data/coco/annotations/instances_train2017.json
    python tools/check_annotations.py ANN.json --classes person car --strict

Exit status 0 when the file is usable (skipped records are counted and named), 2 with one
line ``error: ...`` naming the file and the record when it is not (efficientvit_det.cli's
codes: 2 = bad input). The checks themselves live in ``efficientvit_det.datasets.coco_checks``
(shared with the dataset); this is only the CLI.
"""
import argparse
import sys
from typing import Optional, Sequence

from efficientvit_det.cli import run_tool
from efficientvit_det.datasets.coco_checks import check_coco_file


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Check a COCO-format annotation file')
    parser.add_argument('ann_file')
    parser.add_argument('--classes', nargs='+', help='the dataset metainfo classes, in order')
    parser.add_argument('--strict', action='store_true',
                        help="on_invalid='raise': the first invalid annotation is an error")
    parser.add_argument('--no-annotations-ok', action='store_true',
                        help='accept a file without "annotations" (test set image info)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the check report; a broken file raises ``CocoAnnotationError`` (exit 2)."""
    args = parse_args(argv)
    report = check_coco_file(args.ann_file, classes=args.classes,
                             on_invalid='raise' if args.strict else 'skip',
                             require_annotations=not args.no_annotations_ok)
    print(report.summary())
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
