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
  # pip byte-compiles what it installs one file at a time (46 s of a 102-s install here); compileall
  # does the same on every CPU (31 s on 2), so imports stay fast even where bytecode is never written.
  .venv/bin/python -m pip install --quiet --no-compile -c constraints.txt -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
  # (a few third-party files are not Python 3 source, as under pip's own compile step: their errors are ignored)
  .venv/bin/python -m compileall -q -j 0 .venv/lib/python3*/site-packages > /dev/null 2>&1 || true
  echo "$want" > "$stamp"
fi
