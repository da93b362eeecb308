#!/usr/bin/env bash
# The whole test suite: set-up, lint (ruff), types (mypy on the core), then pytest (all suites,
# slow and integration ones included). Pass extra pytest arguments after the script name.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check .
echo "== mypy (core)"; mypy cxr_auditor
echo "== pytest"
exec pytest -n 2 --dist loadfile -p no:cacheprovider "$@"
