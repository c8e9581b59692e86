#!/usr/bin/env bash
# One command for any Linux machine with an NVIDIA GPU and its driver (TensorRT not needed):
#   bash scripts/gpu-check.sh
# In a fresh virtual environment (.cache/gpu-check/venv) it installs trtforge[gpu] from the lock
# (scripts/install-locked.sh) with ONNX Runtime's GPU build in place of the CPU one, then runs
#   1. the `gpu` test tier (device buffers, NVML discovery, the calibrator feeder, the build
#      child's memory limit),
#   2. the `tensorrt` tier, when TensorRT is importable (NVIDIA's TensorRT container, or
#      GPU_CHECK_TENSORRT='tensorrt-cu12==10.13.*' to install it into the check's environment),
#   3. a zoo model (tests/zoo.py small_cnn): INT8 calibration + int8-fp16 build, an fp16 build,
#      and a benchmark, all on ONNX Runtime's CUDA execution provider,
# and prints one summary. Exit status: 0 all passed, 1 something failed, 2 this machine cannot
# run the check (no NVIDIA GPU or driver, no Python 3.11+). Logs: .cache/gpu-check/*.log.
# Settings (environment): PYTHON (default python3), GPU_CHECK_ORT (the ONNX Runtime GPU
# requirement; default: onnxruntime-gpu[cuda,cudnn], newest not above the locked onnxruntime),
# GPU_CHECK_TENSORRT (a TensorRT requirement to install).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
work="$root/.cache/gpu-check"
started=$SECONDS

cannot_run() {
  echo "gpu-check: $1" >&2
  exit 2
}

# -- can this machine run it? ------------------------------------------------------------------
[ "$(uname -s)" = Linux ] || cannot_run "Linux only (this is $(uname -s))"
command -v nvidia-smi >/dev/null 2>&1 \
  || cannot_run "no NVIDIA GPU/driver found: nvidia-smi is not installed (install the NVIDIA driver)"
if ! gpus=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1) \
  || [ -z "$gpus" ]; then
  cannot_run "no NVIDIA GPU/driver found: nvidia-smi lists no GPU (${gpus:-no output})"
fi
driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
[ -n "$driver_cuda" ] || cannot_run "no NVIDIA GPU/driver found: nvidia-smi reports no CUDA version"
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || cannot_run "trtforge needs Python 3.11 or newer ($python is not; set PYTHON=...)"

mkdir -p "$work"
step() {  # step NAME COMMAND...: run with its output in NAME.log; on failure show its end
  local name=$1
  shift
  echo "gpu-check: $name" >&2
  if ! "$@" >"$work/$name.log" 2>&1; then
    echo "gpu-check: $name failed; the end of $work/$name.log:" >&2
    tail -n 40 "$work/$name.log" >&2
    return 1
  fi
}

# -- the environment ---------------------------------------------------------------------------
# shellcheck disable=SC2317  # called through step
install_env() {  # (a function run as a condition: errexit is off in it, so each step checks)
  rm -rf "$work/venv"
  # system site packages: a TensorRT the machine has (NVIDIA's container) stays importable
  "$python" -m venv --system-site-packages "$work/venv" || return 1
  # shellcheck disable=SC1091
  . "$work/venv/bin/activate" || return 1
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  bash scripts/install-locked.sh gpu || return 1
  python -m pip install -c requirements-lock.txt pytest pytest-timeout || return 1
  if [ "${driver_cuda%%.*}" -lt 13 ]; then
    # cuda-python 13 (the lock's) needs a CUDA 13 driver: take the 12.x bindings here
    python -m pip install 'cuda-python>=12.6,<13' || return 1
  fi
  # ONNX Runtime's GPU build replaces the CPU build (both install the `onnxruntime` package)
  local locked
  locked=$(sed -n 's/^onnxruntime==\([^ ]*\).*/\1/p' requirements-lock.txt)
  python -m pip uninstall -y onnxruntime || return 1
  python -m pip install -c requirements-lock.txt \
    "${GPU_CHECK_ORT:-onnxruntime-gpu[cuda,cudnn]<=$locked}" || return 1
  if [ -n "${GPU_CHECK_TENSORRT:-}" ]; then
    python -m pip install "$GPU_CHECK_TENSORRT" || return 1
  fi
}
step install install_env || exit 1
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
# CUDA and cuDNN from NVIDIA's wheels (onnxruntime-gpu's cuda/cudnn extras): on the loader's path
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d "$site/nvidia" ]; then
  nvlibs=$(find "$site/nvidia" -maxdepth 3 -type d -name lib | sort | paste -sd: -)
  export LD_LIBRARY_PATH="$nvlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

failed=0
# -- test tiers --------------------------------------------------------------------------------
tier() {  # tier MARKER FOLDER: run it; every test must run (a skip means the GPU was not used)
  local marker=$1 folder=$2
  python -m pytest "$folder" -m "$marker" -q -rs -p no:cacheprovider \
    --junitxml="$work/$marker.xml" >"$work/$marker.log" 2>&1 || true
  python - "$work/$marker.xml" "$marker" <<'PY'
import sys
import xml.etree.ElementTree as ET

path, marker = sys.argv[1], sys.argv[2]
try:
    suite = ET.parse(path).getroot()
except (OSError, ET.ParseError):
    print(f"{marker} tier: did not run (see {path[:-4]}.log)")
    sys.exit(1)
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, failures, errors, skipped = (
    int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")
)
passed = tests - failures - errors - skipped
print(f"{marker} tier: {passed} passed, {failures + errors} failed, {skipped} skipped")
sys.exit(0 if tests and passed == tests else 1)
PY
}
summary=()
if line=$(tier gpu tests/gpu); then summary+=("$line"); else summary+=("$line  <- FAILED"); failed=1; fi
trt=$(python -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)
if [ -n "$trt" ]; then
  if line=$(tier tensorrt tests/tensorrt); then summary+=("$line"); else summary+=("$line  <- FAILED"); failed=1; fi
else
  summary+=("tensorrt tier: not run (TensorRT is not importable here)")
fi

# -- a zoo model on the CUDA execution provider ------------------------------------------------
# shellcheck disable=SC2317  # called through step
model_run() {  # (run as a condition: each step checks)
  local out="$work/model"
  rm -rf "$out" && mkdir -p "$out" || return 1
  python - "$out" <<'PY' || return 1
import sys

import numpy as np
import onnx

from tests import zoo

out = sys.argv[1]
onnx.save(zoo.small_cnn(), f"{out}/small_cnn.onnx")
np.savez(f"{out}/calibration.npz", image=zoo.small_images(512, seed=1))
PY
  trtforge build "$out/small_cnn.onnx" --data "$out/calibration.npz" --precision int8-fp16 \
    --method entropy --backend onnxruntime --out "$out/int8_fp16.onnx" --json \
    >"$out/int8_fp16.json" || return 1
  trtforge build "$out/small_cnn.onnx" --data "$out/calibration.npz" --precision fp16 \
    --backend onnxruntime --out "$out/fp16.onnx" --json >"$out/fp16.json" || return 1
  trtforge bench "$out/fp16.onnx" --batch-size 8 --duration-s 3 --json >"$out/bench.json"
}
model_summary() {
  python - "$work/model" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
ok = True
for name in ("int8_fp16", "fp16"):
    build = json.loads((out / f"{name}.json").read_text())
    sidecar = json.loads((out / f"{name}.onnx.json").read_text())
    providers = sidecar["options"]["providers"]
    on_cuda = providers[:1] == ["CUDAExecutionProvider"]
    ok = ok and on_cuda and build["gate"]["passed"]
    print(
        f"{name} build: {build['seconds']:.1f} s on {providers[0]} ({sidecar['device']}), "
        f"gate {build['gate']['gate_text']}: {'passed' if build['gate']['passed'] else 'MISSED'}"
        + ("" if on_cuda else "  <- FAILED: not on the CUDA execution provider")
    )
bench = json.loads((out / "bench.json").read_text())
on_cuda = bench["environment"]["providers"].startswith("CUDAExecutionProvider")
ok = ok and on_cuda
latency = bench["latency"]
print(
    f"fp16 benchmark (batch {bench['batch_size']}): {bench['throughput_qps']:.0f} queries/s, "
    f"median {latency['median_ms']:.3f} ms, p99 {latency['p99_ms']:.3f} ms "
    f"({bench['environment']['providers']})"
    + ("" if on_cuda else "  <- FAILED: not on the CUDA execution provider")
)
sys.exit(0 if ok else 1)
PY
}
if step model model_run; then
  if lines=$(model_summary); then :; else failed=1; fi
  while IFS= read -r line; do summary+=("$line"); done <<<"$lines"
else
  summary+=("zoo model calibration/build/benchmark: FAILED (see $work/model.log)")
  failed=1
fi

# -- one summary -------------------------------------------------------------------------------
versions=$(python - <<'PY'
from importlib import metadata

def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"

ort = next((f"{n} {version(n)}" for n in ("onnxruntime-gpu", "onnxruntime") if version(n) != "-"), "-")
print(
    f"{ort}, cuda-python {version('cuda-python')}, "
    f"nvidia-ml-py {version('nvidia-ml-py')}, tensorrt {version('tensorrt')}"
)
PY
)
echo
echo "== trtforge gpu-check =="
echo "GPU: $(head -n 1 <<<"$gpus") (driver's CUDA $driver_cuda; $(wc -l <<<"$gpus") GPU(s))"
echo "packages: $versions${trt:+ (TensorRT $trt importable)}"
printf '%s\n' "${summary[@]}"
echo "result: $([ "$failed" = 0 ] && echo PASSED || echo FAILED) in $((SECONDS - started)) s (logs: $work)"
exit "$failed"
