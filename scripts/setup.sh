#!/usr/bin/env bash
# Creates .venv (if absent) and installs chtsl with its dev tools into it. Idempotent.
# CHTSL_TORCH picks the torch build (default: torch 2.13.0 — on a machine without a GPU a local
# CPU wheel is preferred when pip's find-links provide one).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "${CHTSL_TORCH:-torch==2.13.0}"
python -m pip install --quiet -e '.[dev]'
