"""Effective settings: the `params` resource holds the value of every setting for the configured model
family (the launchpad shows them), without changing what runs or any code version."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from di_assets.defs import build_defs, build_resources
from di_assets.defs.resources import GenerationParams, InterfaceParams, TextualInversionParams, resolved_settings
from di_assets.defs.versions import code_versions
from di_assets.ml.defaults import GENERATION, TEXTUAL_INVERSION
from di_assets.ml.shifts import select_shifts
from di_assets.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["tiny", "sd"]
EXPLICIT_TI = {"steps": 7, "learning_rate": 0.1, "pin_norm": True, "resolution": 128, "checkpoint_every": 3}
EXPLICIT_GEN = {"num_samples": 2, "seed": 5, "num_inference_steps": 3, "guidance_scale": 0.0, "scheduler": "ddim",
                "resolution": 32, "negative_prompt": "blurry"}


def _settings(tmp_path, family, **kw) -> Settings:
    return Settings.load(storage=str(tmp_path), models={"family": family}, **kw)


def _generation_fields(params: InterfaceParams, family: str) -> dict:
    """The generation fields that have family defaults (num_samples and seed have one default)."""
    g = params.generation.model_dump()
    return {k: g[k] for k in GENERATION[family]}


@pytest.mark.parametrize("family", FAMILIES)
def test_params_hold_the_family_defaults(tmp_path, family):
    params = build_resources(_settings(tmp_path, family))["params"]
    assert params.resolved_for == family
    assert params.textual_inversion.model_dump() == TEXTUAL_INVERSION[family]
    assert _generation_fields(params, family) == GENERATION[family]
    assert (params.generation.num_samples, params.generation.seed) == (4, 0)
    # the only unset values left are the defaults that are None themselves (the model's native size)
    for section, table in ((params.textual_inversion, TEXTUAL_INVERSION), (params.generation, GENERATION)):
        assert {k for k, v in section.model_dump().items() if v is None} == {
            k for k, v in table[family].items() if v is None}
    # the descriptions still state each family's default
    assert f"sd {TEXTUAL_INVERSION['sd']['steps']}, tiny {TEXTUAL_INVERSION['tiny']['steps']}" in \
        TextualInversionParams.model_fields["steps"].description


@pytest.mark.parametrize("family", FAMILIES)
def test_launchpad_default_config_shows_the_values_in_use(tmp_path, family):
    """The launchpad opens with the job's default run config (GraphQL `rootDefaultYaml`)."""
    from dagster._core.snap import JobSnap
    from dagster._core.snap.snap_to_yaml import default_values_yaml_from_type_snap

    job = build_defs(_settings(tmp_path, family)).resolve_implicit_global_asset_job_def()
    snap = JobSnap.from_job_def(job)
    schema = snap.config_schema_snapshot
    root = schema.get_config_snap(snap.mode_def_snaps[0].root_config_key)
    shown = yaml.safe_load(default_values_yaml_from_type_snap(schema, root))["resources"]["params"]["config"]
    assert shown["resolved_for"] == family
    for name, table in (("textual_inversion", TEXTUAL_INVERSION), ("generation", GENERATION)):
        assert {k: shown[name][k] for k in shown[name] if k in table[family]} == {
            k: v for k, v in table[family].items() if v is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_an_explicit_setting_wins(tmp_path, family):
    params = build_resources(_settings(tmp_path, family, textual_inversion=EXPLICIT_TI,
                                       generation=EXPLICIT_GEN))["params"]
    assert params.textual_inversion.model_dump() == {**TEXTUAL_INVERSION[family], **EXPLICIT_TI}
    assert params.generation.model_dump() == {**GENERATION[family], **EXPLICIT_GEN}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("explicit", [False, True], ids=["defaults", "explicit"])
def test_stage_configs_are_unchanged(tmp_path, family, explicit):
    """What the stages run with equals what they ran with when unset fields stayed None."""
    from di_assets.ml.generate import GenerationConfig
    from di_assets.ml.textual_inversion import TextualInversionConfig

    ti, gen = (EXPLICIT_TI, EXPLICIT_GEN) if explicit else ({}, {})
    params = build_resources(_settings(tmp_path, family, textual_inversion=ti, generation=gen))["params"]
    before_ti = TextualInversionConfig.for_family(family, **TextualInversionParams(**ti).model_dump())
    g = GenerationParams(**gen).model_dump()
    g.pop("num_samples"), g.pop("seed")
    before_gen = GenerationConfig.for_family(family, **g)
    assert params.ti_config(family) == before_ti
    assert params.generation_config(family) == before_gen
    # so do unresolved params (a resource built by hand, as before)
    assert InterfaceParams(textual_inversion=TextualInversionParams(**ti)).ti_config(family) == before_ti


def test_a_run_on_another_family_stops(tmp_path):
    """Filled-in defaults are one family's: models switched to the other family in a run's config must not
    silently run with them."""
    params = build_resources(_settings(tmp_path, "tiny"))["params"]
    with pytest.raises(ValueError, match="models.family"):
        params.ti_config("sd")
    with pytest.raises(ValueError, match="models.family"):
        params.generation_config("sd")


@pytest.mark.parametrize("example", [None, "small.yaml", "sd2.yaml"])
def test_code_versions_are_unchanged(tmp_path, example):
    """Code versions hash the settings as written (versions.py), never the filled-in params: building the
    resources leaves the settings as they were, and every stage keeps its code version."""
    settings = Settings.load(str(ROOT / "examples" / example) if example else None, storage=str(tmp_path))
    pristine = copy.deepcopy(settings)
    shifts = select_shifts(settings.shifts)
    before = code_versions(pristine, shifts)
    defs = build_defs(settings)
    for section in ("models", "textual_inversion", "generation", "scoring"):
        assert getattr(settings, section) == getattr(pristine, section)
    assert code_versions(settings, shifts) == before
    for name in ("class_token", "encoder_root", "counterfactuals", "clip_scores"):
        assert defs.resolve_assets_def(name).code_versions_by_key[defs.resolve_assets_def(name).key] == before[name]


def test_resolved_settings_is_a_json_record_without_torch(tmp_path):
    code = ("import json, sys; from di_assets.settings import Settings; "
            "from di_assets.defs.resources import resolved_settings; "
            f"s = Settings.load({str(ROOT / 'examples' / 'sd2.yaml')!r}); "
            "print(json.dumps({'r': resolved_settings(s), 'torch': 'torch' in sys.modules}))")
    env = {k: v for k, v in os.environ.items() if k != "DI_ASSETS_CONFIG"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False
    r = got["r"]
    assert r["models"]["family"] == "sd" and r["models"]["clip_model"] == "ViT-H-14"
    assert r["textual_inversion"] == TEXTUAL_INVERSION["sd"]
    assert r["generation"] == {**GENERATION["sd"], "num_samples": 50, "seed": 0, "batch_size": 8}
    assert r["shifts"][0] == "base" and len(r["shifts"]) == 24
    assert [c["name"] for c in r["classifiers"]] == ["resnet50", "vit", "clip"]
    # in-process, the same record for the default settings: JSON as it is
    tiny = resolved_settings(Settings.load(storage=str(tmp_path)))
    assert json.loads(json.dumps(tiny)) == tiny
    assert tiny["textual_inversion"] == TEXTUAL_INVERSION["tiny"]


def test_settings_that_change_how_tokens_train_but_not_what_they_are_keep_the_code_version(tmp_path):
    """classes_per_batch (several classes in one loop: equal tokens) and checkpoint_every leave class_token
    fresh; the learning rate makes it stale."""
    shifts = select_shifts(["base"])
    base = code_versions(Settings.load(storage=str(tmp_path)), shifts)["class_token"]
    assert code_versions(Settings.load(storage=str(tmp_path), textual_inversion={
        "classes_per_batch": 8, "checkpoint_every": 50}), shifts)["class_token"] == base
    assert code_versions(Settings.load(storage=str(tmp_path), textual_inversion={"learning_rate": 1e-3}),
                         shifts)["class_token"] != base
