#!/usr/bin/env bash
# The test command: installs what is missing, starts PostgreSQL, runs lint, types and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
. .venv/bin/activate
export TRTFORGE_TRT10_SO="$PWD/.cache/trt/trt10/tensorrt_bindings/tensorrt.so"
export TRTFORGE_TRT11_SO="$PWD/.cache/trt/trt11/tensorrt_bindings/tensorrt.so"
if url=$(bash scripts/postgres.sh 2>.cache/postgres-start.log); then
  export TRTFORGE_TEST_POSTGRES_URL="$url"
  # stop the cluster on exit (failures too), unless it was already running before this run
  if grep -q started .cache/postgres-start.log; then trap 'bash scripts/postgres.sh stop' EXIT; fi
fi
ruff check core calibrators engines service tests bench
hadolint --config docker/hadolint.yaml docker/*Dockerfile  # every Dockerfile, lint fails the run
mypy
python -m pytest "$@"
