"""Data: the built-in synthetic detection set (re-exported here), the robust image loader
(:mod:`.robust_loading`), COCO annotation checks (:mod:`.coco_checks`) and which files count
as images (:mod:`.image_files`).

``python -m efficientvit_det.datasets.synthetic --out data/synthetic`` writes it; see
:mod:`efficientvit_det.datasets.synthetic`.  Names are imported lazily so that running the
module as a script does not import it twice.
"""
import importlib

__all__ = ['CLASSES', 'PALETTE', 'SYNTHETIC_METAINFO', 'dataset_is_complete',
           'generate_dataset', 'render_image']


def __getattr__(name):
    if name in __all__:
        mod = importlib.import_module('.synthetic', __name__)
        if name == 'SYNTHETIC_METAINFO':
            return dict(classes=mod.CLASSES, palette=list(mod.PALETTE))
        return getattr(mod, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
