"""End to end: the whole graph for 2 classes x 2 shifts, in a temporary Dagster instance."""

import json

import dagster as dg
import duckdb
import pyarrow.parquet as pq
import pytest

from di_assets.defs import CLASSES, build_assets, build_defs, build_resources
from di_assets.defs.class_images import class_folders_sensor
from di_assets.settings import Settings

pytestmark = pytest.mark.slow

SHIFTS = ["base", "in_the_snow"]
N = 3


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    from di_assets_tests.conftest import copy_classes

    tmp = tmp_path_factory.mktemp("flow")
    data = copy_classes(tmp / "data")
    (data / "square").rename(data / "hot dog, frank")  # an odd class name on purpose
    settings = Settings.load(
        dataset=str(data), storage=str(tmp / "store"),
        shifts=SHIFTS, textual_inversion={"steps": 10}, generation={"num_samples": N},
    )
    assets, resources = build_assets(settings), build_resources(settings)
    (tmp / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp / "dagster_home")) as instance:
        # The sensor finds the class folders and adds their partitions.
        ctx = dg.build_sensor_context(instance=instance, resources={"storage": resources["storage"]})
        result = class_folders_sensor(ctx)
        (request,) = result.dynamic_partitions_requests
        assert sorted(request.partition_keys) == ["circle", "hot_dog_frank"]
        instance.add_dynamic_partitions(CLASSES.name, list(request.partition_keys))

        runs = []
        run = lambda sel, key=None: runs.append(  # noqa: E731
            dg.materialize(assets, selection=sel, partition_key=key, instance=instance, resources=resources))
        for c in request.partition_keys:
            run(["class_token"], c)
        run(["encoder_root"])
        for c in request.partition_keys:
            for s in SHIFTS:
                run(["counterfactuals", "clip_scores"], dg.MultiPartitionKey({"class": c, "shift": s}))
        run(["scores_db"])
        observed = build_defs(settings).resolve_job_def("observe_class_images").execute_in_process(instance=instance)
        yield settings, runs, observed, instance


def test_every_run_succeeded_and_checks_passed(flow):
    _, runs, _, _ = flow
    assert all(r.success for r in runs)
    evaluations = [e for r in runs for e in r.get_asset_check_evaluations()]
    # tokens, the encoder root, counterfactual partitions, score partitions, scores_db: one result each
    assert len(evaluations) == 2 + 1 + 4 + 4 + 1
    assert all(e.passed for e in evaluations)


def test_files_on_disk(flow):
    settings, _, _, _ = flow
    from pathlib import Path

    store = Path(settings.storage)
    assert sorted(p.parent.name for p in store.glob("tokens/*/learned_embeds.safetensors")) == ["circle", "hot_dog_frank"]
    meta = json.loads((store / "encoder_root" / "tokens.json").read_text())
    assert [(c["index"], c["key"], c["name"]) for c in meta["classes"]] == [
        (0, "circle", "circle"), (1, "hot_dog_frank", "hot dog, frank")]
    pngs = sorted(store.glob("images/*/*/*.png"))
    assert len(pngs) == 2 * 2 * N
    manifest = json.loads((store / "images" / "circle" / "in_the_snow" / "manifest.json").read_text())
    assert [r["text"] for r in manifest["images"]] == ["a photo of a <circle> in the snow"] * N
    assert sorted(p.relative_to(store / "scores").as_posix() for p in store.glob("scores/*/*/part.parquet")) == [
        f"class={c}/shift={s}/part.parquet" for c in ("circle", "hot_dog_frank") for s in ("base", "in_the_snow")]
    assert not list(store.rglob(".*tmp-*"))  # no leftovers of atomic writes


def test_parquet_rows(flow):
    settings, _, _, _ = flow
    t = pq.read_table(f"{settings.storage}/scores/class=hot_dog_frank/shift=in_the_snow/part.parquet").to_pylist()
    assert len(t) == N
    assert {r["class_name"] for r in t} == {"hot dog, frank"} and {r["shift"] for r in t} == {"in_the_snow"}
    assert [r["seed"] for r in t] == list(range(N))
    assert all(-1 <= r["sim_class"] <= 1 and -1 <= r["sim_shift"] <= 1 for r in t)
    # kept follows the default filter: CLIP's zero-shot choice among the class captions is the image's
    # own class, and (not for base) the shift caption beats the base caption; else a reason is recorded
    for r in t:
        ok = r["zero_shot_class"] == "hot_dog_frank" and r["sim_shift"] > r["sim_base"]
        assert r["kept"] == ok == (r["drop_reason"] is None), r
    assert t[0]["clip_model"].startswith("di-tiny-clip/") and t[0]["created_at"] is not None


def test_duckdb_views(flow):
    settings, _, _, _ = flow
    con = duckdb.connect(f"{settings.storage}/scores.duckdb", read_only=True,
                          config={"file_search_path": settings.storage})
    rows = con.execute("SELECT class, shift, count(*), avg(sim_class) FROM scores GROUP BY ALL ORDER BY ALL").fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (c, s, N) for c in ("circle", "hot_dog_frank") for s in ("base", "in_the_snow")]
    means = con.execute("SELECT class_key, shift, images, mean_sim_class FROM mean_scores ORDER BY ALL").fetchall()
    direct = {(r[0], r[1]): r[3] for r in rows}
    for key, shift, images, mean in means:
        assert images == N and mean == pytest.approx(direct[(key, shift)], abs=1e-6)


def test_metadata_for_the_ui(flow):
    from PIL import Image

    _, runs, _, instance = flow
    cf = instance.get_latest_materialization_event(dg.AssetKey("counterfactuals")).asset_materialization
    assert cf.metadata["num_images"].value == N
    preview = Image.open(cf.metadata["preview"].value)  # a file beside the images, not bytes in the record
    assert preview.width >= N * 64 and preview.format == "JPEG"
    tok = instance.get_latest_materialization_event(dg.AssetKey("class_token")).asset_materialization
    assert Image.open(tok.metadata["loss_curve"].value).width > 500  # a chart file with axes
    assert tok.metadata["steps"].value == 10
    assert tok.metadata["eval_loss_after"].value < tok.metadata["eval_loss_before"].value
    sc = instance.get_latest_materialization_event(dg.AssetKey("clip_scores")).asset_materialization
    assert sc.metadata["dagster/row_count"].value == N
    assert -1 <= sc.metadata["mean_sim_class"].value <= 1


def test_class_images_data_versions(flow):
    settings, _, observed, instance = flow
    assert observed.success
    from di_assets.ml.io import hash_folder

    record = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("class_images")), limit=10)
    versions = {r.partition_key: r.asset_observation.tags.get("dagster/data_version") for r in record.records}
    assert versions["circle"] == hash_folder(f"{settings.dataset}/circle")
    assert versions["hot_dog_frank"] != versions["circle"]


def test_predictions_and_diagnosis(flow, tmp_path):
    """A classifier under diagnosis, with a mapping file for the odd class name; then a classifier
    whose labels match no class fails in one line, and the predictions already written stay."""
    import dataclasses
    from pathlib import Path

    settings, _, _, instance = flow
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("circle: circle\nhot dog, frank: square\n")
    judge = {"name": "judge", "kind": "reference", "model": "judge", "device": "cpu"}
    good = dataclasses.replace(settings, classifiers=[{**judge, "mapping": str(mapping)}])
    assets, resources = build_assets(good), build_resources(good)
    keys = [dg.MultiPartitionKey({"class": c, "shift": s}) for c in ("circle", "hot_dog_frank") for s in SHIFTS]
    for key in keys:
        assert dg.materialize(assets, selection=[dg.AssetKey(["predictions", "judge"])], partition_key=key,
                              instance=instance, resources=resources).success
    for c in ("circle", "hot_dog_frank"):
        assert dg.materialize(assets, selection=[dg.AssetKey(["real_predictions", "judge"])], partition_key=c,
                              instance=instance, resources=resources).success
    assert dg.materialize(assets, selection=["diagnosis"], instance=instance, resources=resources).success

    store = Path(settings.storage)
    files = sorted(store.glob("predictions/classifier=judge/class=*/shift=*/part.parquet"))
    assert len(files) == 4
    rows = pq.read_table(store / "predictions/classifier=judge/class=hot_dog_frank/shift=in_the_snow/part.parquet")
    rows = rows.to_pylist()
    assert len(rows) == N and {r["label"] for r in rows} == {"square"}  # from the mapping file
    assert [r["image_path"] for r in rows] == [f"images/hot_dog_frank/in_the_snow/{s}.png" for s in range(N)]
    scores = pq.read_table(store / "scores/class=hot_dog_frank/shift=in_the_snow/part.parquet").to_pylist()
    assert [r["kept"] for r in rows] == [r["kept"] for r in scores]  # the CLIP filter's verdict, per seed
    con = duckdb.connect(str(store / "scores.duckdb"), read_only=True, config={"file_search_path": str(store)})
    assert con.execute("SELECT count(*), count(DISTINCT class_key) FROM predictions").fetchone() == (4 * N, 2)
    assert con.execute("SELECT count(*) FROM shift_failures WHERE classifier = 'judge'").fetchone()[0] >= 1
    real = dict(con.execute("SELECT class_key, real_images FROM real_vs_base").fetchall())
    assert real == {"circle": 8, "hot_dog_frank": 8}
    con.close()
    assert (store / "diagnosis" / "report.html").stat().st_size > 10_000
    record = instance.get_latest_materialization_event(dg.AssetKey("diagnosis")).asset_materialization
    assert record.metadata["worst_shifts"].value.records[0].data["classifier"] == "judge"
    assert "data:image/png;base64," in record.metadata["accuracy_per_shift_judge"].value
    assert record.metadata["misclassified_judge"].value.startswith("**judge**, worst shift")

    from di_assets.cli import main

    assert main(["report", "--storage", str(store), "--out", str(tmp_path / "r.html")]) == 0
    assert "judge" in (tmp_path / "r.html").read_text()

    before = {f: f.read_bytes() for f in files}
    bad = dataclasses.replace(settings, classifiers=[judge])  # no mapping: "hot dog, frank" is no shape
    result = dg.materialize(build_assets(bad), selection=[dg.AssetKey(["predictions", "judge"])],
                            partition_key=keys[0], instance=instance, resources=build_resources(bad),
                            raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.cause.message if failure.step_failure_data.error.cause else \
        failure.step_failure_data.error.message
    assert "hot" in message and "nearest labels" in message and message.strip().count("\n") == 0, message
    assert before == {f: f.read_bytes() for f in files}  # nothing already written is lost


def test_class_name_baseline_in_the_flow(flow):
    """`baseline: true` adds the paper's use_token=False images and scores, beside the tokens'."""
    import dataclasses
    from pathlib import Path

    settings, _, _, instance = flow
    with_baseline = dataclasses.replace(settings, baseline=True, classifiers=[])
    assets, resources = build_assets(with_baseline), build_resources(with_baseline)
    key = dg.MultiPartitionKey({"class": "hot_dog_frank", "shift": "in_the_snow"})
    assert dg.materialize(assets, selection=["baseline_counterfactuals", "baseline_scores"], partition_key=key,
                          instance=instance, resources=resources).success
    assert dg.materialize(assets, selection=["scores_db"], instance=instance, resources=resources).success
    store = Path(settings.storage)
    manifest = json.loads((store / "baseline/images/hot_dog_frank/in_the_snow/manifest.json").read_text())
    assert [r["text"] for r in manifest["images"]] == ["a photo of a hot dog, frank in the snow"] * N
    assert [r["seed"] for r in manifest["images"]] == list(range(N))  # the tokens' seeds: a paired comparison
    con = duckdb.connect(f"{settings.storage}/scores.duckdb", read_only=True,
                          config={"file_search_path": settings.storage})
    row = con.execute("SELECT token_sim_class, name_sim_class FROM token_vs_name "
                      "WHERE class_key = 'hot_dog_frank' AND shift = 'in_the_snow'").fetchone()
    direct = con.execute("SELECT avg(sim_class) FROM baseline_scores WHERE class_key = 'hot_dog_frank'").fetchone()
    assert row[1] == pytest.approx(direct[0]) and -1 <= row[0] <= 1
    # the token's own images and scores are untouched by the baseline
    assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 4 * N


def test_a_stored_image_reproduces_in_plain_diffusers(flow):
    """The README's recipe: the base model, `load_textual_inversion` on the class's token file, the
    manifest's prompt text, steps, guidance, size, scheduler and seed give the same pixels."""
    from pathlib import Path

    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from PIL import Image

    from di_assets.ml.models import base_model_location

    settings, _, _, _ = flow
    store = Path(settings.storage)
    manifest = json.loads((store / "images/hot_dog_frank/in_the_snow/manifest.json").read_text())
    cfg, rec = manifest["settings"], manifest["images"][1]
    assert manifest["model"] == "di-assets:tiny" and cfg["scheduler"] == "euler"
    pipe = StableDiffusionPipeline.from_pretrained(base_model_location(manifest["model"]), safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_textual_inversion(str(store / "tokens/hot_dog_frank/learned_embeds.safetensors"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(rec["text"], num_inference_steps=cfg["num_inference_steps"], guidance_scale=cfg["guidance_scale"],
                 height=cfg["resolution"], width=cfg["resolution"],
                 generator=torch.Generator("cpu").manual_seed(rec["seed"])).images[0]
    stored = Image.open(store / "images/hot_dog_frank/in_the_snow" / rec["file"]).convert("RGB")
    # Equal, or within 1/255 in a few values where the CPU's kernels round a batch of images unlike one
    # (2 of 12,288 on an Intel Xeon with AMX; none on an AMD EPYC).
    diff = np.abs(np.asarray(image).astype(int) - np.asarray(stored).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), int((diff > 0).sum()))


def test_class_images_records_per_class(flow):
    settings, _, observed, instance = flow
    records = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("class_images"),
                                                                asset_partitions=["circle"]), limit=1).records
    meta = records[0].asset_observation.metadata
    assert meta["images"].value == 8 and meta["skipped_files"].value == 0 and meta["skipped"].value == "none"
    assert meta["folder"].value.endswith("circle") and meta["hash"].value == records[0].asset_observation.tags[
        "dagster/data_version"]


def test_score_tables_for_the_ui(flow):
    """clip_scores and scores_db declare their columns; scores_db shows per-shift and weakest-pair tables."""
    settings, _, _, instance = flow
    defs = build_defs(settings)
    for key in ("clip_scores", "scores_db"):
        schema = defs.resolve_assets_def(key).metadata_by_key[dg.AssetKey(key)]["dagster/column_schema"]
        columns = {c.name: c.description for c in schema.columns}
        assert {"sim_class", "sim_shift", "kept", "drop_reason"} <= set(columns) and all(columns.values())
    record = instance.get_latest_materialization_event(dg.AssetKey("scores_db")).asset_materialization
    per_shift = record.metadata["per_shift"].value
    assert sorted(r.data["shift"] for r in per_shift.records) == sorted(SHIFTS)
    assert all(r.data["classes"] == 2 and r.data["images"] == 2 * N for r in per_shift.records)
    assert [c.name for c in per_shift.schema.columns][:3] == ["shift", "classes", "images"]
    assert len(record.metadata["weakest_class_shift_pairs"].value.records) == 4


def test_dropped_images_and_score_charts_for_the_ui(flow):
    """The `dropped` view lists exactly the images the filter dropped; the UI shows them with their
    numbers, the per-shift score chart, and the loss chart (with axes: a matplotlib figure)."""
    import base64
    import io
    import re

    from PIL import Image

    settings, _, _, instance = flow
    con = duckdb.connect(f"{settings.storage}/scores.duckdb", read_only=True,
                          config={"file_search_path": settings.storage})
    dropped = con.execute("SELECT class_key, shift, seed, drop_reason FROM dropped ORDER BY ALL").fetchall()
    expected = con.execute("SELECT class_key, shift, seed, drop_reason FROM scores WHERE NOT kept ORDER BY ALL").fetchall()
    assert dropped == expected and all(r[3] for r in dropped)
    db = instance.get_latest_materialization_event(dg.AssetKey("scores_db")).asset_materialization
    assert db.metadata["dropped_images"].value == len(dropped)

    def pngs(markdown):
        return [Image.open(io.BytesIO(base64.b64decode(m))) for m in re.findall(r"base64,([A-Za-z0-9+/=]+)\)", markdown)]

    (chart,) = pngs(db.metadata["scores_per_shift"].value)
    assert chart.width > 600 and chart.height > 400  # a two-panel figure, not a sparkline
    # each clip_scores partition links a picture of its own dropped images, and names the first reasons
    for rec in instance.fetch_materializations(dg.AssetKey("clip_scores"), limit=10).records:
        m = rec.asset_materialization
        class_key, shift = m.partition.split("|")
        mine = [r for r in dropped if (r[0], r[1]) == (class_key, shift)]
        assert m.metadata["dropped"].value == len(mine)
        if not mine:
            assert "dropped_preview" not in m.metadata
        else:
            sheet = Image.open(m.metadata["dropped_preview"].value)
            assert sheet.height >= 128 * min(len(mine), 8)  # one row per dropped image
            assert f"seed {mine[0][2]}" in m.metadata["dropped_reasons"].value
