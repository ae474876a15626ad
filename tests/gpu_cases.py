"""Shared by tests/test_gpu.py and tests/test_gpu_large_model.py: the backends every GPU test runs, and the
model they train."""

import torch

BACKENDS = ["triton", "cuda"]


def _model():
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).cuda()
