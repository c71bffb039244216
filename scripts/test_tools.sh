#!/usr/bin/env bash
# What only the tests need besides the venv (scripts/setup.sh): Debian's Chromium for the UI test and
# Debian's PostgreSQL server for the Postgres test. The main command (scripts/example.sh) needs neither,
# so it does not wait for them.
set -euo pipefail
cd "$(dirname "$0")/.."
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
