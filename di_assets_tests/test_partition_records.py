"""Each partition's own record, also when one run makes many partitions; small records; the class grain.

One run trains two classes, one run makes and scores a 2 x 2 rectangle of class x shift partitions:
every partition's record must hold its own numbers and link its own pictures, a few hundred bytes.
"""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from di_assets.defs import CLASSES, build_assets, build_resources
from di_assets.defs.counterfactuals import count_check_results
from di_assets.defs.driver import RUN_PARTITIONS, LocalDriver, _runs_of
from di_assets.ml.shifts import select_shifts
from di_assets.settings import Settings, SettingsError
from di_assets_tests.conftest import copy_classes

SHIFTS = ["base", "in_the_snow"]
N = 3
CLASS_KEYS = ["circle", "square"]


def _range(first: str, last: str) -> dict:
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}


def _record_bytes(event) -> int:
    from dagster._serdes import serialize_value

    return len(serialize_value(event))


@pytest.fixture(scope="module", params=["class_shift", "class"])
def ranged(request, tmp_path_factory):
    """The flow at one grain, each stage over all its partitions in one run."""
    grain = request.param
    tmp = tmp_path_factory.mktemp(f"ranged_{grain}")
    data = copy_classes(tmp / "data", CLASS_KEYS, per_class=4)
    settings = Settings.load(dataset=str(data), storage=str(tmp / "store"), shifts=SHIFTS, partition_grain=grain,
                             textual_inversion={"steps": 8}, generation={"num_samples": N}, classifiers=[])
    assets, resources = build_assets(settings), build_resources(settings)
    (tmp / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp / "home")) as instance:
        instance.add_dynamic_partitions(CLASSES.name, CLASS_KEYS)
        runs = [dg.materialize(assets, selection=["class_token"], instance=instance, resources=resources,
                               tags=_range(*CLASS_KEYS)),
                dg.materialize(assets, selection=["encoder_root"], instance=instance, resources=resources)]
        first, last = ((f"{CLASS_KEYS[0]}|{SHIFTS[0]}", f"{CLASS_KEYS[-1]}|{SHIFTS[-1]}") if grain == "class_shift"
                       else (CLASS_KEYS[0], CLASS_KEYS[-1]))
        runs.append(dg.materialize(assets, selection=["counterfactuals", "clip_scores"], instance=instance,
                                   resources=resources, tags=_range(first, last)))
        runs.append(dg.materialize(assets, selection=["scores_db"], instance=instance, resources=resources))
        yield grain, settings, runs, instance


def _latest(instance, asset: str) -> dict:
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
    out = {}
    for r in records:  # newest first
        out.setdefault(r.asset_materialization.partition, r.asset_materialization)
    return out


def test_every_stage_ran_as_one_run_and_passed_its_checks(ranged):
    grain, _, runs, _ = ranged
    assert all(r.success for r in runs)
    evaluations = [e for r in runs for e in r.get_asset_check_evaluations()]
    partitions = 4 if grain == "class_shift" else 2
    # tokens (2), the encoder root, count and range per partition, scores_db
    assert len(evaluations) == 2 + 1 + 2 * partitions + 1
    assert all(e.passed for e in evaluations)


def test_each_token_partition_has_its_own_loss_and_chart(ranged):
    _, settings, _, instance = ranged
    tokens = _latest(instance, "class_token")
    assert sorted(tokens) == CLASS_KEYS
    for key, m in tokens.items():
        assert m.metadata["token"].value == f"<{key}>"
        losses = json.loads((Path(settings.storage) / "tokens" / key / "loss.json").read_text())["losses"]
        tail = losses[-max(1, len(losses) // 10):]
        assert m.metadata["final_loss"].value == pytest.approx(sum(tail) / len(tail))
        chart = Image.open(m.metadata["loss_curve"].value)
        assert chart.width > 500 and m.metadata["loss_curve"].value.endswith(f"tokens/{key}/loss.png")
    assert tokens["circle"].metadata["final_loss"].value != tokens["square"].metadata["final_loss"].value


def test_each_counterfactual_partition_shows_its_own_images(ranged):
    grain, settings, _, instance = ranged
    store = Path(settings.storage)
    shifts = {s.key: s for s in select_shifts(SHIFTS)}
    records = _latest(instance, "counterfactuals")
    expected = [f"{c}|{s}" for c in CLASS_KEYS for s in SHIFTS] if grain == "class_shift" else CLASS_KEYS
    assert sorted(records) == sorted(expected)
    for key, m in records.items():
        class_key = key.split("|")[0]
        preview = Image.open(m.metadata["preview"].value).convert("RGB")
        if grain == "class_shift":
            shift = key.split("|")[1]
            assert m.metadata["prompt"].value == shifts[shift].prompt
            assert m.metadata["num_images"].value == N
            folder = store / "images" / class_key / shift
            assert Path(m.metadata["preview"].value) == folder / "preview.jpg"
            # the preview's first cell is this partition's first image (JPEG: close, not equal)
            cell = np.asarray(preview.crop((0, 26, 128, 26 + 128)).resize((32, 32)), dtype=float)
            own = np.asarray(Image.open(folder / "0.png").convert("RGB").resize((32, 32)), dtype=float)
            other = np.asarray(Image.open(store / "images" / ("square" if class_key == "circle" else "circle")
                                          / shift / "0.png").convert("RGB").resize((32, 32)), dtype=float)
            assert np.abs(cell - own).mean() < 12 < np.abs(cell - other).mean()
        else:
            assert m.metadata["num_images"].value == N * len(SHIFTS) and m.metadata["shifts"].value == len(SHIFTS)
            assert Path(m.metadata["preview"].value) == store / "images" / class_key / "preview.jpg"
            assert preview.height >= 64 * len(SHIFTS)  # a row per shift
            assert all(len(list((store / "images" / class_key / s).glob("*.png"))) == N for s in SHIFTS)


def test_each_score_partition_carries_its_own_numbers(ranged):
    grain, settings, _, instance = ranged
    records = _latest(instance, "clip_scores")
    assert len({round(m.metadata["mean_sim_class"].value, 6) for m in records.values()}) == len(records)
    for key, m in records.items():
        class_key = key.split("|")[0]
        folder = Path(settings.storage) / "scores" / f"class={class_key}"
        # a file per pair, or at the class grain one file of the class's shifts (and no per-shift folder)
        path = folder / f"shift={key.split('|')[1]}" / "part.parquet" if "|" in key else folder / "part.parquet"
        assert Path(m.metadata["path"].value) == path
        table = pq.read_table(path)
        assert sorted(set(table.column("shift").to_pylist())) == sorted([key.split("|")[1]] if "|" in key else SHIFTS)
        assert ("|" in key) == any(folder.glob("shift=*"))
        sims = table.column("sim_class").to_pylist()
        assert m.metadata["dagster/row_count"].value == len(sims) == N * (1 if "|" in key else len(SHIFTS))
        assert m.metadata["mean_sim_class"].value == pytest.approx(sum(sims) / len(sims), abs=1e-6)
        assert m.metadata["kept"].value + m.metadata["dropped"].value == len(sims)
        assert m.metadata["kept"].value == sum(table.column("kept").to_pylist())


def test_partition_records_are_small(ranged):
    _, _, _, instance = ranged
    for asset in ("class_token", "counterfactuals", "clip_scores"):
        for key, m in _latest(instance, asset).items():
            size = _record_bytes(m)
            assert size < 3000, f"{asset} {key}: {size} bytes"  # most of it Dagster's own tags
            assert "base64" not in json.dumps({k: str(v.value) for k, v in m.metadata.items()})


def test_the_encoder_root_record_names_at_most_fifty_classes(ranged):
    """The root's record lists its classes, up to 50: at 21,000 classes the whole table would be a
    megabyte in every record (the root is rebuilt by every update)."""
    from di_assets.defs.encoder_root import token_table
    from di_assets.ml.encoder_root import ClassToken

    _, _, _, instance = ranged
    (m,) = _latest(instance, "encoder_root").values()
    table = m.metadata["tokens"].value
    assert m.metadata["num_classes"].value == 2 and all(f"| {c} |" in table for c in CLASS_KEYS), table
    many = token_table([ClassToken(i, f"k{i}", f"name {i}", f"<k{i}>", (49408 + i,)) for i in range(21_000)])
    assert len(many) < 3000 and "`<k49>`" in many and "`<k50>`" not in many and "and 20950 more" in many
    assert many.count("\n") == 2 + 50  # header, rule, 50 rows and the `more` row


def test_the_views_and_their_row_check_hold_every_pair(ranged):
    import duckdb

    grain, settings, runs, _ = ranged
    (rows_check,) = runs[-1].get_asset_check_evaluations()
    assert rows_check.passed and rows_check.metadata["partitions"].value == len(CLASS_KEYS) * len(SHIFTS)
    # the project's DuckDB resource (what a user's asset gets) resolves the relative views at the root
    with build_resources(settings)["duckdb"].get_connection() as con:
        assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == len(CLASS_KEYS) * len(SHIFTS) * N
    glob = "scores/*/*/*.parquet" if grain == "class_shift" else "scores/*/*.parquet"  # a file per pair, or per class
    assert f"'{glob}'" in duckdb.connect(f"{settings.storage}/scores.duckdb", read_only=True).execute(
        "SELECT sql FROM duckdb_views() WHERE view_name = 'scores'").fetchone()[0]


def test_a_class_partition_fails_its_count_check_naming_the_shift(ranged, tmp_path):
    import shutil

    grain, settings, _, _ = ranged
    if grain != "class":
        pytest.skip("the class grain's check")
    resources = build_resources(settings)
    store = Path(settings.storage)
    victim = store / "images" / "square" / "in_the_snow" / "1.png"
    shutil.copy(victim, tmp_path / "keep.png")
    victim.unlink()
    try:
        results = count_check_results(resources["storage"], CLASS_KEYS, N, shift_keys=SHIFTS)
    finally:
        shutil.copy(tmp_path / "keep.png", victim)
    assert results["circle"][0] and not results["square"][0]
    assert results["square"][1]["failed_shifts"] == "in_the_snow"
    assert results["square"][1]["reason"].startswith("in_the_snow: manifest.json lists 3 images, 2 of them present")


def test_the_class_grains_rows_check_names_what_its_class_files_miss(ranged, tmp_path):
    """At the class grain a file holds its class's pairs: the rows check finds a pair missing from
    its class's file, a class file of no partition, and an unreadable one (named by its class)."""
    import shutil

    from di_assets.defs.scores_db import rows_check_result

    grain, settings, _, instance = ranged
    if grain != "class":
        pytest.skip("the class grain's files")
    storage = build_resources(settings)["storage"]
    square = storage.scores_file("square", None)
    shutil.copy(square, tmp_path / "keep.parquet")

    def check():
        ok, meta = rows_check_result(storage, instance, SHIFTS, grain="class")
        return ok, {k: getattr(v, "value", v) for k, v in meta.items()}

    try:
        table = pq.read_table(square)
        pq.write_table(table.filter(pc.equal(table["shift"], "base")), square)  # in_the_snow's rows gone
        ok, meta = check()
        assert not ok and meta["missing"] == "square|in_the_snow" and meta["extra"] == "none"
        ghost = storage.scores_file("ghost", None)
        ghost.parent.mkdir()
        shutil.copy(tmp_path / "keep.parquet", ghost)
        ok, meta = check()
        assert not ok and meta["extra"] == "ghost|base, ghost|in_the_snow"
        shutil.rmtree(ghost.parent)
        square.write_bytes(b"PAR1 cut short")
        ok, meta = check()
        assert not ok and meta["unreadable"] == "square" and meta["failed"] == "square"
    finally:
        shutil.copy(tmp_path / "keep.parquet", square)
    ok, meta = check()
    assert ok and meta["db_rows"] == meta["file_rows"] == len(CLASS_KEYS) * len(SHIFTS) * N


def test_scores_db_merges_an_older_class_grain_storage_into_a_file_per_class(ranged):
    """Older versions wrote a file per pair at the class grain too: the next scores_db run merges them
    (its views and check then see every pair), and nothing else has to run again."""
    import duckdb

    grain, settings, _, instance = ranged
    if grain != "class":
        pytest.skip("the class grain's files")
    store = Path(settings.storage)
    for key in CLASS_KEYS:  # as an older version left them
        path = store / "scores" / f"class={key}" / "part.parquet"
        table = pq.read_table(path)
        for shift in SHIFTS:
            (path.parent / f"shift={shift}").mkdir()
            pq.write_table(table.filter(pc.equal(table["shift"], shift)), path.parent / f"shift={shift}" / "part.parquet")
        path.unlink()
    result = dg.materialize(build_assets(settings), selection=["scores_db"], instance=instance,
                            resources=build_resources(settings))
    (rows_check,) = result.get_asset_check_evaluations()
    assert rows_check.passed and rows_check.metadata["partitions"].value == len(CLASS_KEYS) * len(SHIFTS)
    assert sorted(p.relative_to(store).as_posix() for p in store.glob("scores/**/*.parquet")) == [
        f"scores/class={k}/part.parquet" for k in CLASS_KEYS]
    with duckdb.connect(f"{settings.storage}/scores.duckdb", read_only=True) as con:
        from di_assets.ml.diagnosis import use_storage_root

        use_storage_root(con, settings.storage)
        assert con.execute("SELECT count(*), count(DISTINCT class || shift) FROM scores").fetchone() == (
            len(CLASS_KEYS) * len(SHIFTS) * N, len(CLASS_KEYS) * len(SHIFTS))


def test_a_grain_that_does_not_exist_is_one_line():
    with pytest.raises(SettingsError, match="partition_grain: should be one of class_shift, class, got 'shift'"):
        Settings.load(partition_grain="shift")


def test_runs_of_consecutive_indices():
    assert _runs_of([0, 1, 2, 4, 5, 7], 10) == [(0, 2), (4, 5), (7, 7)]
    assert _runs_of([0, 1, 2, 3, 4], 2) == [(0, 1), (2, 3), (4, 4)]


def test_the_driver_runs_whole_rows_of_classes_as_rectangles(tmp_path):
    """A tick's class x shift requests become few ranges (Dagster reads a multi-partition range as a
    rectangle), never one that holds a partition nobody asked for, and lookups stay linear."""
    from di_assets.defs import build_defs

    keys = [f"c{i:03d}" for i in range(300)]
    shifts = [s.key for s in select_shifts(None)][:6]
    settings = Settings.load(dataset=str(copy_classes(tmp_path / "data", ["circle"])), storage=str(tmp_path / "s"),
                             shifts=shifts, classifiers=[])
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions(CLASSES.name, keys)
        driver = LocalDriver(build_defs(settings), instance)
        pdef = driver._def("counterfactuals").partitions_def
        # every shift of every class, except two shifts of c100 and the classes from c200 on wanting only base
        wanted = {f"{c}|{s}" for c in keys for s in shifts
                  if not (c == "c100" and s in shifts[2:4]) and (c < "c200" or s == "base")}
        ranges = driver.ranges("counterfactuals", wanted)
        covered = []
        for first, last in ranges:
            covered += [str(k) for k in pdef.get_partition_keys_in_range(dg.PartitionKeyRange(first, last),
                                                                            dynamic_partitions_store=instance)]
        assert sorted(covered) == sorted(wanted) and len(covered) == len(set(covered))
        # c000-c099 and c101-c199 in rectangles of 8 classes x 6 shifts (48 partitions): 13 + 13; c100's two
        # runs of shifts: 2; c200-c299's base: 48 + 48 + 4 classes: 3
        assert len(ranges) == 13 + 2 + 13 + 3
        assert all(len(pdef.get_partition_keys_in_range(dg.PartitionKeyRange(*r), dynamic_partitions_store=instance))
                   <= RUN_PARTITIONS for r in ranges)
        assert sum(driver.range_size("counterfactuals", *r) for r in ranges) == len(wanted)
        assert driver.range_size("class_token", "c010", "c019") == 10


def test_progress_lines_are_the_first_the_last_and_a_few_between():
    from di_assets.defs.progress import ProgressLines

    class Log:
        lines: list = []

        def info(self, text):
            self.lines.append(text)

    log = Log()
    progress = ProgressLines(log, 1000, every=3600)
    for i in range(1, 1001):
        progress(i, f"pair {i}")
    assert log.lines == ["pair 1 (1/1000 partitions)", "pair 1000 (1000/1000 partitions)"]
    every = ProgressLines(log, 3, every=0)
    for i in range(1, 4):
        every(i, "x")
    assert len(log.lines) == 5
