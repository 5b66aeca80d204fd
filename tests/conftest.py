import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped by marker, with the reason shown, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker 'gpu'); none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
