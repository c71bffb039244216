"""Asset checks: one result per partition, the failing partitions named, each check executable alone
(it reads the files), and a failed token check stops that class's counterfactuals and no other's."""

import dataclasses
import shutil
from pathlib import Path

import dagster as dg
import pytest

from di_assets.defs import CLASSES, build_defs
from di_assets.defs.class_images import IMAGES_CHECK
from di_assets.defs.class_token import TOKEN_CHECK
from di_assets.defs.clip_scores import RANGE_CHECK
from di_assets.defs.counterfactuals import COUNT_CHECK
from di_assets.defs.driver import LocalDriver
from di_assets.defs.encoder_root import ROOT_CHECK
from di_assets.defs.scores_db import ROWS_CHECK
from di_assets.settings import Settings
from di_assets_tests.conftest import copy_classes

BLOW_UP = 1e4  # square's token ends this many times larger than trained: finite, far past the norm limit


def settings_for(tmp: Path, data: Path) -> Settings:
    return Settings.load(dataset=str(data), storage=str(tmp / "store"), shifts=["base"], classifiers=[],
                         textual_inversion={"steps": 2, "batch_size": 1}, generation={"num_samples": 1})


def check_key(asset: str, name: str) -> dg.AssetCheckKey:
    return dg.AssetCheckKey(dg.AssetKey(asset), name)


def run_check_alone(defs: dg.Definitions, instance, key: dg.AssetCheckKey, first=None, last=None):
    """What the UI's "Execute" on a check launches: the check alone, on a partition or a range."""
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=set(), asset_check_selection={key})
    tags = {} if first is None else {"dagster/asset_partition_range_start": first,
                                     "dagster/asset_partition_range_end": last or first}
    return job.execute_in_process(instance=instance, tags=tags, raise_on_error=False)


def by_partition(result) -> dict:
    return {e.partition: e for e in result.get_asset_check_evaluations()}


def failure_message(result) -> str:
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    return failure.step_failure_data.error.message


class Daemon(LocalDriver):
    """LocalDriver as the daemon runs it: a failed run is recorded, and the next tick goes on."""

    def __init__(self, defs, instance):
        super().__init__(defs, instance)
        self.failed = []

    def materialize(self, selection, partition_key=None, tags=None):
        res = self.job.execute_in_process(instance=self.instance, partition_key=partition_key, tags=tags or {},
                                          asset_selection=[dg.AssetKey.from_user_string(s) for s in selection],
                                          raise_on_error=False)
        if not res.success:
            self.failed.append((selection, failure_message(res)))
        return res


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """Automation over two classes; square's token comes out with a huge (finite) norm."""
    import di_assets.ml.textual_inversion as ti
    import di_assets.ml.train_tokens as train_tokens

    tmp = tmp_path_factory.mktemp("checks")
    data = copy_classes(tmp / "data", per_class=2)
    settings = settings_for(tmp, data)
    settings.textual_inversion["workers"] = 1  # trained in this process, where the patch below is
    defs = build_defs(settings)
    real = train_tokens.run_textual_inversion_many

    def square_blows_up(classes, **kw):
        results = real(classes, **kw)
        for i, (c, r) in enumerate(zip(classes, results)):
            if c.class_name == "square":
                ti.save_learned_embeds(Path(c.output_dir) / ti.EMBEDS_FILE, c.token, r.embeds * BLOW_UP)
                results[i] = dataclasses.replace(r, embeds=r.embeds * BLOW_UP)
        return results

    (tmp / "home").mkdir()
    with pytest.MonkeyPatch.context() as mp, dg.instance_for_test(temp_dir=str(tmp / "home")) as instance:
        mp.setattr(train_tokens, "run_textual_inversion_many", square_blows_up)
        daemon = Daemon(defs, instance)
        assert daemon.tick() == {}  # automation watches before any class exists
        daemon.sensor()  # adds the classes (and observes them)
        requested = daemon.settle()
        yield daemon, requested, Path(settings.storage), settings


@pytest.mark.slow  # the module's world: textual inversion, generation and scores
def test_a_failed_token_check_stops_that_class_and_no_other(flow):
    daemon, requested, store, _ = flow
    # one range run trained both classes; its token check failed for square only, and said so
    assert requested["class_token"] == {"circle", "square"}
    ((selection, message),) = daemon.failed
    assert selection == ["class_token"]
    assert f"{TOKEN_CHECK} failed for 1 of 2 partitions of class_token: square" in message
    # automation made the root (with both tokens) and circle's images and scores; square's counterfactuals
    # never ran. (scores_db waits for every class's scores, as its eager condition always did.)
    assert requested["encoder_root"] == {None}
    assert requested["counterfactuals"] == {"circle|base"} and requested["clip_scores"] == {"circle|base"}
    instance = daemon.instance
    assert instance.get_materialized_partitions(dg.AssetKey("class_token")) == {"circle", "square"}
    assert instance.get_materialized_partitions(dg.AssetKey("counterfactuals")) == {"circle|base"}
    assert (store / "images" / "circle" / "base" / "0.png").is_file()
    assert not (store / "images" / "square").exists()
    assert daemon.settle() == {}  # and square stays blocked: nothing more is asked for


@pytest.mark.slow  # the module's world: textual inversion, generation and scores
def test_each_partition_has_its_own_check_record(flow):
    daemon, _, _, _ = flow
    storage = daemon.instance.event_log_storage
    infos = {i.partition_key: i for i in storage.get_asset_check_partition_info(
        [check_key("class_token", TOKEN_CHECK)], partition_keys=["circle", "square"])}
    assert {k: (i.latest_execution_status.value, i.is_current) for k, i in infos.items()} == {
        "circle": ("SUCCEEDED", True), "square": ("FAILED", True)}
    history = storage.get_asset_check_execution_history(check_key("class_token", TOKEN_CHECK), limit=10)
    (evaluation,) = [r.event.dagster_event.event_specific_data for r in history
                     if r.event.dagster_event.event_specific_data.partition == "square"]
    assert evaluation.partition == "square" and not evaluation.passed and evaluation.blocking
    meta = {k: v.value for k, v in evaluation.metadata.items()}
    assert meta["failed"] == "square" and meta["failed_count"] == 1 and meta["checked"] == 2
    assert meta["norm"] > meta["norm_limit"] and "norm" in meta["reason"]
    # the other stages' checks ran after their assets, per partition (circle|base) or once
    for key, partition in [(check_key("counterfactuals", COUNT_CHECK), "circle|base"),
                           (check_key("clip_scores", RANGE_CHECK), "circle|base")]:
        (info,) = storage.get_asset_check_partition_info([key], partition_keys=[partition])
        assert info.latest_execution_status.value == "SUCCEEDED" and info.is_current, key
    record = daemon.instance.get_latest_asset_check_evaluation_record(check_key("encoder_root", ROOT_CHECK))
    assert record.status.value == "SUCCEEDED"


@pytest.mark.slow  # the module's world: textual inversion, generation and scores
def test_a_run_by_hand_refuses_the_failed_class(flow):
    daemon, _, store, _ = flow
    for first in ("square|base", "circle|base"):  # the class alone, and a range that also holds circle
        tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": "square|base"}
        res = daemon.job.execute_in_process(instance=daemon.instance, tags=tags, raise_on_error=False,
                                            asset_selection=[dg.AssetKey("counterfactuals")])
        assert not res.success
        assert f"the token of class square failed its blocking check {TOKEN_CHECK}" in failure_message(res)
    assert not (store / "images" / "square").exists()
    assert daemon.instance.get_materialized_partitions(dg.AssetKey("counterfactuals")) == {"circle|base"}


@pytest.mark.slow  # the module's world: textual inversion, generation and scores
def test_checks_execute_alone_and_a_fixed_token_unblocks_its_class(flow):
    """Fix square's token file by hand: its check, executed alone, passes; the encoder root's check sees
    that the root holds the old token; once the root is rebuilt, automation makes square's images."""
    from di_assets.ml.textual_inversion import EMBEDS_FILE, load_learned_embeds, save_learned_embeds

    daemon, _, store, _ = flow
    defs, instance = daemon.defs, daemon.instance
    path = store / "tokens" / "square" / EMBEDS_FILE
    token, embeds = load_learned_embeds(path)
    save_learned_embeds(path, token, embeds / BLOW_UP)
    token_materializations = instance.fetch_materializations(dg.AssetKey("class_token"), limit=10).records

    res = run_check_alone(defs, instance, check_key("class_token", TOKEN_CHECK), "circle", "square")
    assert res.success and {k: e.passed for k, e in by_partition(res).items()} == {"circle": True, "square": True}
    assert [s.step_key for s in res.get_step_success_events()] == ["class_token_token_is_finite_with_sane_norm"]
    assert instance.fetch_materializations(dg.AssetKey("class_token"), limit=10).records == token_materializations

    res = run_check_alone(defs, instance, check_key("encoder_root", ROOT_CHECK))
    (root,) = res.get_asset_check_evaluations()
    assert res.success and not root.passed  # not blocking: the run succeeds, the record says what is wrong
    assert root.metadata["stale"].value == "square" and root.metadata["failed_count"].value == 1

    daemon.materialize(["encoder_root"])
    assert instance.get_latest_asset_check_evaluation_record(check_key("encoder_root", ROOT_CHECK)).status.value \
        == "SUCCEEDED"
    requested = daemon.settle()
    assert requested["counterfactuals"] == {"square|base"} and requested["scores_db"] == {None}
    assert (store / "images" / "square" / "base" / "0.png").is_file()
    record = instance.get_latest_asset_check_evaluation_record(check_key("scores_db", ROWS_CHECK))
    assert record.status.value == "SUCCEEDED"
    assert not daemon.failed[1:]  # no run failed after the first one


@pytest.mark.slow  # the module's world: textual inversion, generation and scores
def test_count_range_and_rows_checks_name_what_fails(flow):
    """Break circle's files: each check, executed alone, fails for circle|base and names it.
    (After the test above, as the module's tests share one world: square|base exists now.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    daemon, _, store, _ = flow
    defs, instance = daemon.defs, daemon.instance
    images = store / "images" / "circle" / "base"
    scores = store / "scores" / "class=circle" / "shift=base" / "part.parquet"
    shutil.copy(images / "0.png", images / "7.png")  # a PNG the manifest does not list
    res = run_check_alone(defs, instance, check_key("counterfactuals", COUNT_CHECK), "circle|base", "square|base")
    evaluations = by_partition(res)
    assert not evaluations["circle|base"].passed and evaluations["square|base"].passed
    meta = {k: v.value for k, v in evaluations["circle|base"].metadata.items()}
    assert meta["failed"] == "circle|base" and meta["failed_count"] == 1 and meta["png_files"] == 2
    assert not res.success and "has_expected_image_count failed for 1 of 2 partitions" in failure_message(res)
    (images / "7.png").unlink()

    table = pq.read_table(scores)
    good = table
    table = table.set_column(table.column_names.index("sim_shift"), "sim_shift", pa.array([float("nan")], pa.float32()))
    pq.write_table(table, scores)
    res = run_check_alone(defs, instance, check_key("clip_scores", RANGE_CHECK), "circle|base", "square|base")
    evaluations = by_partition(res)
    assert res.success  # not blocking
    assert not evaluations["circle|base"].passed
    assert evaluations["circle|base"].metadata["failed"].value == "circle|base"
    assert evaluations["square|base"].passed
    pq.write_table(good, scores)

    # scores_db: a score file of no materialized partition is in the view
    extra = store / "scores" / "class=ghost" / "shift=base" / "part.parquet"
    extra.parent.mkdir(parents=True)
    pq.write_table(good, extra)
    res = run_check_alone(defs, instance, check_key("scores_db", ROWS_CHECK))
    (rows,) = res.get_asset_check_evaluations()
    meta = {k: v.value for k, v in rows.metadata.items()}
    assert not rows.passed and meta["extra"] == "ghost|base" and meta["failed"] == "ghost|base"
    assert meta["db_rows"] == meta["file_rows"] == 3  # circle, square and the ghost: one row each
    shutil.rmtree(extra.parent.parent)
    res = run_check_alone(defs, instance, check_key("scores_db", ROWS_CHECK))
    assert res.get_asset_check_evaluations()[0].passed

    # a score file that no longer reads (its rows were gathered before: the cache must not hide it)
    scores.write_bytes(b"PAR1 cut short")
    res = run_check_alone(defs, instance, check_key("scores_db", ROWS_CHECK))
    (rows,) = res.get_asset_check_evaluations()
    meta = {k: v.value for k, v in rows.metadata.items()}
    assert not rows.passed and meta["unreadable"] == "circle|base" and meta["failed"] == "circle|base"
    pq.write_table(good, scores)
    res = run_check_alone(defs, instance, check_key("scores_db", ROWS_CHECK))
    assert res.get_asset_check_evaluations()[0].passed


def test_class_images_check_per_class(tmp_path):
    """Observation reports the check for every class; executed alone, it reads the folder."""
    data = copy_classes(tmp_path / "data", per_class=1)
    (data / "empty").mkdir()
    (data / "empty" / "broken.png").write_text("not an image")
    defs = build_defs(settings_for(tmp_path, data))
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions(CLASSES.name, ["circle", "empty", "square"])
        observed = defs.resolve_job_def("observe_class_images").execute_in_process(instance=instance)
        assert observed.success
        evaluations = by_partition(observed)
        assert {k: e.passed for k, e in evaluations.items()} == {"circle": True, "empty": False, "square": True}
        assert evaluations["empty"].metadata["failed"].value == "empty"
        assert [s.step_key for s in observed.get_step_success_events()] == ["class_images"]  # the check rides inside
        res = run_check_alone(defs, instance, check_key("class_images", IMAGES_CHECK), "circle", "square")
        evaluations = by_partition(res)
        assert res.success and {k: e.passed for k, e in evaluations.items()} == {
            "circle": True, "empty": False, "square": True}
        assert "has no readable images" in evaluations["empty"].metadata["reason"].value


def test_checks_are_declared_per_partition_and_blocking_where_they_guard(tmp_path):
    defs = build_defs(settings_for(tmp_path, tmp_path / "data"))
    graph = defs.resolve_asset_graph()
    grid = defs.resolve_assets_def("counterfactuals").partitions_def
    declared = {(k.asset_key.to_user_string(), k.name): (graph.get(k).blocking, graph.get(k).partitions_def)
                for k in graph.asset_check_keys}
    assert declared == {
        ("class_images", IMAGES_CHECK): (False, CLASSES),
        ("class_token", TOKEN_CHECK): (True, CLASSES),
        ("encoder_root", ROOT_CHECK): (False, None),
        ("counterfactuals", COUNT_CHECK): (True, grid),
        ("clip_scores", RANGE_CHECK): (False, grid),
        ("scores_db", ROWS_CHECK): (False, None),
    }
    # no asset computes a check inside itself any more: every check can run without its asset
    for key in ("class_token", "counterfactuals", "clip_scores"):
        assert not defs.resolve_assets_def(key).check_specs_by_output_name


@pytest.mark.slow  # the module's world
def test_the_scores_view_unifies_columns_only_while_files_differ(flow):
    """Unifying columns by name opens every file for every query; the view does it only while score
    files of different columns (two code versions) coexist, and reads them all then."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from di_assets.ml.diagnosis import use_storage_root

    daemon, _, store, _ = flow
    path = store / "scores" / "class=circle" / "shift=base" / "part.parquet"

    def view():
        with duckdb.connect(str(store / "scores.duckdb"), read_only=True) as con:
            use_storage_root(con, store)
            sql = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'scores'").fetchone()[0]
            return "union_by_name" in sql, con.execute("SELECT class, count(*) FROM scores GROUP BY ALL ORDER BY 1").fetchall()

    def view_ids():
        with duckdb.connect(str(store / "scores.duckdb"), read_only=True) as con:
            return dict(con.execute("SELECT view_name, view_oid FROM duckdb_views() WHERE NOT internal").fetchall())

    daemon.materialize(["scores_db"])
    assert view() == (False, [("circle", 1), ("square", 1)])
    made = view_ids()
    daemon.materialize(["scores_db"])  # the same SQL: the views stay (creating one lists all its files)
    assert view_ids() == made and {"scores", "mean_scores", "dropped"} <= made.keys()
    good = pq.read_table(path)
    pq.write_table(good.append_column("older_column", pa.array([7])), path)
    daemon.materialize(["scores_db"])
    assert view() == (True, [("circle", 1), ("square", 1)])
    res = run_check_alone(daemon.defs, daemon.instance, check_key("scores_db", ROWS_CHECK))
    assert res.get_asset_check_evaluations()[0].passed
    pq.write_table(good, path)
    daemon.materialize(["scores_db"])
    assert view() == (False, [("circle", 1), ("square", 1)])


def test_name_list_names_at_most_fifty():
    """Log lines, check metadata and the command's dataset line name at most 50 classes (21,000 at ImageNet-21k)."""
    from di_assets.defs.checks import MAX_NAMED, name_list

    keys = [f"c{i:05d}" for i in range(21_000)]
    assert name_list(keys[:3]) == "c00000, c00001, c00002" and name_list([]) == ""
    assert name_list(keys) == ", ".join(keys[:MAX_NAMED]) + f" (and {21_000 - MAX_NAMED} more)"
    assert MAX_NAMED == 50 and len(name_list(keys)) < 500
