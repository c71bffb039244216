"""Change-driven reruns: when a class changes, appears or disappears, only what it affects reruns.

Driven as the Dagster daemon drives it: the sensor and the observation job run, declarative
automation is evaluated tick by tick, and every requested partition is executed.
"""

import hashlib
import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import dagster as dg
import pytest

from di_assets.defs import CLASSES, build_assets, build_defs
from di_assets.defs.driver import LocalDriver
from di_assets.settings import Settings
from di_assets_tests.conftest import EXAMPLE, copy_classes

pytestmark = pytest.mark.slow

SHIFTS = ["base", "at_night"]


class World(LocalDriver):
    def __init__(self, tmp: Path, instance):
        self.tmp = tmp
        self.data = copy_classes(tmp / "data", classes=("circle", "square", "star"), per_class=4)
        self.settings = self.with_classifiers(JUDGE)
        super().__init__(build_defs(self.settings), instance)
        self.store = Path(self.settings.storage)

    def with_classifiers(self, *classifiers) -> Settings:
        return Settings.load(dataset=str(self.data), storage=str(self.tmp / "store"), shifts=SHIFTS,
                             textual_inversion={"steps": 4}, generation={"num_samples": 2},
                             classifiers=list(classifiers))

    def redefine(self, settings: Settings) -> None:
        """The code location reloaded with other settings; automation keeps its cursor."""
        cursor = self.cursor
        self.settings = settings
        super().__init__(build_defs(settings), self.instance)
        self.cursor = cursor

    def digest(self, key: str) -> str:
        h = hashlib.sha256()
        for root in (self.store / "tokens" / key, self.store / "images" / key, self.store / "scores" / f"class={key}",
                     *self.store.glob(f"predictions/classifier=*/class={key}")):
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    h.update(str(p.relative_to(self.store)).encode() + p.read_bytes())
        return h.hexdigest()

    def indices(self) -> dict[str, int]:
        meta = json.loads((self.store / "encoder_root" / "tokens.json").read_text())
        return {c["key"]: c["index"] for c in meta["classes"]}

    def query(self, sql: str) -> str:
        from di_assets.cli import main

        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(["query", "--storage", str(self.store), sql]) == 0
        return buf.getvalue()


JUDGE = {"name": "judge", "kind": "reference", "model": "judge", "device": "cpu"}


def grid(cls):
    return {f"{cls}|{s}" for s in SHIFTS}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reruns")
    (tmp / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp / "home")) as instance:
        w = World(tmp, instance)
        assert w.tick() == {}  # automation starts watching before any class exists
        w.sensor()
        first = w.settle()  # new classes are materialized by automation alone
        assert first["class_token"] == {"circle", "square", "star"}
        assert first["counterfactuals"] == grid("circle") | grid("square") | grid("star")
        assert first["predictions/judge"] == first["counterfactuals"] and first["diagnosis"] == {None}
        yield w


def test_a_changed_class_reruns_only_its_own_partitions(world):
    before = {c: world.digest(c) for c in ("circle", "square", "star")}
    indices = world.indices()
    shutil.copy(EXAMPLE / "square" / "square_05.png", world.data / "square" / "square_05.png")  # a file added
    world.observe()
    requested = world.settle()
    assert requested == {
        "class_token": {"square"}, "encoder_root": {None}, "counterfactuals": grid("square"),
        "clip_scores": grid("square"), "scores_db": {None},
        "real_predictions/judge": {"square"}, "predictions/judge": grid("square"), "diagnosis": {None},
    }
    after = {c: world.digest(c) for c in before}
    assert after["circle"] == before["circle"] and after["star"] == before["star"]  # byte for byte
    assert after["square"] != before["square"]
    assert world.indices() == indices
    # the encoder root read square's new token file only: the others are as it last read them
    run = world.instance.get_latest_materialization_event(dg.AssetKey("encoder_root")).run_id
    said = [e.user_message for e in world.instance.all_logs(run) if e.user_message.startswith("encoder root: ")]
    assert said == ["encoder root: 1 token files read, 2 classes as the root held them"]
    assert world.settle() == {}  # and then it is quiet


def test_a_new_class_is_added_materialized_and_queryable(world):
    import random

    from di_assets.reference_world.world import Item, draw

    indices = world.indices()
    (world.data / "heart").mkdir()
    rng = random.Random(0)
    for i in range(4):  # a shape the judge knows, drawn by the reference world
        draw(Item("heart", "purple", "plain"), rng).save(world.data / "heart" / f"heart_{i}.png")
    result = world.sensor()
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [["heart"]]
    requested = world.settle()
    assert requested["class_token"] == {"heart"} and requested["counterfactuals"] == grid("heart")
    assert requested["predictions/judge"] == grid("heart") and requested["real_predictions/judge"] == {"heart"}
    assert world.indices() == {**indices, "heart": 3}  # old indices unchanged
    out = world.query("SELECT count(*) AS n FROM scores WHERE class_key = 'heart'")
    assert out.splitlines()[2].strip() == str(2 * len(SHIFTS))
    out = world.query("SELECT real_images, real_accuracy FROM real_vs_base WHERE class_key = 'heart'")
    assert out.splitlines()[2].split() == ["4", "1.0000"]  # the judge knows real hearts


def test_a_new_classifier_is_evaluated_alone_and_a_changed_one_reruns_alone(world):
    second = {"name": "second", "kind": "reference", "model": "diagnosed", "device": "cpu"}
    world.redefine(world.with_classifiers(JUDGE, second))
    requested = world.settle()
    everything = {k for k in world.instance.get_dynamic_partitions(CLASSES.name)}
    assert set(requested) == {"predictions/second", "real_predictions/second", "diagnosis"}
    assert requested["real_predictions/second"] == everything
    out = world.query("SELECT DISTINCT classifier FROM accuracy ORDER BY 1")
    assert [line.strip() for line in out.splitlines()[2:]] == ["judge", "second"]
    judge_files = {p: p.stat().st_mtime_ns for p in world.store.glob("predictions/classifier=judge/*/*/*.parquet")}

    world.redefine(world.with_classifiers(JUDGE, {**second, "model": "judge"}))  # `second` changes
    requested = world.settle()
    assert set(requested) == {"predictions/second", "real_predictions/second", "diagnosis"}
    assert judge_files == {p: p.stat().st_mtime_ns
                           for p in world.store.glob("predictions/classifier=judge/*/*/*.parquet")}
    world.redefine(world.with_classifiers(JUDGE))
    assert world.settle() == {}


def test_a_removed_class_leaves_the_views_and_goes_to_trash(world):
    shutil.rmtree(world.data / "star")
    world.sensor()
    assert "star" not in world.instance.get_dynamic_partitions(CLASSES.name)
    assert "star" not in world.indices()
    out = world.query("SELECT DISTINCT class_key FROM scores ORDER BY 1")
    assert "star" not in out and "circle" in out
    trashed = list((world.store / "trash").glob("*-star"))
    assert len(trashed) == 1 and list(trashed[0].glob("scores/class=star/shift=*/part.parquet"))
    assert list(trashed[0].glob("predictions/classifier=judge/class=star/shift=*/part.parquet"))
    out = world.query("SELECT DISTINCT class_key FROM predictions ORDER BY 1")
    assert "star" not in out and "circle" in out
    assert not (world.store / "tokens" / "star").exists()
    assert world.settle() == {"diagnosis": {None}}  # the report follows the rebuilt views
    assert "star" not in (world.store / "diagnosis" / "report.html").read_text()
    assert world.settle() == {}


def test_generation_settings_change_marks_images_stale_but_not_tokens(world):
    # Dagster's own stale-status resolver, as the UI uses it.
    from dagster._core.definitions.data_version import StaleStatus
    from dagster._utils.test.data_versions import get_stale_status_resolver

    def status(settings, key, partition=None):
        resolver = get_stale_status_resolver(world.instance, build_assets(settings))
        return resolver.get_status(dg.AssetKey(key), partition)

    assert status(world.settings, "class_token", "circle") == StaleStatus.FRESH
    assert status(world.settings, "counterfactuals", "circle|base") == StaleStatus.FRESH
    changed = Settings.load(dataset=world.settings.dataset, storage=world.settings.storage, shifts=SHIFTS,
                            textual_inversion={"steps": 4}, generation={"num_samples": 2, "guidance_scale": 3.0})
    assert status(changed, "class_token", "circle") == StaleStatus.FRESH
    assert status(changed, "counterfactuals", "circle|base") == StaleStatus.STALE
    # Dagster does not carry staleness through partitioned assets; once the images are
    # regenerated, their scores are stale (and their eager condition reruns them).
    build_defs(changed).resolve_implicit_global_asset_job_def().execute_in_process(
        instance=world.instance, partition_key="circle|base", asset_selection=[dg.AssetKey("counterfactuals")])
    assert status(changed, "counterfactuals", "circle|base") == StaleStatus.FRESH
    assert status(changed, "clip_scores", "circle|base") == StaleStatus.STALE
    assert status(changed, "clip_scores", "square|base") == StaleStatus.FRESH

    retrained = Settings.load(dataset=world.settings.dataset, storage=world.settings.storage, shifts=SHIFTS,
                              textual_inversion={"steps": 5}, generation={"num_samples": 2})
    assert status(retrained, "class_token", "circle") == StaleStatus.STALE  # a new hyperparameter


def test_removed_classes_can_be_deleted_instead(tmp_path):
    from di_assets.defs.resources import StorageResource

    store = StorageResource(root=str(tmp_path), dataset=str(tmp_path), removed_classes="delete")
    for p in store.class_artifacts("old"):
        p.mkdir(parents=True)
        (p / "f").write_text("x")
    assert store.retire_class("old") is None
    assert not any(p.exists() for p in store.class_artifacts("old")) and not (tmp_path / "trash").exists()
    with pytest.raises(ValueError, match="'trash' or 'delete'"):
        StorageResource(root=str(tmp_path), dataset=str(tmp_path), removed_classes="keep").retire_class("x")
