#!/usr/bin/env bash
# The test command: every test; without a GPU the Triton tests run on CPU tensors under TRITON_INTERPRET=1 (set
# by tests/conftest.py) and the GPU tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest tests -q "$@"
