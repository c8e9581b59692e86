#!/usr/bin/env bash
# Refreshes requirements-lock.txt from the ranges in pyproject.toml (all extras), for Linux x86-64
# and the Python that runs it (3.11, as CI's). Pins already in the lock are kept while they satisfy
# pyproject.toml; `bash scripts/lock.sh --upgrade` moves everything to the newest allowed versions,
# `--upgrade-package NAME` one package. Needs the dev environment (pip-tools): bash scripts/setup-dev.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pip-compile ] || { echo "no .venv/bin/pip-compile: run bash scripts/setup-dev.sh first" >&2; exit 1; }
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" .venv/bin/pip-compile --quiet --all-extras \
  --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
  --output-file requirements-lock.txt "$@" pyproject.toml
