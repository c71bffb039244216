#!/usr/bin/env bash
# The main job on the embedded default: set up, then materialize every asset for every
# partition of the bundled example dataset and print where the results are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/di-assets run "$@"
