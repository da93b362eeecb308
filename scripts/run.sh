#!/usr/bin/env bash
# Set up and run the agent's main job on its embedded defaults: C-STORE listener on
# 127.0.0.1:11112 (AE CXRAUDIT), drafts folder var/drafts, results in var/out, SQLite state.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cxr-agent serve "$@"
