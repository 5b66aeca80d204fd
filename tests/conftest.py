import os

import pytest
import torch

# Without a GPU, Triton kernels run under its interpreter. The variable must be set before
# convit_kernels (and so triton.jit) is imported, which happens when test modules are collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped by marker, with the reason shown, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker 'gpu'); none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
