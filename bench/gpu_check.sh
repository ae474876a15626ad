#!/usr/bin/env bash
# One-command GPU check: build fused_sched against the installed (CUDA) torch, run every test (the GPU tests
# included), run the benchmark suite (python -m bench), and write the results (JSON with device, versions, commit,
# date; the markdown table; the PNG chart; the test log and JUnit XML) under bench/results/. The CUDA kernels are
# built and tested (tests/test_gpu*.py run every GPU test on the Triton and the CUDA backend) and benchmarked.
#
#     bash bench/gpu_check.sh            # everything: every test, the large-model recipes, the whole suite
#     bash bench/gpu_check.sh --quick    # under 5 minutes on an H100: tests/test_gpu*.py (both device backends)
#                                        # and the suite's GPT-2, 1B and 2000-small cases (--quick rounds), with
#                                        # the device copy bandwidth measured in the same run
#     bash bench/gpu_check.sh --rehearse # no GPU needed: the build and import path only, then every operator's
#                                        # CUDA kernel checked in the dispatcher (CI, against a CUDA torch)
#
# The quick check is what a short GPU job runs first (15 minutes per job, machine start included, one command at
# most 10 minutes): it leaves time to fix a failure and run it again in the same job.
#
# When $OUT is set (a caller that collects files from there), every result is written there first and copied into
# bench/results/ at the end, so a run cut short still leaves what it finished in $OUT. GPU_CHECK_BUDGET_S (default
# 570: a 10-minute command limit minus a margin; --quick: 280) bounds the whole script: the suite gets what the build
# and the tests left (--time-limit), at least 180 s (--quick: 90 s).
#
# Without a git checkout (a copied working tree), set BENCH_COMMIT to the commit the tree is at: the records
# carry it. Works offline: it installs nothing but fused_sched itself (no dependency resolution).
set -uo pipefail
cd "$(dirname "$0")/.."
quick=0
rehearse=0
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    --rehearse) rehearse=1 ;;
    *) echo "usage: bash bench/gpu_check.sh [--quick] [--rehearse]" >&2; exit 2 ;;
  esac
done
if [ "$rehearse" = 1 ]; then
  # Without a GPU (CI's CUDA-torch stage): the build and import path of a GPU machine, then the dispatcher check;
  # nothing runs on a device and nothing is written under bench/results/.
  python -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is not a CUDA build'" || exit 1
  MAX_JOBS=${MAX_JOBS:-$(nproc)} python -m pip install --no-build-isolation --no-deps -e . || exit 1
  exec python .ci/check_cuda_build.py
fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" || exit 1
# Build with every core (a GPU machine has 16): the CUDA kernels take about 2 minutes on 2 cores.
jobs=${MAX_JOBS:-$(nproc)}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p bench/results
dest=${OUT:-bench/results}
mkdir -p "$dest"
log=$dest/gpu-check-$stamp.log

echo "== build" | tee "$log"
# The CUDA kernels' torch glue (csrc/cuda/*_torch.cpp) has never been compiled against a CUDA torch
# before a GPU session: if that build fails, the log keeps the errors and the check goes on without the CUDA
# kernels (Triton backend), so the GPU tests and the benchmark still run.
cuda_build=ok
if ! MAX_JOBS=$jobs python -m pip install --no-build-isolation --no-deps -e . >>"$log" 2>&1; then
  cuda_build=failed
  echo "build with the CUDA kernels failed (errors above in $log); building without them" | tee -a "$log"
  FUSED_SCHED_SKIP_CUDA=1 MAX_JOBS=$jobs python -m pip install --no-build-isolation --no-deps -e . \
    >>"$log" 2>&1 || { echo "pip install failed; see $log" | tee -a "$log"; exit 1; }
fi
python -c "import fused_sched._C as c; print('cuda kernels compiled:', c.cuda_compiled())" | tee -a "$log"

echo "== tests ($SECONDS s so far)" | tee -a "$log"
# GPU_CHECK_TESTS narrows the tests (default: all of tests/), e.g. "tests/test_gpu.py tests/test_device_backends.py"
# when a lease's 10-minute command limit must leave room for the benchmarks.
if [ "$quick" = 1 ]; then
  tests=${GPU_CHECK_TESTS:-tests/test_gpu.py tests/test_gpu_large_model.py}
  budget=${GPU_CHECK_BUDGET_S:-280}
  suite_args=(--quick --case gpt2-124m --case llama-1b --case many-small)
  min_limit=90
else
  tests=${GPU_CHECK_TESTS:-tests}
  budget=${GPU_CHECK_BUDGET_S:-570}
  suite_args=()
  min_limit=180
fi
# shellcheck disable=SC2086
python -m pytest $tests -q -rs --junitxml="$dest/gpu-tests-$stamp.xml" 2>&1 | tee -a "$log"
tests_rc=${PIPESTATUS[0]}

if [ "$quick" = 0 ]; then
  echo "== large-model recipes ($SECONDS s so far)" | tee -a "$log"
  python -m bench.bench_large_model --out "$dest" 2>&1 | tee -a "$log"
fi

limit=$((budget - SECONDS - 30))
[ "$limit" -lt "$min_limit" ] && limit=$min_limit
echo "== benchmark suite ($SECONDS s so far; --time-limit $limit)" | tee -a "$log"
python -m bench "${suite_args[@]}" --stamp "$stamp" --out "$dest" --time-limit "$limit" 2>&1 | tee -a "$log"
bench_rc=${PIPESTATUS[0]}

GPU_CHECK_QUICK=$quick python - "$stamp" "$tests_rc" "$bench_rc" "$dest" "$cuda_build" <<'PY'
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
          "cuda_kernels_build": cuda_build, "quick": os.environ.get("GPU_CHECK_QUICK") == "1", "tests_exit_code": tests_rc, "benchmark_exit_code": bench_rc, "suite": f"suite-cuda-{stamp}.json"}
with open(f"{dest}/gpu-check-{stamp}.json", "w") as f:
    json.dump(record, f, indent=1)
print(json.dumps(record))
PY
echo "== done in $SECONDS s" | tee -a "$log"
if [ "$dest" != "bench/results" ]; then
  cp "$dest"/*"$stamp"* bench/results/ 2>/dev/null
fi
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
