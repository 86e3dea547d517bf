#!/usr/bin/env bash
# Installs everything accerl needs, offline-safe (PyPI only), into the current Python environment:
# torch (CPU 2.13.0 unless a torch is already installed), the core packages, the LIBERO stack with its
# scene assets, and LIBERO's configuration (so its first import never prompts). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -r requirements.txt
grep '^#no-deps ' envs/requirements-libero.txt | cut -d' ' -f2 | xargs "$PY" -m pip install -q --no-deps
"$PY" -m envs.libero_setup
