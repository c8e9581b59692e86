#!/usr/bin/env bash
# Quick start: install trtforge into .venv and serve the API + dashboard on http://127.0.0.1:8000
# (embedded SQLite and data under ~/.local/share/trtforge unless TRTFORGE_DATA_DIR says otherwise; builds run on the GPU with TensorRT when present,
# else with ONNX Runtime). Extra arguments go to `trtforge serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
bash scripts/install-locked.sh --editable  # dependencies at the versions requirements-lock.txt pins
exec trtforge serve "$@"
