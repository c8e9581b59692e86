#!/usr/bin/env bash
# Quick start: install trtforge into .venv, generate a small CNN and a calibration set, calibrate it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
bash scripts/install-locked.sh --editable  # dependencies at the versions requirements-lock.txt pins
mkdir -p demo
python - <<'PY'
import numpy as np, onnx
from tests import zoo
onnx.save(zoo.tiny_cnn(), "demo/tiny_cnn.onnx")
np.savez("demo/calibration.npz", image=np.random.default_rng(0).normal(0, 1, (256, 3, 16, 16)).astype(np.float32))
PY
trtforge calibrate demo/tiny_cnn.onnx --data demo/calibration.npz --method entropy --out demo/tiny_cnn.cache
trtforge table show demo/tiny_cnn.cache --top 5
