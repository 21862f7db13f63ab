#!/usr/bin/env bash
# The project's checks, in the order CI runs them (`.ci/run` calls exactly this after installing):
# lint and format (ruff), the layer contracts (import-linter), then the test suite. The tests start
# their own services on 127.0.0.1 (MLflow servers on PostgreSQL with S3 artifacts, and on sqlite;
# a PostgreSQL cluster of their own; moto's S3 server); the report.html test opens the page in
# headless Chromium. Chromium and PostgreSQL come from Debian's packages, installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

MISSING=()
command -v chromium >/dev/null 2>&1 || MISSING+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || MISSING+=(postgresql)
if [ ${#MISSING[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "[test.sh] installing ${MISSING[*]} (Debian packages) for the tests" >&2
  $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${MISSING[@]}" >/dev/null
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
.venv/bin/python -m pytest -q --durations=25 "$@"
