"""Test-wide set-up: the package is imported (registers modules) and mmdet is the default
registry scope, as in an mmdet config (an mmengine Runner built by an earlier test would
otherwise leave 'mmengine' as the scope and hide mmdet-registered modules)."""
import pytest
from mmengine.registry import init_default_scope

import efficientvit_det  # noqa: F401


@pytest.fixture(autouse=True)
def mmdet_default_scope():
    init_default_scope('mmdet')
    yield
