"""gather_score_rows: the score files' rows, read again only where a file changed (scores_db's record
and its rows check use it, so that an update of one class does not read every class's files)."""

import logging
import os
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from di_assets.ml import score_rows
from di_assets.ml.io import atomic_path
from di_assets.ml.observe import RACY_NS
from di_assets.ml.score_rows import CACHE, gather_score_rows

GLOB = "scores/*/*/*.parquet"
COLUMNS = ["class_key", "shift", "sim_class", "kept"]


def write_scores(root, key, shift, sims):
    path = root / "scores" / f"class={key}" / f"shift={shift}" / "part.parquet"
    with atomic_path(path) as tmp:  # as clip_scores writes them: a new file renamed over the old
        pq.write_table(pa.table({"class_key": [key] * len(sims), "shift": [shift] * len(sims),
                                 "sim_class": pa.array(sims, pa.float32()), "kept": [s > 0 for s in sims]}), tmp)
    return path


def make_racy(root):
    """Stamp every score file a second ahead: for any gathering within that second it changed within a
    clock tick (as a file written a moment ago does, whatever the machine's load)."""
    ahead = time.time_ns() + 1_000_000_000
    for path in root.glob(GLOB):
        os.utime(path, ns=(ahead, ahead))


def settle():
    time.sleep(2 * RACY_NS / 1e9)  # files older than a clock tick: their signatures are trusted


def fresh_read(root):
    """What the `scores` view reads now, with no cache: the reference."""
    with duckdb.connect() as con:
        return sorted(con.execute(f"SELECT {', '.join(COLUMNS)} FROM read_parquet('{root}/{GLOB}', "
                                  "hive_partitioning = true, union_by_name = true)").fetchall())


def gathered(root, caplog, new_process=True, run=None):
    if new_process:  # as scores_db in the next run: only the cache on disk is left of this call
        score_rows._LAST.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="di_assets"):
        got = gather_score_rows(root, COLUMNS, run=run)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("score rows:")]
    rows = sorted(zip(*(got.table.column(c).to_pylist() for c in COLUMNS)))
    return rows, got.rows, said[-1]


def test_only_changed_new_and_racy_files_are_read_again(tmp_path, caplog):
    for key in ("a", "b", "c"):
        for shift in ("base", "at_night"):
            write_scores(tmp_path, key, shift, [0.1, -0.2, 0.3])
    rows, counts, said = gathered(tmp_path, caplog)
    assert rows == fresh_read(tmp_path) and len(rows) == 18
    assert counts == {f"scores/class={k}/shift={s}/part.parquet": 3 for k in "abc" for s in ("base", "at_night")}
    assert said == "score rows: 6 files, 6 read again, 0 from the cache"
    assert (tmp_path / CACHE).is_file()

    # changed a moment ago: racy, so not trusted yet (a write right after could keep size and time stamps)
    make_racy(tmp_path)
    gathered(tmp_path, caplog)
    assert gathered(tmp_path, caplog)[2] == "score rows: 6 files, 6 read again, 0 from the cache"
    for path in tmp_path.glob(GLOB):
        os.utime(path, ns=(0, 0))  # long ago (the ctime is now: settle)
    settle()
    gathered(tmp_path, caplog)
    kept = (tmp_path / CACHE).stat()
    rows, _, said = gathered(tmp_path, caplog)
    assert said == "score rows: 6 files, 0 read again, 6 from the cache" and rows == fresh_read(tmp_path)
    assert (tmp_path / CACHE).stat().st_ino == kept.st_ino  # nothing new: the cache is not written again

    # one class rewritten with other rows, one file removed, one class added
    write_scores(tmp_path, "b", "base", [0.9, 0.8])
    (tmp_path / "scores/class=c/shift=at_night/part.parquet").unlink()
    write_scores(tmp_path, "d", "base", [0.5])
    rows, counts, said = gathered(tmp_path, caplog)
    assert said == "score rows: 6 files, 2 read again, 4 from the cache"
    assert rows == fresh_read(tmp_path) and len(rows) == 15
    assert counts["scores/class=b/shift=base/part.parquet"] == 2 and "scores/class=c/shift=at_night/part.parquet" not in counts


def test_a_same_size_rewrite_with_its_mtime_set_back_is_read_again(tmp_path, caplog):
    path = write_scores(tmp_path, "a", "base", [0.1, 0.2])
    settle()
    gathered(tmp_path, caplog)
    stat = path.stat()
    table = pq.read_table(path)
    # in place, same size, same mtime: only the ctime (and here the inode kept) tells
    pq.write_table(table.set_column(2, "sim_class", pa.array([0.7, 0.2], pa.float32())), path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    rows, _, said = gathered(tmp_path, caplog)
    assert said == "score rows: 1 files, 1 read again, 0 from the cache"
    assert [r[2] for r in rows] == pytest.approx([0.2, 0.7])


def test_a_corrupt_or_foreign_cache_only_means_reading_again(tmp_path, caplog):
    write_scores(tmp_path, "a", "base", [0.1, 0.2])
    settle()
    gathered(tmp_path, caplog)
    (tmp_path / CACHE).write_bytes(b"not parquet")
    rows, _, said = gathered(tmp_path, caplog)
    assert said == "score rows: 1 files, 1 read again, 0 from the cache" and rows == fresh_read(tmp_path)
    assert any("ignoring the score rows cache" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # a cache of other columns (another version's) is not used for these
    gather_score_rows(tmp_path, COLUMNS[:2])
    rows, _, said = gathered(tmp_path, caplog)
    assert said.endswith("1 read again, 0 from the cache") and rows == fresh_read(tmp_path)


def test_a_cache_whose_two_files_are_of_different_writes_is_not_used(tmp_path, caplog):
    """A write killed between the index and the rows leaves them of different generations."""
    write_scores(tmp_path, "a", "base", [0.1, 0.2])
    settle()
    gathered(tmp_path, caplog)
    older_index = (tmp_path / score_rows.INDEX).read_bytes()
    write_scores(tmp_path, "a", "base", [0.3])
    settle()
    gathered(tmp_path, caplog)
    (tmp_path / score_rows.INDEX).write_bytes(older_index)
    rows, _, said = gathered(tmp_path, caplog)
    assert said == "score rows: 1 files, 1 read again, 0 from the cache" and rows == fresh_read(tmp_path)
    assert any("two files are of different writes" in r.getMessage() for r in caplog.records)


def test_the_index_of_imagenet_21k_s_score_files_can_be_read_back(tmp_path):
    """504,000 files (21,000 classes x 24 shifts): as JSON in the rows file's metadata their index would
    be 72 MB, and Parquet cannot read a footer holding 75 MB of metadata."""
    columns = ["sim_class"]
    files, shifts = [f"scores/class=n{c:08d}/shift=shift_number_{s:02d}/part.parquet"
                     for c in range(21_000) for s in range(24)], list(range(24)) * 21_000
    n = len(files)
    index = pa.table({"file": files, "size": [4000 + i // 24 for i in range(n)],
                      "mtime_ns": [1_700_000_000_000_000_000 + i // 24 for i in range(n)],
                      "ctime_ns": [1_700_000_000_000_000_000 + s for s in shifts],
                      "inode": [10_000_000 + i for i in range(n)], "rows": [1] * n,
                      "schema": ["0123456789abcdef"] * n}, schema=score_rows._index_schema())
    for c in score_rows.SIGNATURE:  # a racy file: no signature
        index = index.set_column(index.schema.get_field_index(c), c, pa.array([None] + index[c].to_pylist()[1:]))
    table = pa.table({score_rows.FILE_ID: pa.array(range(n), pa.int32()),
                      "sim_class": pa.array([0.25] * n, pa.float32())})  # a row a file
    (tmp_path / CACHE.parent).mkdir()
    score_rows._write(tmp_path, table, index, columns)
    assert (tmp_path / score_rows.INDEX).stat().st_size < 20_000_000
    cached, read_back = score_rows._load(tmp_path, columns)
    assert cached is not None and read_back.equals(index) and read_back.num_rows == 504_000
    assert cached.equals(table)


def test_cached_rows_that_do_not_match_their_index_are_not_used(tmp_path, caplog):
    """Rows that name no file of the index, or fewer rows than the index counts, are read again."""
    for key in ("a", "b"):
        write_scores(tmp_path, key, "base", [0.1, 0.2])
    settle()
    gathered(tmp_path, caplog)
    for break_it in (lambda t: t.slice(1), lambda t: t.set_column(0, score_rows.FILE_ID, pa.array([0, 0, 1, 2]))):
        cached = pq.read_table(tmp_path / CACHE)
        pq.write_table(break_it(cached).replace_schema_metadata(cached.schema.metadata), tmp_path / CACHE)
        rows, _, said = gathered(tmp_path, caplog)
        assert said == "score rows: 2 files, 2 read again, 0 from the cache" and rows == fresh_read(tmp_path)
        assert any("do not match its index" in r.getMessage() for r in caplog.records)


def test_a_corrupt_score_file_raises_as_the_view_would(tmp_path):
    write_scores(tmp_path, "a", "base", [0.1])
    settle()
    gather_score_rows(tmp_path, COLUMNS)
    bad = write_scores(tmp_path, "b", "base", [0.2])
    bad.write_bytes(b"PAR1 broken")
    with pytest.raises(duckdb.Error):
        gather_score_rows(tmp_path, COLUMNS)


def test_the_listing_is_the_views_glob_without_hidden_files(tmp_path):
    from di_assets.ml.score_rows import list_score_files

    write_scores(tmp_path, "b", "base", [0.1])
    write_scores(tmp_path, "a", "at_night", [0.1])
    (tmp_path / "scores/class=a/shift=at_night/.part.parquet.tmp-1-x").write_bytes(b"half")  # a writer's temporary
    (tmp_path / "scores/class=a/shift=at_night/notes.txt").write_text("not a score file")
    (tmp_path / "scores/class=a/stray.parquet").write_bytes(b"")  # too shallow for the glob
    (tmp_path / "scores/class=a/shift=base/folder.parquet").mkdir(parents=True)  # not a file
    globbed = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob(GLOB)
                     if p.is_file() and not p.name.startswith("."))
    assert list_score_files(tmp_path) == globbed == ["scores/class=a/shift=at_night/part.parquet",
                                                     "scores/class=b/shift=base/part.parquet"]
    assert list_score_files(tmp_path / "nowhere") == []
    assert score_rows.has_score_files(tmp_path) and not score_rows.has_score_files(tmp_path / "nowhere")
    only_not_files = tmp_path / "other"
    (only_not_files / "scores/class=a/shift=base/folder.parquet").mkdir(parents=True)
    assert not score_rows.has_score_files(only_not_files)  # a folder named *.parquet is no score file
    assert gather_score_rows(tmp_path, COLUMNS).rows == dict.fromkeys(globbed, 1)


def test_the_columnar_hive_names_are_pair_of_files():
    """count_through_view and the rows check take class, folder and pair from the file column at once."""
    from di_assets.ml.score_rows import _hive_names, class_of_file, pair_of_file

    files = [f"scores/{c}/{s}/part.parquet" for c, s in [
        ("class=a", "shift=base"), ("class=class=b", "shift=at_night"), ("plain", "shift=x"),
        ("class=chien d'été", "no_prefix"), ("class=001", "shift=shift=y"), ("class=", "shift=")]]
    names = _hive_names(pa.array(files))
    assert names["pair"].to_pylist() == [pair_of_file(f) for f in files]
    assert names["class"].to_pylist() == [pair_of_file(f).split("|")[0] for f in files] == [
        class_of_file(f) for f in files]
    assert names["folder"].to_pylist() == [f.split("/")[1] for f in files]
    per_class = [f"scores/{c}/part.parquet" for c in ("class=a", "class=class=b", "plain", "class=001", "class=")]
    names = _hive_names(pa.array(per_class), "class")  # the class grain: a file per class, no pair in its name
    assert "pair" not in names and names["class"].to_pylist() == [class_of_file(f) for f in per_class]


@pytest.mark.parametrize("coarse", [False, True])
def test_the_columnar_racy_rule_is_observes(coarse):
    """gather_score_rows drops the signatures of racy files as observe.without_racy does, columnar."""
    from di_assets.ml.observe import COARSE_RACY_NS, without_racy

    start = 1_700_000_000_000_000_000
    ago = [0, RACY_NS // 2, RACY_NS + 1_000_000_000 * coarse, COARSE_RACY_NS // 2, COARSE_RACY_NS, 3 * COARSE_RACY_NS]
    signatures = {}
    for i, back in enumerate(ago):
        stamp = start - back
        ctime = stamp - stamp % 1_000_000_000 if coarse else stamp
        signatures[f"scores/class=c{i}/shift=base/part.parquet"] = [100 + i, stamp - RACY_NS * (i % 2), ctime, 7 + i]
    fields = list(score_rows._index_schema())[:5]  # FILE and the signature's
    table = pa.table([list(signatures), *zip(*signatures.values())], schema=pa.schema(fields))
    got = score_rows._without_racy(table, start)
    expected = without_racy(signatures, start)
    assert dict(zip(got.column("file").to_pylist(), [None if r[0] is None else list(r) for r in zip(
        *(got.column(c).to_pylist() for c in score_rows.SIGNATURE))])) == expected
    assert 0 < sum(v is None for v in expected.values()) < len(ago)  # both kinds in each case


def test_files_of_other_columns_are_told_apart(tmp_path):
    write_scores(tmp_path, "a", "base", [0.1])
    write_scores(tmp_path, "b", "base", [0.2])
    assert gather_score_rows(tmp_path, COLUMNS).uniform_schema
    path = tmp_path / "scores/class=b/shift=base/part.parquet"  # as an older version wrote it: one column more
    pq.write_table(pq.read_table(path).append_column("old_column", pa.array([1])), path)
    assert not gather_score_rows(tmp_path, COLUMNS).uniform_schema


def scores_view(con, root, glob="scores/*/*/*.parquet", grain="class_shift"):
    from di_assets.defs.scores_db import HIVE, VIEWS
    from di_assets.ml.diagnosis import use_storage_root

    use_storage_root(con, root)
    con.execute(f"CREATE OR REPLACE VIEW scores AS {VIEWS['scores'].format(glob=glob, hive=HIVE[grain], unify='')}")


def test_the_view_counts_only_the_classes_that_changed(tmp_path):
    from di_assets.ml.score_rows import count_through_view

    for key in ("a", "b", "c", "d"):
        for shift in ("base", "at_night"):
            write_scores(tmp_path, key, shift, [0.1, 0.2, 0.3])
    settle()
    con = duckdb.connect()
    scores_view(con, tmp_path)
    first = count_through_view(con, tmp_path, gather_score_rows(tmp_path, COLUMNS))
    assert first == {"db_rows": 24, "counted": 8, "mismatched": []}  # the first time: every pair
    # nothing changed: one class still goes through the view, so that a broken view cannot pass
    assert count_through_view(con, tmp_path, gather_score_rows(tmp_path, COLUMNS)) == {
        "db_rows": 24, "counted": 2, "mismatched": []}
    write_scores(tmp_path, "c", "base", [0.5])  # class c rewritten: 1 row instead of 3
    settle()
    assert count_through_view(con, tmp_path, gather_score_rows(tmp_path, COLUMNS)) == {
        "db_rows": 22, "counted": 2, "mismatched": []}
    # a view that reads less than the files: its new definition means every class is counted again
    scores_view(con, tmp_path, glob="scores/*/shift=base/*.parquet")
    wrong = count_through_view(con, tmp_path, gather_score_rows(tmp_path, COLUMNS))
    assert wrong["counted"] == 8 and wrong["mismatched"] == ["a|at_night", "b|at_night", "c|at_night", "d|at_night"]
    assert wrong["db_rows"] == 10
    scores_view(con, tmp_path)
    assert count_through_view(con, tmp_path, gather_score_rows(tmp_path, COLUMNS))["counted"] == 8


def test_the_views_memo_is_a_row_per_file_and_a_broken_one_means_counting_every_class(tmp_path):
    import pyarrow.parquet as pq

    from di_assets.ml.score_rows import COUNTED, LEGACY_COUNTED, count_through_view

    for key in ("a", "b", "c"):
        for shift in ("base", "at_night"):
            write_scores(tmp_path, key, shift, [0.1, 0.2])
    settle()
    (tmp_path / LEGACY_COUNTED).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / LEGACY_COUNTED).write_text('{"view": "old", "files": {}}')  # an older version's memo
    con = duckdb.connect()
    scores_view(con, tmp_path)
    rows = gather_score_rows(tmp_path, COLUMNS)
    assert count_through_view(con, tmp_path, rows)["counted"] == 6
    memo = pq.read_table(tmp_path / COUNTED)
    assert sorted(memo.column("file").to_pylist()) == sorted(rows.rows)
    assert memo.column("rows").to_pylist() == [2] * 6
    inodes = dict(zip(rows.index.column("file").to_pylist(), rows.index.column("inode").to_pylist()))
    assert memo.column("inode").to_pylist() == [inodes[f] for f in memo.column("file").to_pylist()]
    assert not (tmp_path / LEGACY_COUNTED).exists()
    assert count_through_view(con, tmp_path, rows)["counted"] == 2  # read back: one class, as always
    # a memo of another order (an older version's listing order) is still read; one naming a file twice is not
    pq.write_table(memo.take(list(range(memo.num_rows))[::-1]), tmp_path / COUNTED)
    assert count_through_view(con, tmp_path, rows)["counted"] == 2
    pq.write_table(pa.concat_tables([memo, memo.slice(0, 1)]), tmp_path / COUNTED)
    assert count_through_view(con, tmp_path, rows)["counted"] == 6
    (tmp_path / COUNTED).write_bytes(b"half a memo")
    assert count_through_view(con, tmp_path, rows) == {"db_rows": 12, "counted": 6, "mismatched": []}
    assert pq.read_table(tmp_path / COUNTED).num_rows == 6

def test_a_changed_class_is_counted_through_the_views_own_sql_over_its_folder_only(tmp_path):
    from di_assets.ml.score_rows import count_through_view, narrowed_view

    for key in ("a", "b", "c", "d"):
        write_scores(tmp_path, key, "base", [0.1, 0.2])
    settle()
    con = duckdb.connect()
    scores_view(con, tmp_path)
    assert count_through_view(con, tmp_path, gather_score_rows(tmp_path, COLUMNS))["counted"] == 4
    write_scores(tmp_path, "c", "base", [0.5])
    settle()
    rows = gather_score_rows(tmp_path, COLUMNS)
    # class a's file broken after the gathering: the whole view cannot be read, the count of c never opens it
    (tmp_path / "scores/class=a/shift=base/part.parquet").write_bytes(b"not parquet")
    with pytest.raises(duckdb.Error):
        con.execute("SELECT count(*) FROM scores").fetchall()
    assert count_through_view(con, tmp_path, rows) == {"db_rows": 7, "counted": 1, "mismatched": []}

    sql = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'scores'").fetchone()[0]
    narrow = narrowed_view(sql, ["class=c", "class=d"])
    assert "['scores/class=c/*/*.parquet', 'scores/class=d/*/*.parquet']" in narrow and "scores/*/" not in narrow
    assert con.execute(f"SELECT count(*) FROM ({narrow})").fetchone()[0] == 3
    # a view without exactly one `scores/*/` glob is read whole
    assert narrowed_view(sql.replace("scores/*/", "scores/class=b/"), ["class=c"]) is None


def test_a_class_named_like_a_number_keeps_its_name_in_the_view(tmp_path):
    from di_assets.ml.score_rows import count_through_view

    write_scores(tmp_path, "001", "base", [0.1, 0.2])
    write_scores(tmp_path, "002", "base", [0.3])
    con = duckdb.connect()
    scores_view(con, tmp_path)
    assert sorted(con.execute("SELECT DISTINCT class FROM scores").fetchall()) == [("001",), ("002",)]
    assert count_through_view(con, tmp_path, gather_score_rows(tmp_path, COLUMNS)) == {
        "db_rows": 3, "counted": 2, "mismatched": []}


def test_a_second_call_in_the_same_process_reuses_the_first_while_nothing_changed(tmp_path, caplog):
    write_scores(tmp_path, "a", "base", [0.1, 0.2])
    settle()
    first = gathered(tmp_path, caplog)
    assert gathered(tmp_path, caplog, new_process=False) == (
        first[0], first[1], "score rows: 1 files, unchanged since the last call in this process")
    write_scores(tmp_path, "a", "base", [0.3])  # changed in between: read again
    rows, counts, said = gathered(tmp_path, caplog, new_process=False)
    assert said == "score rows: 1 files, 1 read again, 0 from the cache" and rows == fresh_read(tmp_path)
    # changed a moment ago (racy): not reused, even in the same process
    make_racy(tmp_path)
    gathered(tmp_path, caplog, new_process=False)
    assert gathered(tmp_path, caplog, new_process=False)[2] == "score rows: 1 files, 1 read again, 0 from the cache"


def test_the_rows_check_takes_the_gathering_of_its_run(tmp_path, caplog):
    """scores_db and its rows check in one run see the same files: the check does not list them again."""
    write_scores(tmp_path, "a", "base", [0.1, 0.2])
    settle()
    first = gathered(tmp_path, caplog, run="run-1")
    write_scores(tmp_path, "a", "base", [0.3])  # after scores_db gathered: its run's check does not look
    assert gathered(tmp_path, caplog, new_process=False, run="run-1") == (
        first[0], first[1], "score rows: 1 files, as gathered before in this run")
    rows, _, said = gathered(tmp_path, caplog, new_process=False, run="run-2")  # the next run looks again
    assert said == "score rows: 1 files, 1 read again, 0 from the cache" and rows == fresh_read(tmp_path) != first[0]


def test_a_killed_writers_temporary_goes_even_when_nothing_is_written(tmp_path):
    """The fault-injection test kills runs mid-write: the next gathering removes what the killed one
    left, also when its cache needs no new write."""
    import subprocess

    write_scores(tmp_path, "a", "base", [0.1])
    settle()
    gather_score_rows(tmp_path, COLUMNS)
    ended = subprocess.Popen(["true"])
    ended.wait()
    dead = ended.pid  # the pid of a writer that is gone
    for memo in (CACHE, score_rows.COUNTED):
        (tmp_path / memo).parent.mkdir(exist_ok=True)
        (tmp_path / memo.parent / f".{memo.name}.tmp-{dead}-x").write_bytes(b"half")
    score_rows._LAST.clear()
    got = gather_score_rows(tmp_path, COLUMNS)
    assert not (tmp_path / CACHE.parent / f".{CACHE.name}.tmp-{dead}-x").exists()
    con = duckdb.connect()
    scores_view(con, tmp_path)
    score_rows.count_through_view(con, tmp_path, got)  # writes its memo: the first count
    (tmp_path / score_rows.COUNTED.parent / f".{score_rows.COUNTED.name}.tmp-{dead}-x").write_bytes(b"half")
    score_rows.count_through_view(con, tmp_path, got)  # nothing new to write
    assert [p.name for p in (tmp_path / CACHE.parent).iterdir() if ".tmp-" in p.name] == []


# The class grain: a file per class holding its shifts (`scores/class=<c>/part.parquet`).
CLASS_GLOB = "scores/*/*.parquet"


def write_class_scores(root, key, sims_by_shift):
    """A class's one score file, as clip_scores writes it at the class grain."""
    path = root / "scores" / f"class={key}" / "part.parquet"
    tables = [pa.table({"class_key": [key] * len(sims), "shift": [shift] * len(sims),
                        "sim_class": pa.array(sims, pa.float32()), "kept": [s > 0 for s in sims]})
              for shift, sims in sims_by_shift.items()]
    with atomic_path(path) as tmp:
        pq.write_table(pa.concat_tables(tables), tmp)
    return path


def test_the_class_grain_lists_a_file_per_class_and_counts_pairs_from_its_rows(tmp_path):
    from di_assets.ml.score_rows import count_through_view, list_score_files

    for key in ("a", "b", "c", "d"):
        write_class_scores(tmp_path, key, {"base": [0.1, 0.2, 0.3], "at_night": [0.4, 0.5, 0.6]})
    write_scores(tmp_path, "a", "base", [0.9])  # a per-shift file beside: merged into nothing (a's file exists)
    settle()
    rows = gather_score_rows(tmp_path, COLUMNS, grain="class")
    assert list_score_files(tmp_path, grain="class") == sorted(rows.rows) == [
        f"scores/class={k}/part.parquet" for k in "abcd"]
    assert not (tmp_path / "scores/class=a/shift=base").exists()  # the stale per-shift file went
    with duckdb.connect() as con:
        fresh = sorted(con.execute(f"SELECT {', '.join(COLUMNS)} FROM read_parquet('{tmp_path}/{CLASS_GLOB}', "
                                   "hive_partitioning = true)").fetchall())
    assert sorted(zip(*(rows.table.column(c).to_pylist() for c in COLUMNS))) == fresh and len(fresh) == 24
    assert rows.pairs == {f"{k}|{s}" for k in "abcd" for s in ("base", "at_night")}
    assert rows.pair_rows() == dict.fromkeys(rows.pairs, 3)

    con = duckdb.connect()
    scores_view(con, tmp_path, glob=CLASS_GLOB, grain="class")
    assert count_through_view(con, tmp_path, rows) == {"db_rows": 24, "counted": 8, "mismatched": []}
    write_class_scores(tmp_path, "c", {"base": [0.5], "at_night": [0.5, 0.6]})  # class c rewritten
    settle()
    assert count_through_view(con, tmp_path, gather_score_rows(tmp_path, COLUMNS, grain="class")) == {
        "db_rows": 21, "counted": 2, "mismatched": []}  # c's two pairs only
    # a view that reads less than the files: the pairs it misses are named
    con.execute(f"CREATE OR REPLACE VIEW scores AS SELECT * FROM read_parquet('{CLASS_GLOB}', "
                "hive_partitioning = true) WHERE shift = 'base'")
    wrong = count_through_view(con, tmp_path, gather_score_rows(tmp_path, COLUMNS, grain="class"))
    assert wrong["mismatched"] == [f"{k}|at_night" for k in "abcd"] and wrong["db_rows"] == 10


def test_an_older_class_grain_storage_is_merged_into_a_file_per_class(tmp_path, caplog):
    """Older versions wrote a file per pair at the class grain too: the first gathering
    merges each class's files into its one file, with the same rows, and removes them."""
    from di_assets.ml.score_rows import has_score_files

    for key in ("a", "b"):
        for shift in ("base", "at_night"):
            write_scores(tmp_path, key, shift, [0.1, 0.2] if shift == "base" else [0.3])
    before = fresh_read(tmp_path)
    baseline = tmp_path / "baseline"  # the class-name baseline's scores: scores_db asks whether it has any
    for key in ("a", "b"):
        write_scores(baseline, key, "base", [0.5])
    assert has_score_files(tmp_path, "baseline/scores", grain="class")
    assert sorted(p.relative_to(baseline).as_posix() for p in baseline.rglob("*.parquet")) == [
        "scores/class=a/part.parquet", "scores/class=b/part.parquet"]  # every class merged, not the first only
    with caplog.at_level(logging.INFO, logger="di_assets"):
        rows = gather_score_rows(tmp_path, COLUMNS, grain="class")
    assert sorted(rows.rows) == ["scores/class=a/part.parquet", "scores/class=b/part.parquet"]
    assert "score files of class=b: 2 per-shift files merged into part.parquet" in caplog.text
    assert not list(tmp_path.glob(GLOB)) and not list(tmp_path.glob("scores/*/shift=*"))
    assert sorted(zip(*(rows.table.column(c).to_pylist() for c in COLUMNS))) == before
    assert pq.read_table(tmp_path / "scores/class=a/part.parquet").num_rows == 3
    broken = write_scores(tmp_path, "c", "base", [0.1])
    broken.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"cannot merge .*class=c/shift=base/part.parquet into its class's score "
                                         r"file .*; remove it, or materialize clip_scores of class 'c' again"):
        gather_score_rows(tmp_path, COLUMNS, grain="class")
    assert broken.exists() and not (tmp_path / "scores/class=c/part.parquet").exists()  # nothing lost


def test_a_score_file_of_one_layout_removes_the_classs_files_of_the_other(tmp_path):
    """clip_scores after the grain changed: the class's files of the other layout are stale."""
    from di_assets.defs.clip_scores import write_scores as write_partition

    one = pa.table({"class_key": ["a"], "shift": ["base"], "sim_class": pa.array([0.1], pa.float32())})
    write_scores(tmp_path, "a", "at_night", [0.2])
    write_partition(tmp_path / "scores/class=a/part.parquet", [one, one])
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet")] == [
        "scores/class=a/part.parquet"]
    write_partition(tmp_path / "scores/class=a/shift=base/part.parquet", [one])
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet")] == [
        "scores/class=a/shift=base/part.parquet"]


def test_the_range_check_reads_a_class_file_once_and_names_the_failing_shift(tmp_path, monkeypatch):
    from di_assets.defs.clip_scores import range_check_results
    from di_assets.defs.resources import StorageResource

    storage = StorageResource(root=str(tmp_path), dataset=str(tmp_path))
    write_class_scores(tmp_path, "a", {"base": [0.1, 0.2], "at_night": [0.3]})
    write_class_scores(tmp_path, "b", {"base": [0.1], "at_night": [float("nan")]})
    sims = ["sim_class", "sim_shift", "sim_base"]
    for key in ("a", "b"):  # the columns the check reads
        path = tmp_path / f"scores/class={key}/part.parquet"
        t = pq.read_table(path)
        pq.write_table(t.append_column("sim_shift", t["sim_class"]).append_column("sim_base", t["sim_class"]), path)
    opened = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda path, **kw: opened.append(path) or real(path, **kw))
    results = range_check_results(storage, ["a", "b"], shift_keys=["base", "at_night", "in_the_snow"])
    assert sorted(str(p) for p in opened) == [str(tmp_path / f"scores/class={k}/part.parquet") for k in "ab"]
    assert set(sims) <= set(pq.read_schema(tmp_path / "scores/class=a/part.parquet").names)
    ok_a, meta_a = results["a"]
    assert not ok_a and meta_a["failed_shifts"] == "in_the_snow" and meta_a["reason"] == "in_the_snow: no rows"
    ok_b, meta_b = results["b"]
    assert not ok_b and meta_b["failed_shifts"] == "at_night, in_the_snow"
    assert meta_b["reason"].startswith("at_night: 3 NaN, inf or missing values")
    assert range_check_results(storage, ["a"], shift_keys=["base", "at_night"])["a"][0]
