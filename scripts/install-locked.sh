#!/usr/bin/env bash
# Installs trtforge into the active Python environment with every dependency at the version
# requirements-lock.txt pins. The one install step of CI (scripts/setup-dev.sh), the quick start
# (scripts/serve.sh) and the images (docker/), so what CI tests is what they run.
#   bash scripts/install-locked.sh [--editable] [EXTRAS]     e.g. `--editable dev`, `gpu,postgres`
# The lock is a constraints file: it fixes versions and adds nothing, so one lock serves every set
# of extras. A dependency missing from it would install unpinned; tests/unit/test_lock.py fails
# then, and `bash scripts/lock.sh` refreshes it.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

editable=()
if [ "${1:-}" = "--editable" ]; then editable=(--editable); shift; fi
target="$here"
[ -n "${1:-}" ] && target="${here}[$1]"

export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q -c "$here/requirements-lock.txt" pip
python -m pip install -q -c "$here/requirements-lock.txt" "${editable[@]}" "$target"
