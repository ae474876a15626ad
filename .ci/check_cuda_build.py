"""Checks a build of fused_sched against a CUDA build of torch (no GPU needed): the CUDA kernels are compiled in,
and every operator the CUDA glue registers (csrc/cuda/*_torch.cpp, TORCH_LIBRARY_IMPL(fused_sched, CUDA), one block
per glue file) has its CUDA kernel in the dispatcher, as has every fused_sched operator but the host-only ones below."""

import glob
import os
import re
import sys

import torch

import fused_sched
from fused_sched._extension import load_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Operators that run on CPU tensors only, by design.
HOST_ONLY = {"fused_sched::evaluate_schedule": "evaluates schedule programs on the host (tests, plotting)"}


def main() -> int:
    ext = load_extension()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), fused_sched {fused_sched.__version__} from "
          f"{os.path.dirname(fused_sched.__file__)}, cuda kernels compiled: {ext.cuda_compiled()}")
    problems = []
    if torch.version.cuda is None:
        problems.append("torch is not a CUDA build")
    if not ext.cuda_compiled():
        problems.append("fused_sched was built without its CUDA kernels")
    registered = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_torch.cpp"))):
        with open(path) as f:
            glue = f.read()
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(fused_sched, CUDA, m\) \{(.*?)\n\}", glue, re.S):
            registered |= {f"fused_sched::{name}" for name in re.findall(r'm\.impl\("(\w+)"', block)}
    if not registered:
        problems.append("no CUDA registration found in csrc/cuda/*_torch.cpp")
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fused_sched::"))
    for op in ops:
        cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        print(f"  {op}: CUDA kernel {'yes' if cuda else 'no'}"
              + (f" (host-only: {HOST_ONLY[op]})" if op in HOST_ONLY else ""))
        if not cuda and op not in HOST_ONLY:
            problems.append(f"{op} has no CUDA kernel")
    for op in sorted(registered - set(ops)):
        problems.append(f"{op} is registered for CUDA in the glue but unknown to the dispatcher")
    print(f"{len(registered)} operators registered for CUDA by the glue: {', '.join(sorted(registered))}")
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
