#!/usr/bin/env bash
# Install everything, then run the whole test suite (tiny models plus a few tests on the real SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
