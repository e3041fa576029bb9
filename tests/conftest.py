import os

import pytest
import torch

# Triton kernels run on CPU tensors only under the interpreter; on a GPU machine they run on CUDA.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def triton_device():
    """Device on which Triton kernels can run here: cuda, or cpu under TRITON_INTERPRET=1."""
    if HAS_CUDA and not TRITON_INTERPRET:
        return "cuda"
    if TRITON_INTERPRET:
        return "cpu"
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
