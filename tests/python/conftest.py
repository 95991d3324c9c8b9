"""Shared fixtures. The package under test is the installed one (``pip install .``)."""

from __future__ import annotations

import pytest
from sagellm_kv_cache import _core


def cuda_available() -> bool:
    try:
        _core.check_device("cuda:0")
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no usable CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
