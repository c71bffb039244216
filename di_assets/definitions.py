"""The code location that `dagster dev` (workspace.yaml) and `dg dev` (pyproject.toml) load."""

from di_assets.defs import build_defs

defs = build_defs()
