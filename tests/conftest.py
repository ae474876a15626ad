import os

import pytest
import torch

# The Triton tests run on CPU tensors through the Triton interpreter on machines without a GPU (CI). The
# interpreter is chosen when triton is imported, so it is switched on here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
