"""The public API is what __init__ exports; keep __all__ sorted and importable."""

from __future__ import annotations

import importlib

import pytest

MODULES = ["batchprod", "batchprod.config", "batchprod.graph", "batchprod.pipeline", "batchprod.workflow",
           "batchprod.report"]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_importable(name: str) -> None:
    mod = importlib.import_module(name)
    assert list(mod.__all__) == sorted(mod.__all__)
    for attr in mod.__all__:
        assert hasattr(mod, attr), f"{name}.{attr} is in __all__ but missing"


def test_local_wms_is_registered_as_an_entry_point() -> None:
    from batchprod.wms.local import LocalService
    from batchprod.wms.registry import get_wms

    assert isinstance(get_wms("local"), LocalService)
    assert isinstance(get_wms("batchprod.wms.local:LocalService"), LocalService)
