#!/usr/bin/env bash
# CI stage: fused_sched against a CUDA build of torch, on a machine without a GPU. In a virtualenv of its own
# (torch==2.14.1, the cu130 build that lies on this machine's disk, with the triton it pins), in a local
# clone of the committed tree (the editable build writes fused_sched/_C*.so in place, which the CPU stage's build must
# keep):
#   1. build with the CUDA kernels (the toolkit found by fused_sched/_sources.py find_cuda_home, past the nvcc
#      wrapper on PATH), or, without a usable toolkit, without them (one line says so);
#   2. import, and check that every operator has its CUDA kernel in the dispatcher (.ci/check_cuda_build.py);
#   3. the README's test command on this torch and its triton.
# CUDA_TORCH (default 2.14.1) picks the torch release.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
work=$(mktemp -d)
VENV=$work/venv-cuda-torch
echo "== virtualenv $VENV (torch==${CUDA_TORCH:-2.14.1}, CUDA build)"
"$PY" -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install --upgrade pip >/dev/null
start=$SECONDS
python -m pip install "torch==${CUDA_TORCH:-2.14.1}" >/dev/null
python -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is not a CUDA build'"
echo "installed $(python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)') in $((SECONDS - start)) s"

tree=$work/tree
git clone -q "$ROOT" "$tree"  # the committed tree (the benchmark records its commit)
cd "$tree"
# The toolkit a GPU machine's layout gives (nvcc in the toolkit's own bin folder, first on PATH), then this one's
# (a wrapper script on PATH): the build below uses the latter.
cuda_bin=$(python -c "import sys; sys.path.insert(0, 'fused_sched'); import _sources, os; print(_sources.find_cuda_home(os.environ)[0] or '')")
if [ -n "$cuda_bin" ]; then
  PATH="$cuda_bin/bin:$PATH" python -c "import sys; sys.path.insert(0, 'fused_sched'); import _sources, os; print('GPU-machine layout:', _sources.find_cuda_home(os.environ)[1])"
fi
python -c "import sys; sys.path.insert(0, 'fused_sched'); import _sources, os; print('this machine:', _sources.find_cuda_home(os.environ)[1])"
start=$SECONDS
python -m pip install -r .ci/test-requirements.txt >/dev/null
echo "test tools: $((SECONDS - start)) s"
start=$SECONDS
# The GPU check's own build and import path (bench/gpu_check.sh --rehearse): build with the CUDA kernels, import,
# every operator's CUDA kernel in the dispatcher.
MAX_JOBS=${MAX_JOBS:-2} bash bench/gpu_check.sh --rehearse
echo "build with the CUDA kernels and dispatcher check: $((SECONDS - start)) s"

start=$SECONDS
bash .ci/test.sh
echo "tests on torch $(python -c 'import torch; print(torch.__version__)'): $((SECONDS - start)) s"
cd "$ROOT"
rm -rf "$work"
