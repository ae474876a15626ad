#!/usr/bin/env bash
# One-command GPU check: build fused_sched against the installed (CUDA) torch, run every test (the GPU tests
# included), run the benchmark suite (python -m bench), and write the results (JSON with device, versions, commit,
# date; the markdown table; the PNG chart; the test log and JUnit XML) under bench/results/. The CUDA kernels are
# built and tested (tests/test_gpu.py runs every GPU test on the Triton and the CUDA backend) and benchmarked.
#
#     bash bench/gpu_check.sh
#
# When $OUT is set (a caller that collects files from there), every result is written there first and copied into
# bench/results/ at the end, so a run cut short still leaves what it finished in $OUT. GPU_CHECK_BUDGET_S (default
# 570: a 10-minute command limit minus a margin) bounds the whole script: the suite gets what the build and the
# tests left (--time-limit), at least 180 s.
#
# Without a git checkout (a copied working tree), set BENCH_COMMIT to the commit the tree is at: the records
# carry it. Works offline: it installs nothing but fused_sched itself (no dependency resolution).
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" || exit 1
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p bench/results
dest=${OUT:-bench/results}
mkdir -p "$dest"
log=$dest/gpu-check-$stamp.log

echo "== build" | tee "$log"
# The CUDA kernels' torch glue (csrc/cuda/optim_cuda_torch.cpp) has never been compiled against a CUDA torch
# before a GPU session: if that build fails, the log keeps the errors and the check goes on without the CUDA
# kernels (Triton backend), so the GPU tests and the benchmark still run.
cuda_build=ok
if ! MAX_JOBS=${MAX_JOBS:-16} python -m pip install --no-build-isolation --no-deps -e . >>"$log" 2>&1; then
  cuda_build=failed
  echo "build with the CUDA kernels failed (errors above in $log); building without them" | tee -a "$log"
  FUSED_SCHED_SKIP_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} python -m pip install --no-build-isolation --no-deps -e . \
    >>"$log" 2>&1 || { echo "pip install failed; see $log" | tee -a "$log"; exit 1; }
fi
python -c "import fused_sched._C as c; print('cuda kernels compiled:', c.cuda_compiled())" | tee -a "$log"

echo "== tests ($SECONDS s so far)" | tee -a "$log"
# GPU_CHECK_TESTS narrows the tests (default: all of tests/), e.g. "tests/test_gpu.py tests/test_device_backends.py"
# when a lease's 10-minute command limit must leave room for the benchmarks.
# shellcheck disable=SC2086
python -m pytest ${GPU_CHECK_TESTS:-tests} -q -rs --junitxml="$dest/gpu-tests-$stamp.xml" 2>&1 | tee -a "$log"
tests_rc=${PIPESTATUS[0]}

echo "== large-model recipes ($SECONDS s so far)" | tee -a "$log"
python -m bench.bench_large_model --out "$dest" 2>&1 | tee -a "$log"

budget=${GPU_CHECK_BUDGET_S:-570}
limit=$((budget - SECONDS - 30))
[ "$limit" -lt 180 ] && limit=180
echo "== benchmark suite ($SECONDS s so far; --time-limit $limit)" | tee -a "$log"
python -m bench --stamp "$stamp" --out "$dest" --time-limit "$limit" 2>&1 | tee -a "$log"
bench_rc=${PIPESTATUS[0]}

python - "$stamp" "$tests_rc" "$bench_rc" "$dest" "$cuda_build" <<'PY'
import json, subprocess, sys, datetime, platform
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
stamp, tests_rc, bench_rc, dest, cuda_build = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
import os
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
commit = commit or os.environ.get("BENCH_COMMIT", "")
record = {"check": "gpu_check", "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": tv,
          "cuda": torch.version.cuda, "python": platform.python_version(), "commit": commit,
          "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
          "cuda_kernels_build": cuda_build, "tests_exit_code": tests_rc, "benchmark_exit_code": bench_rc, "suite": f"suite-cuda-{stamp}.json"}
with open(f"{dest}/gpu-check-{stamp}.json", "w") as f:
    json.dump(record, f, indent=1)
print(json.dumps(record))
PY
echo "== done in $SECONDS s" | tee -a "$log"
if [ "$dest" != "bench/results" ]; then
  cp "$dest"/*"$stamp"* bench/results/ 2>/dev/null
fi
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
