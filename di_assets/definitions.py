"""The code location that `dagster dev` (workspace.yaml) and `dg` (pyproject.toml's [tool.dg]) load.

Two parts, merged: the flow, built from the settings (`build_defs`: its stages depend on the shifts,
the classifiers and the baseline), and the `dg` defs folder `di_assets/defs/autoload/`, loaded as any
`dg` project loads its defs folder, so that files made by `dg scaffold defs` load too.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import dagster as dg

from di_assets.defs import build_defs

DEFS_FOLDER_MODULE = "di_assets.defs.autoload"  # = pyproject.toml's [tool.dg.project] defs_module
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def load_defs_folder(project_root: Path = PROJECT_ROOT) -> dg.Definitions:
    """Every definition in the `dg` defs folder (none of the flow's own modules)."""
    if (project_root / "pyproject.toml").is_file():  # a checkout or an editable install: as `dg` reads it
        return dg.load_from_defs_folder(path_within_project=project_root)
    # An installed package (the Docker image) has no pyproject.toml beside it: the same folder, by module,
    # as quietly as load_from_defs_folder (which silences Dagster's preview warnings of its own loaders).
    module = importlib.import_module(DEFS_FOLDER_MODULE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.ComponentTree.from_module(defs_module=module, project_root=Path(module.__file__).parent).build_defs()


defs = dg.Definitions.merge(build_defs(), load_defs_folder())
