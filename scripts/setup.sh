#!/usr/bin/env bash
# Create .venv and install the project with its pins, once; reruns skip the install
# unless pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.di-assets-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing di-assets and its dependencies into .venv (a few minutes the first time)"
  # (grep drops this machine's notes about absent local mirror folders)
  .venv/bin/python -m pip install --quiet --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi
# The UI test (di_assets_tests/test_ui.py) drives Debian's Chromium through chromedriver: install
# both from apt when they are missing (no browser download, ever). Without apt or root, say so and
# go on; the test then skips, or fails under CI.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing chromium and chromium-driver with apt-get (for the UI test)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           chromium chromium-driver >/dev/null; }; then
      echo "[setup] warning: apt-get could not install chromium and chromium-driver; the UI test will not run" >&2
    fi
  else
    echo "[setup] note: chromium and chromedriver are missing (apt-get install chromium chromium-driver, as root);" \
         "the UI test will not run" >&2
  fi
fi
# The Postgres test (di_assets_tests/test_postgres.py) starts Debian's PostgreSQL server in a temporary
# folder (as the `postgres` user the package makes): install it from apt when its binaries are missing,
# as for chromium. The package's own cluster is not used.
if ! { command -v initdb >/dev/null && command -v pg_ctl >/dev/null; } &&
   ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing postgresql with apt-get (for the Postgres test)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }; then
      echo "[setup] warning: apt-get could not install postgresql; the Postgres test will not run" >&2
    fi
  else
    echo "[setup] note: the PostgreSQL server is missing (apt-get install postgresql, as root);" \
         "the Postgres test will not run" >&2
  fi
fi
