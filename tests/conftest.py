import os
import sys

import pytest
import torch

# The benchmark package (bench/) sits beside tests/: importable however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The Triton tests run on CPU tensors through the Triton interpreter on machines without a GPU (CI). The
# interpreter is chosen when triton is imported, so it is switched on here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
