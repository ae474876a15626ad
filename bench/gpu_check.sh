#!/usr/bin/env bash
# One-command GPU check: build fused_sched against the installed (CUDA) torch, run every test (the GPU tests
# included), run the benchmark, and write the results (JSON with device, versions, commit, date) under
# bench/results/ (and into $OUT when the caller collects files from there).
#
#     bash bench/gpu_check.sh
#
# Works offline: it installs nothing but fused_sched itself (no dependency resolution).
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" || exit 1
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p bench/results
log=bench/results/gpu-check-$stamp.log

echo "== build" | tee "$log"
MAX_JOBS=${MAX_JOBS:-16} python -m pip install --no-build-isolation --no-deps -e . >>"$log" 2>&1 || {
  echo "pip install failed; see $log" | tee -a "$log"; exit 1; }
python -c "import fused_sched._C as c; print('cuda kernels compiled:', c.cuda_compiled())" | tee -a "$log"

echo "== tests" | tee -a "$log"
python -m pytest tests -q -rs --junitxml="bench/results/gpu-tests-$stamp.xml" 2>&1 | tee -a "$log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark" | tee -a "$log"
python -m bench.bench_adamw --steps 20 2>&1 | tee -a "$log"
bench_rc=${PIPESTATUS[0]}

python - "$stamp" "$tests_rc" "$bench_rc" <<'PY'
import json, subprocess, sys, datetime, platform
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
stamp, tests_rc, bench_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
record = {"check": "gpu_check", "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": tv,
          "cuda": torch.version.cuda, "python": platform.python_version(), "commit": commit,
          "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
          "tests_exit_code": tests_rc, "benchmark_exit_code": bench_rc}
with open(f"bench/results/gpu-check-{stamp}.json", "w") as f:
    json.dump(record, f, indent=1)
print(json.dumps(record))
PY
if [ -n "${OUT:-}" ]; then
  cp bench/results/*"$stamp"* "$OUT"/ 2>/dev/null
  cp "$(ls -t bench/results/adamw-cuda-*.json 2>/dev/null | head -1)" "$OUT"/ 2>/dev/null
fi
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
