import os
import subprocess
import sys

import dagster as dg
import pytest

from di_assets.defs import build_defs
from di_assets.settings import Settings


def test_definitions_load_with_every_stage(tmp_path):
    defs = build_defs(Settings.load(storage=str(tmp_path)))
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    # the embedded default diagnoses the reference world's two classifiers
    assert keys == {"class_images", "class_token", "encoder_root", "counterfactuals", "clip_scores", "scores_db",
                    "predictions/diagnosed", "predictions/judge", "real_predictions/diagnosed",
                    "real_predictions/judge", "diagnosis"}
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert checks == {("class_images", "has_a_readable_image"), ("class_token", "token_is_finite_with_sane_norm"),
                      ("encoder_root", "holds_every_current_token"), ("counterfactuals", "has_expected_image_count"),
                      ("clip_scores", "scores_in_range"), ("scores_db", "rows_match_score_files")}
    grid = defs.resolve_assets_def("counterfactuals").partitions_def
    assert [d.name for d in grid.partitions_defs] == ["class", "shift"]
    assert len(grid.partitions_defs[1].partitions_def.get_partition_keys()) == 24  # base + 23 ImageNet* shifts
    for key in ("class_token", "counterfactuals", "clip_scores", "predictions/judge", "real_predictions/judge"):
        node = defs.resolve_assets_def(dg.AssetKey.from_user_string(key)).node_def
        assert node.pool == "gpu"
        assert "nvidia.com/gpu" in str(node.tags["dagster-k8s/config"])
    for key in keys - {"class_images"}:  # a source asset has neither code version nor owners
        asset_key = dg.AssetKey.from_user_string(key)
        assert defs.resolve_assets_def(asset_key).code_versions_by_key[asset_key]
        assert graph.get(asset_key).owners == ["team:dataset-interfaces"]
    # each classifier's predictions depend on the images and their scores, partition by partition
    preds = defs.resolve_assets_def(dg.AssetKey(["predictions", "judge"]))
    assert preds.partitions_def == grid
    assert {k.to_user_string() for k in preds.dependency_keys} == {"counterfactuals", "clip_scores"}
    assert {k.to_user_string() for k in defs.resolve_assets_def("diagnosis").dependency_keys} == {
        "scores_db", "predictions/diagnosed", "predictions/judge", "real_predictions/diagnosed",
        "real_predictions/judge"}


def test_classifiers_in_settings(tmp_path):
    sd = build_defs(Settings.load(storage=str(tmp_path), models={"family": "sd"}))
    assert not any(k.path[0] in ("predictions", "diagnosis") for k in sd.resolve_asset_graph().get_all_asset_keys())
    one = Settings.load(storage=str(tmp_path), classifiers=[{"name": "mine", "kind": "reference", "model": "judge"}])
    keys = {k.to_user_string() for k in build_defs(one).resolve_asset_graph().get_all_asset_keys()}
    assert {"predictions/mine", "real_predictions/mine", "diagnosis"} <= keys and "predictions/judge" not in keys
    for bad, message in [([{"name": "a b", "kind": "reference"}], "is not a valid key"),
                         ([{"name": "x", "kind": "keras"}], "unknown kind"),
                         ([{"name": "x", "kind": "reference", "wieghts": "w"}], "unknown keys"),
                         ([{"name": "x", "kind": "reference"}, {"name": "x", "kind": "reference"}], "unique"),
                         ("judge", "must be a list")]:
        with pytest.raises(ValueError, match=message):
            Settings.load(storage=str(tmp_path), classifiers=bad).classifier_specs()


def test_definitions_module_loads_without_torch(tmp_path):
    # `dagster dev` imports the code location; torch must not be imported at load time.
    code = "import sys, di_assets.definitions as d; assert d.defs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip() == "False"


def test_settings_file_selects_shifts_and_rejects_unknown_keys(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: data\nshifts: [base, at_night]\n")
    defs = build_defs(Settings.load(str(cfg), storage=str(tmp_path / "s")))
    grid = defs.resolve_assets_def("clip_scores").partitions_def
    assert grid.partitions_defs[1].partitions_def.get_partition_keys() == ["base", "at_night"]
    cfg.write_text("datasets: x\n")
    with pytest.raises(ValueError, match="unknown settings"):
        Settings.load(str(cfg))


@pytest.mark.parametrize("cmd, expected", [
    (["dagster", "definitions", "validate", "-w", "workspace.yaml"], "Validation successful for code location di_assets"),
    (["dg", "list", "defs"], "class_folders_sensor"),
])
def test_dagster_dev_and_dg_load_the_code_location(cmd, expected, tmp_path):
    # The same loaders that `dagster dev` (workspace.yaml) and `dg dev` (pyproject.toml) use.
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    exe = Path(sys.executable).parent / cmd[0]
    (tmp_path / "home").mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home")}
    out = subprocess.run([str(exe), *cmd[1:]], cwd=root, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert expected in out.stdout + out.stderr


@pytest.mark.parametrize("name", ["small.yaml", "sd2.yaml"])
def test_example_configs_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / name
    settings = Settings.load(str(path))
    defs = build_defs(settings)
    assert defs.resolve_assets_def("class_token")
    assert defs.resources["models"].family == settings.models.get("family", "tiny")


def test_no_deprecated_api_in_our_code(tmp_path):
    """A DeprecationWarning raised from di-assets' own code (e.g. `AssetSelection.keys`) fails."""
    code = ("import warnings; warnings.filterwarnings('error', category=DeprecationWarning, module='di_assets'); "
            "warnings.filterwarnings('error', category=FutureWarning, module='di_assets'); "
            "import dagster as dg, di_assets.definitions as d; dg.Definitions.validate_loadable(d.defs); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "DI_ASSETS_STORAGE": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-1500:]


def test_setting_descriptions_state_the_defaults_in_use():
    from di_assets.defs.resources import GenerationParams, TextualInversionParams
    from di_assets.ml.generate import GenerationConfig
    from di_assets.ml.textual_inversion import TextualInversionConfig

    tiny, sd = TextualInversionConfig.for_family("tiny"), TextualInversionConfig.for_family("sd")
    fields = TextualInversionParams.model_fields
    assert f"sd {sd.steps}, tiny {tiny.steps}" in fields["steps"].description
    assert f"sd {str(sd.pin_norm).lower()}, tiny {str(tiny.pin_norm).lower()}" in fields["pin_norm"].description
    gen = GenerationParams.model_fields["num_inference_steps"].description
    assert f"sd {GenerationConfig.for_family('sd').num_inference_steps}, " \
           f"tiny {GenerationConfig.for_family('tiny').num_inference_steps}" in gen
