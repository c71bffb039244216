"""Incremental observation (issue 13, item 4): only class folders whose listing changed are hashed
again, and only changed classes get an observation; the sensor looks up new classes in one query."""

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from di_assets.defs import CLASSES, build_defs
from di_assets.defs.class_images import LIFE, REMOVED
from di_assets.ml import observe
from di_assets.ml.io import hash_folder
from di_assets.settings import Settings

CLASS_IMAGES = dg.AssetKey("class_images")


def make_classes(data: Path, n: int, per_class: int = 3, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    keys = [f"c{i:03d}" for i in range(n)]
    for key in keys:
        (data / key).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(data / key / f"{j}.png")
    return keys


def age():
    """Let the last change get older than a racy listing (see observe.RACY_NS)."""
    time.sleep(1.5 * observe.RACY_NS / 1e9)


class World:
    def __init__(self, tmp: Path, instance, n: int = 5):
        self.data, self.store = tmp / "data", tmp / "store"
        self.keys = make_classes(self.data, n)
        settings = Settings.load(dataset=str(self.data), storage=str(self.store), shifts=["base"], classifiers=[])
        self.defs = build_defs(settings)
        self.instance = instance
        age()

    def observe(self):
        """Run the observation job; (observations {key: data version}, check evaluations {key: passed})."""
        res = self.defs.resolve_job_def("observe_class_images").execute_in_process(instance=self.instance)
        assert res.success
        obs = {}
        for e in res.get_asset_observation_events():
            o = e.event_specific_data.asset_observation
            obs[o.partition] = o.tags["dagster/data_version"]
        return obs, {e.partition: e.passed for e in res.get_asset_check_evaluations()}

    def sensor(self) -> dg.SensorResult:
        """class_folders_sensor, its events and partition requests applied (its runs are not this test's)."""
        from di_assets.defs.driver import LocalDriver

        result = LocalDriver(self.defs, self.instance).sensor(run=False)
        return result

    def versions(self) -> dict:
        records = self.instance.fetch_observations(CLASS_IMAGES, limit=10_000).records
        out = {}
        for r in reversed(records):  # oldest first: the latest wins
            out[r.partition_key] = r.asset_observation.tags["dagster/data_version"]
        return out

    def memo(self) -> dict:
        return json.loads((self.store / observe.MEMO).read_text())["classes"]

    def described_at(self) -> dict:
        return {k: e["described_at"] for k, e in self.memo().items()}


@pytest.fixture
def world(tmp_path):
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        w = World(tmp_path, instance)
        instance.add_dynamic_partitions(CLASSES.name, w.keys)
        yield w


def test_a_second_observation_with_nothing_changed_hashes_nothing_and_logs_nothing(world):
    obs, checks = world.observe()
    assert obs == {k: hash_folder(world.data / k) for k in world.keys}
    assert checks == {k: True for k in world.keys}
    memo_file = world.store / observe.MEMO
    before, stamp = world.described_at(), memo_file.stat().st_mtime_ns
    assert set(before) == set(world.keys)
    assert world.observe() == ({}, {})
    assert world.described_at() == before and memo_file.stat().st_mtime_ns == stamp  # not even rewritten
    assert world.versions() == obs  # Dagster keeps every class's data version


def test_a_changed_file_gives_one_observation_and_leaves_the_others(world):
    first, _ = world.observe()
    before = world.described_at()
    changed = world.data / "c002" / "1.png"
    Image.new("RGB", (8, 8), "red").save(changed)  # another size, another mtime
    age()
    obs, checks = world.observe()
    assert obs == {"c002": hash_folder(world.data / "c002")} and obs["c002"] != first["c002"]
    assert checks == {"c002": True}
    after = world.described_at()
    assert [k for k in world.keys if after[k] != before[k]] == ["c002"]
    assert world.versions() == {**first, "c002": obs["c002"]}

    # touched only: hashed again, observed again, the same data version
    st = (world.data / "c003" / "0.png").stat()
    os.utime(world.data / "c003" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    age()
    assert world.observe()[0] == {"c003": first["c003"]}
    assert world.observe() == ({}, {})


def test_a_same_size_rewrite_is_detected(world):
    first, _ = world.observe()
    f = world.data / "c001" / "0.png"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes (the PNG need not stay readable)
    f.write_bytes(bytes(data))
    assert f.stat().st_size == st.st_size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new mtime
    age()
    obs, _ = world.observe()
    assert obs == {"c001": hash_folder(f.parent)} and obs["c001"] != first["c001"]

    # the mtime set back too: the ctime still moved (on this file system)
    g = world.data / "c004" / "2.png"
    st = g.stat()
    data = bytearray(g.read_bytes())
    data[-20] ^= 0xFF
    g.write_bytes(bytes(data))
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (g.stat().st_size, g.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    age()
    obs, _ = world.observe()
    assert obs == {"c004": hash_folder(g.parent)} and obs["c004"] != first["c004"]


def test_a_full_observation_hashes_every_folder_again(world, monkeypatch):
    first, _ = world.observe()
    memo_file = world.store / observe.MEMO
    memo = json.loads(memo_file.read_text())
    memo["classes"]["c000"]["hash"] = "0" * 16  # a memo that a change the listing missed left stale
    memo_file.write_text(json.dumps(memo))
    before = world.described_at()
    monkeypatch.setenv(observe.FULL_ENV, "1")
    assert world.observe() == ({}, {})  # hashed again: the data versions are those Dagster has
    after = world.described_at()
    assert all(after[k] != before[k] for k in world.keys)
    assert world.memo()["c000"]["hash"] == first["c000"]


def test_a_deleted_memo_hashes_everything_again_with_the_same_versions(world):
    first, _ = world.observe()
    shutil.rmtree(world.store / ".observed")
    obs, checks = world.observe()
    assert obs == first and set(checks) == set(world.keys)
    assert set(world.memo()) == set(world.keys)
    assert world.observe() == ({}, {})


def test_a_corrupt_memo_warns_and_recovers(world, caplog):
    first, _ = world.observe()
    (world.store / observe.MEMO).write_text('{"stamp": "1/pillow-x", "classes": {"c000": [')
    with caplog.at_level(logging.WARNING, logger="di_assets"):
        obs, _ = world.observe()
    assert obs == first
    (msg,) = [r.getMessage() for r in caplog.records if "observation memo" in r.getMessage()]
    assert "corrupt" in msg and "describing every class folder again" in msg
    assert world.observe() == ({}, {})
    for garbage in (b"\xff\xfe", b"[]", b'{"stamp": 1, "classes": {"c000": {"hash": 3}}}'):
        (world.store / observe.MEMO).write_bytes(garbage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="di_assets"):
            assert observe.ObservationMemo(world.store).entries == {}
        assert any("corrupt" in r.getMessage() for r in caplog.records), garbage


def test_a_class_removed_and_back_gets_a_new_version_and_keeps_it(tmp_path):
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        w = World(tmp_path, instance, n=3)
        w.sensor()  # adds and observes the classes, and fills the memo ...
        first = w.versions()
        assert first == {k: hash_folder(w.data / k) for k in w.keys}
        before = w.described_at()
        assert w.observe() == ({}, {k: True for k in w.keys})  # ... so the observation hashes nothing
        assert w.described_at() == before  # again; it logs the check the sensor could not log
        shutil.move(str(w.data / "c001"), str(tmp_path / "c001"))
        w.sensor()
        assert w.versions()["c001"] == REMOVED and "c001" not in w.memo()
        shutil.move(str(tmp_path / "c001"), str(w.data / "c001"))
        age()
        w.sensor()
        back = w.versions()["c001"]
        assert back.startswith(first["c001"] + LIFE)  # the same images, a new data version
        assert w.observe() == ({}, {"c001": True})  # kept while the content stays; its check follows
        assert w.versions()["c001"] == back
        Image.new("RGB", (8, 8), "blue").save(w.data / "c001" / "0.png")
        age()
        obs, _ = w.observe()
        assert obs == {"c001": hash_folder(w.data / "c001")}


def test_a_new_instance_with_an_old_memo_gets_every_version(tmp_path):
    """The memo belongs to the storage root; a fresh Dagster instance still gets each class's version."""
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        w = World(tmp_path, instance, n=3)
        instance.add_dynamic_partitions(CLASSES.name, w.keys)
        first, _ = w.observe()
    (tmp_path / "home2").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home2")) as instance:
        w.instance = instance
        before = w.described_at()
        instance.add_dynamic_partitions(CLASSES.name, w.keys)
        obs, checks = w.observe()
        assert obs == first and set(checks) == set(w.keys)
        assert w.described_at() == before  # from the memo, not hashed again


class Counted:
    """Counts the event log queries made through a Dagster instance's storage."""

    NAMES = ("fetch_observations", "get_latest_storage_id_by_partition", "get_latest_tags_by_partition",
             "get_event_records", "get_records_for_run")

    def __init__(self, instance, monkeypatch):
        self.calls = {n: 0 for n in self.NAMES}
        storage = instance.event_log_storage
        for name in self.NAMES:
            real = getattr(storage, name)

            def wrapper(*a, _real=real, _name=name, **kw):
                self.calls[_name] += 1
                return _real(*a, **kw)

            monkeypatch.setattr(storage, name, wrapper)

    def reset(self):
        self.calls = dict.fromkeys(self.calls, 0)


def test_the_sensor_looks_up_many_new_classes_in_one_query(tmp_path, monkeypatch):
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        w = World(tmp_path, instance, n=25)
        counted = Counted(instance, monkeypatch)
        result = w.sensor()
        assert counted.calls["get_latest_storage_id_by_partition"] == 1
        assert counted.calls["fetch_observations"] == 0 and counted.calls["get_event_records"] == 0
        assert [type(e).__name__ for e in result.asset_events] == ["AssetObservation"] * 25
        assert set(w.memo()) == set(w.keys)
        before = w.described_at()
        counted.reset()
        # hashes nothing (the sensor filled the memo), logs the checks of the sensor's observations
        assert w.observe() == ({}, {k: True for k in w.keys})
        assert w.described_at() == before
        assert counted.calls == {**dict.fromkeys(Counted.NAMES, 0), "get_latest_tags_by_partition": 1,
                                 "get_latest_storage_id_by_partition": 1}
        assert w.observe() == ({}, {})


def test_a_racy_listing_is_hashed_again(tmp_path):
    (tmp_path / "c").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "c" / "0.png")
    memo = observe.ObservationMemo(tmp_path / "store")
    d, changed = memo.describe("c", tmp_path / "c")  # just written: racy
    assert changed and memo.described == ["c"] and memo.entries["c"]["racy"]
    age()
    assert memo.describe("c", tmp_path / "c") == (d, False) and memo.described == ["c", "c"]
    assert not memo.entries["c"]["racy"]
    assert memo.describe("c", tmp_path / "c") == (d, False) and memo.described == ["c", "c"]
    memo.save()
    assert observe.ObservationMemo(tmp_path / "store").entries == memo.entries


def test_the_listing_opens_no_file_and_sees_what_the_hash_sees(tmp_path, monkeypatch):
    import builtins

    folder = tmp_path / "c"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"x" * 10)
    (folder / "sub" / "b.png").write_bytes(b"y" * 10)
    (folder / ".hidden").write_bytes(b"z")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda *a, **kw: pytest.fail(f"opened {a[0]}"))
    digest, _ = observe.folder_listing(folder)
    monkeypatch.setattr(builtins, "open", real_open)
    (folder / ".hidden").write_bytes(b"zz")  # hidden: not hashed, not listed
    assert observe.folder_listing(folder)[0] == digest
    age()
    (folder / "sub" / "b.png").write_bytes(b"w" * 10)  # nested: hashed and listed
    assert observe.folder_listing(folder)[0] != digest


def test_an_unlistable_class_folder_gives_the_one_line_error(tmp_path, monkeypatch):
    """As describe_folder says it (simulated: the tests may run as root, which lists everything)."""
    folder = tmp_path / "cls"
    folder.mkdir()
    real_scandir, real_iterdir = os.scandir, Path.iterdir

    def deny(path, real):
        if str(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", lambda p=".": deny(p, real_scandir))
    monkeypatch.setattr(Path, "iterdir", lambda self: deny(self, real_iterdir))
    with pytest.raises(PermissionError, match=r"^cannot read class folder .*cls: permission denied; "
                                              r"fix its permissions or remove it$"):
        observe.ObservationMemo(tmp_path / "store").describe("cls", folder)


def test_the_preflight_walks_only_changed_folders_and_hands_its_listings_to_the_observation(tmp_path, monkeypatch):
    """`run` and `update` check the class folders before they start (cli's preflight). A folder whose
    listing the memo recorded, every top-level file an image, is not walked again, and within
    shared_listings the observation takes the preflight's listing instead of listing it again."""
    from di_assets import cli

    data, store = tmp_path / "data", tmp_path / "store"
    keys = make_classes(data, 3)
    (data / keys[2] / "notes.txt").write_text("not an image")  # skipped by the observation: walked each time
    age()
    memo = observe.ObservationMemo(store)
    for k in keys:
        memo.describe(k, data / k)
    memo.save()
    walked, listed = [], []
    real_walk, real_listing_walk = os.walk, observe._walk
    monkeypatch.setattr(os, "walk", lambda top, **kw: walked.append(Path(top).name) or real_walk(top, **kw))
    monkeypatch.setattr(observe, "_walk", lambda folder, rel, h, state: (
        listed.append(Path(folder).name) if not rel else None, real_listing_walk(folder, rel, h, state))[1])

    def preflight_then_observe():
        walked.clear(), listed.clear()
        with observe.shared_listings():
            cli._check_class_folders(str(data), str(store))
            after = observe.ObservationMemo(store)
            changed = [k for k in keys if after.describe(k, data / k)[1]]
            after.save()
        return sorted(walked), sorted(listed), changed

    assert preflight_then_observe() == ([keys[2]], keys, [])  # each folder listed once, by the preflight
    Image.new("RGB", (8, 8), "blue").save(data / keys[0] / "new.png")
    age()
    assert preflight_then_observe() == ([keys[0], keys[2]], keys, [keys[0]])
    # without a memo (or outside the storage the memo is kept in) every folder is walked, as before
    walked.clear()
    cli._check_class_folders(str(data))
    assert sorted(walked) == keys
    assert observe._HANDED is None  # nothing handed outside shared_listings
    # an emptied folder is found: its listing changed, so it is walked
    for f in (data / keys[1]).iterdir():
        f.unlink()
    (data / keys[1] / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=rf"class folder {data / keys[1]} has no readable images"):
        with observe.shared_listings():
            cli._check_class_folders(str(data), str(store))


def test_a_tick_reads_the_class_keys_once_and_requests_what_it_did_before(tmp_path, monkeypatch):
    """Dagster's evaluate_automation_conditions asks the instance for every class key once per partition
    subset it stores in its cursor (hundreds of queries a tick); the driver's tick reads them once."""
    from di_assets.defs import driver as driver_module

    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        w = World(tmp_path, instance, n=6)
        reads = []
        storage_read = instance._event_storage.get_dynamic_partitions
        monkeypatch.setattr(instance._event_storage, "get_dynamic_partitions",
                            lambda name: reads.append(name) or storage_read(name))
        drivers = {mode: driver_module.LocalDriver(w.defs, instance) for mode in ("once", "every time")}
        for d in drivers.values():
            d.tick()  # starts watching (the cursor is the driver's: the instance keeps nothing of a tick)
        w.sensor()  # the classes arrive
        count = {}
        for mode, d in drivers.items():
            if mode == "every time":  # the tick as Dagster's own helper does it, for comparison
                monkeypatch.setattr(driver_module, "dynamic_partitions_read_once",
                                    lambda instance: contextlib.nullcontext())
            reads.clear()
            assert d.tick() == {"class_token": set(w.keys)}, mode
            count[mode] = len(reads)
        assert count["once"] == 1 and count["every time"] > 20
        # outside a tick the instance reads its storage again (a class added later is seen)
        assert "get_dynamic_partitions" not in vars(instance)
        instance.add_dynamic_partitions(CLASSES.name, ["late"])
        assert "late" in instance.get_dynamic_partitions(CLASSES.name)


def test_the_read_once_block_hands_out_copies():
    from di_assets.defs.driver import dynamic_partitions_read_once

    class Store:
        calls = 0

        def get_dynamic_partitions(self, name):
            self.calls += 1
            return ["a", "b"]

    store = Store()
    with dynamic_partitions_read_once(store):
        first = store.get_dynamic_partitions("classes")
        first.append("changed by a caller")
        assert store.get_dynamic_partitions("classes") == ["a", "b"] and store.calls == 1
    assert store.get_dynamic_partitions("classes") == ["a", "b"] and store.calls == 2


def test_the_sensor_cursor_is_small_and_new_for_every_change(tmp_path):
    """Dagster stores the sensor's cursor with every tick: a digest of the class set, not the names;
    a class that leaves, comes back and leaves again gets a new removal run each time."""
    from di_assets.defs.driver import LocalDriver

    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        w = World(tmp_path, instance, n=40)

        def tick(cursor):
            result = LocalDriver(w.defs, instance).sensor(run=False, cursor=cursor)
            return result.cursor, [r.run_key for r in result.run_requests]

        cursor, runs = tick(json.dumps(w.keys))  # the cursor of an older version: names
        assert len(cursor) <= 20 and runs == []
        assert tick(cursor) == (cursor, [])  # nothing changed: the same cursor
        removals = []
        for _ in range(2):
            shutil.move(str(w.data / "c007"), str(tmp_path / "c007"))
            cursor, runs = tick(cursor)
            removals += runs
            shutil.move(str(tmp_path / "c007"), str(w.data / "c007"))
            age()
            cursor, runs = tick(cursor)
            assert runs == [] and len(cursor) <= 20
        assert len(removals) == 2 and removals[0] != removals[1]
