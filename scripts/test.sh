#!/usr/bin/env bash
# The whole test suite: set-up, lint (ruff), types (mypy on the core), then pytest (all suites,
# slow and integration ones included). Pass extra pytest arguments after the script name.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# .venv/bin stays off PATH: pynetdicom installs its own storescu/echoscu scripts there, and the
# tests must reach dcmtk's (Debian) tools of the same names.
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy (core)"; .venv/bin/mypy cxr_auditor
echo "== import contract"; .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_architecture.py
echo "== pytest"
exec .venv/bin/python -m pytest -n 2 --dist loadfile -p no:cacheprovider "$@"
