#!/usr/bin/env bash
# The project's checks, in the order CI runs them (`.ci/run` calls exactly this after installing):
# lint and format (ruff), the layer contracts (import-linter), then the test suite. The tests start
# their own MLflow server on 127.0.0.1; the report.html test opens the page in headless Chromium,
# installed here from Debian's packages when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "[test.sh] installing Chromium (Debian package) for the report.html test" >&2
  $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
.venv/bin/python -m pytest -q "$@"
