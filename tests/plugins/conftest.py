"""Plugin tests run the Triton kernels in Triton's CPU interpreter on small shapes.

TRITON_INTERPRET must be set before any kernel is defined (triton reads it when a @triton.jit
function is created); mixbuild imports triton only lazily, so setting it here is early enough.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
