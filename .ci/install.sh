#!/usr/bin/env bash
# Installs fused_sched and its test dependencies into the active Python environment.
# torch: if none is installed, the CPU build 2.13.0 is installed first (an unpinned torch would pull several GB of
# CUDA wheels on a machine without a GPU); an installed torch (a GPU machine's CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install "torch==2.13.0"
fi
python -m pip install -r .ci/test-requirements.txt
MAX_JOBS=${MAX_JOBS:-2} python -m pip install --no-build-isolation -e . 
python -c "import fused_sched, fused_sched._C as c; print('fused_sched', fused_sched.__version__, 'cpu kernels:', c.cpu_capability(), 'cuda kernels:', c.cuda_compiled())"
