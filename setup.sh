#!/usr/bin/env bash
# Create .venv and install flux-prep with its dev tools. Idempotent.
# torch: a CPU build by default (TORCH_SPEC=torch==2.13.0); on a GPU machine install your CUDA torch
# into the venv first (or set TORCH_SPEC), it is kept.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "flux-prep installed in .venv"
