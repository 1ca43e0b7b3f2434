"""Test-wide set-up: the package is imported (registers modules) and mmdet is the default
registry scope, as in an mmdet config (an mmengine Runner built by an earlier test would
otherwise leave 'mmengine' as the scope and hide mmdet-registered modules)."""
import logging
import os

# Triton reads TRITON_INTERPRET when it is first imported (its own library functions are
# decorated then), and timm/torch may import it while other test modules are collected: set it
# before anything else so the Triton kernels run on CPU tensors in tests/test_ops_cga.py.
os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import efficientvit_det  # noqa: E402,F401


@pytest.fixture(autouse=True)
def mmdet_default_scope():
    init_default_scope('mmdet')
    yield


class _Records(logging.Handler):
    """Keeps the log records it receives."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def text(self, level=logging.WARNING):
        return '\n'.join(r.getMessage() for r in self.records if r.levelno >= level)


@pytest.fixture
def log():
    """The current MMLogger's records during the test (``log.text()``: warnings and above)."""
    logger = MMLogger.get_current_instance()
    handler = _Records()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
