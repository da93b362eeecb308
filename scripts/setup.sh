#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine with Python 3.11: Debian packages the agent and its
# tests use (dcmtk, dicom3tools, Orthanc, strace, Chromium for the browser test), then a local
# virtual environment in .venv.
#
#   bash scripts/setup.sh          torch 2.13.0 as the package index serves it (the CPU wheel on the
#                                  CI machines, whose pip points at a CPU-only wheel folder): what CI runs
#   bash scripts/setup.sh --gpu    torch 2.13.0 built for CUDA from download.pytorch.org (CXR_CUDA picks
#                                  the build, default cu128), plus bitsandbytes for the 4-bit profiles;
#                                  CXR_GPU=1 does the same. Needs an NVIDIA driver and internet access.
set -euo pipefail
cd "$(dirname "$0")/.."

gpu=${CXR_GPU:-0}
for arg in "$@"; do
  case "$arg" in
    --gpu) gpu=1 ;;
    *) echo "setup: unknown option $arg (known: --gpu)" >&2; exit 2 ;;
  esac
done

want_debs=(openssl dcmtk dicom3tools orthanc strace chromium chromium-driver)
missing=()
# Debian's python3 needs python3-venv for `-m venv` (a python with ensurepip does not).
"${PYTHON:-python3}" -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
for pkg in "${want_debs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=""; fi
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian package starts a system Orthanc on 4242/8042; tests start their own on free ports.
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl stop orthanc >/dev/null 2>&1 || true; fi
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi

python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ "$gpu" = 1 ]; then stamp="$stamp-gpu"; fi
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  # torch first and pinned, so transformers/peft/accelerate see it satisfied and pull nothing
  # (2.13.0+cu128 satisfies the extra's torch==2.13.0: a local version label is ignored there).
  if [ "$gpu" = 1 ]; then
    echo "setup: installing the CUDA build of torch (${CXR_CUDA:-cu128}) from download.pytorch.org"
    .venv/bin/pip install -q "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${CXR_CUDA:-cu128}"
    .venv/bin/pip install -q "bitsandbytes>=0.45"
  else
    .venv/bin/pip install -q "torch==2.13.0"
  fi
  .venv/bin/pip install -q -e ".[models,dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
