#!/usr/bin/env bash
# The test suite: set up from nothing, then run pytest (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/test_tools.sh
exec .venv/bin/python -m pytest "$@"
