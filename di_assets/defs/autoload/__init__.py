"""The `dg` defs folder: every file under it loads as in any `dg` project.

`dg scaffold defs dagster.asset my_asset.py` writes `my_asset.py` here (pyproject.toml's
`[tool.dg.project] defs_module` names this folder), and `di_assets.definitions` loads the folder with
`dg.load_from_defs_folder`, beside the flow that `di_assets.defs.build_defs` builds from the settings.
The flow's own modules live one level up, out of the autoloader's reach: they hold factories, and
their module-level objects (`class_images`, its job and sensor) belong to `build_defs` alone.

Assets here may use the flow's resources by name (`storage`, `models`, `params`, `duckdb`) and depend
on its assets by key (e.g. `deps=["scores_db"]`). Keep torch imports inside function bodies, so that
the code location loads quickly.
"""
