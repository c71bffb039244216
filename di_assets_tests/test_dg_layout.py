"""The `dg` layout: `dg list defs`, `dg check defs` and `dg scaffold defs` work as in any `dg` project.

The flow is built from the settings (`build_defs`); the `dg` defs folder (`di_assets/defs/autoload/`,
pyproject.toml's `defs_module`) holds what users add, and `di_assets.definitions` merges the two.
Scaffolding happens in a copy of the project, never in this tree.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

ROOT = Path(__file__).resolve().parent.parent
DG = Path(sys.executable).parent / "dg"
FLOW = {"class_images", "class_token", "encoder_root", "counterfactuals", "clip_scores", "scores_db"}

needs_dg = pytest.mark.skipif(not DG.exists(), reason="dg (dagster-dg-cli, in the dev extra) is not installed")


def _env(tmp_path: Path) -> dict:
    (tmp_path / "home").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "DI_ASSETS_CONFIG"}  # the bundled defaults
    return {**env, "DAGSTER_HOME": str(tmp_path / "home"), "DI_ASSETS_STORAGE": str(tmp_path / "storage")}


def _run(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def _listed(cwd: Path, env: dict) -> dict:
    return json.loads(_run([DG, "list", "defs", "--json"], cwd, env).stdout)


def _copy_project(dest: Path) -> Path:
    """The package, pyproject.toml and workspace.yaml; the reference world's weights by a link."""
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "workspace.yaml"):
        shutil.copy2(ROOT / name, dest / name)
    weights = Path("reference_world") / "weights"
    shutil.copytree(ROOT / "di_assets", dest / "di_assets", symlinks=True,
                    ignore=lambda d, names: [n for n in names if n == "__pycache__"
                                             or Path(d, n) == ROOT / "di_assets" / weights])
    (dest / "di_assets" / weights).symlink_to(ROOT / "di_assets" / weights, target_is_directory=True)
    return dest


@needs_dg
def test_dg_list_defs_lists_the_flow_once(tmp_path):
    listed = _listed(ROOT, _env(tmp_path))
    keys = [a["asset_key"] for a in listed["assets"]]
    assert FLOW <= set(keys) and len(keys) == len(set(keys))
    # the module-level job and sensor of class_images.py, registered once (by build_defs alone)
    assert [j["name"] for j in listed["jobs"]].count("observe_class_images") == 1
    assert [s["name"] for s in listed["sensors"]].count("class_folders_sensor") == 1
    assert {r["name"] for r in listed["resources"]} >= {"storage", "models", "params", "duckdb"}


@needs_dg
def test_dg_check_defs_passes(tmp_path):
    out = _run([DG, "check", "defs"], ROOT, _env(tmp_path))
    assert "All definitions loaded successfully" in out.stdout + out.stderr


def test_the_defs_folder_is_not_the_flow():
    """pyproject.toml's defs folder is the one the code location loads, and none of the flow's modules
    (factories, and class_images.py's module-level asset, job and sensor) is autoloaded."""
    tomllib = pytest.importorskip("tomllib")
    import di_assets.definitions as d

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dg"]["project"]
    assert project["defs_module"] == d.DEFS_FOLDER_MODULE
    assert project["code_location_target_module"] == "di_assets.definitions"
    folder = d.load_defs_folder()
    assert not FLOW & {k.to_user_string() for k in folder.resolve_asset_graph().get_all_asset_keys()}
    assert not any(getattr(j, "name", None) == "observe_class_images" for j in folder.jobs or [])
    assert not any(s.name == "class_folders_sensor" for s in folder.sensors or [])
    # the merged code location holds each of them once
    assert [a.key for a in d.defs.assets if isinstance(a, dg.SourceAsset)].count(dg.AssetKey("class_images")) == 1
    assert [s.name for s in d.defs.sensors].count("class_folders_sensor") == 1
    assert [getattr(j, "name", None) for j in d.defs.jobs].count("observe_class_images") == 1


@needs_dg
def test_dg_scaffold_defs_asset_loads(tmp_path):
    project = _copy_project(tmp_path / "project")
    env = _env(tmp_path)
    out = _run([DG, "scaffold", "defs", "dagster.asset", "my_asset.py"], project, env)
    made = project / "di_assets" / "defs" / "autoload" / "my_asset.py"
    assert made.is_file(), out.stdout + out.stderr
    assert not (ROOT / "di_assets" / "defs" / "autoload" / "my_asset.py").exists()
    # dg sees it beside the flow
    keys = {a["asset_key"] for a in _listed(project, env)["assets"]}
    assert {"my_asset"} | FLOW <= keys
    # and so does the code location that `dagster dev -w workspace.yaml` imports, without torch; an
    # installed package (no pyproject.toml beside it) finds the same folder by its module
    code = ("import json, sys, tempfile; from pathlib import Path; import di_assets.definitions as d; "
            "keys = lambda defs: sorted(k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()); "
            "print(json.dumps({'file': d.__file__, 'defs': keys(d.defs), 'torch': 'torch' in sys.modules, "
            "'installed': keys(d.load_defs_folder(Path(tempfile.mkdtemp())))}))")
    loaded = json.loads(_run([sys.executable, "-c", code], project, env).stdout.strip().splitlines()[-1])
    assert Path(loaded["file"]).is_relative_to(project)
    assert {"my_asset"} | FLOW <= set(loaded["defs"])
    assert loaded["installed"] == ["my_asset"]
    assert loaded["torch"] is False
