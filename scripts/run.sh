#!/usr/bin/env bash
# Set up, then run the agent or one of its commands on the embedded defaults:
#   bash scripts/run.sh               the agent (cxr-agent serve): C-STORE listener on 127.0.0.1:11112
#                                     (AE CXRAUDIT), drafts folder var/drafts, results in var/out
#   bash scripts/run.sh demo          the two-minute demo (cxr-agent demo); --demo works too
#   bash scripts/run.sh status        any other cxr-agent command: status, doctor, models pull NAME, ...
#   bash scripts/run.sh --gpu [...]   the same, after installing the CUDA build of torch (setup.sh --gpu)
# Options that start with "-" (other than --gpu and --demo) go to `cxr-agent serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
setup_flags=()
if [ "${1:-}" = "--gpu" ]; then setup_flags+=(--gpu); shift; fi
bash scripts/setup.sh "${setup_flags[@]}"
if [ "${1:-}" = "--demo" ]; then shift; set -- demo "$@"; fi
if [ $# -eq 0 ] || [[ "$1" == -* ]]; then
  exec .venv/bin/cxr-agent serve "$@"
fi
exec .venv/bin/cxr-agent "$@"
