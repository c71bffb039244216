"""The score files' rows that scores_db's record reads, gathered once and kept between runs.

At 1,000 classes x 24 shifts the score files are 24,000 small Parquet files: opening each costs far
more than its rows, so a fresh read of all of them takes most of a minute, while their rows, a few
columns, fit in one file of a few MB. `gather_score_rows` keeps those columns of every file in one
Parquet file (`<root>/.scores_db/rows.parquet`), and in a second one (`files.parquet`, a row a file)
each file's path, signature (size, mtime, ctime, inode: `os.stat`, no file opened), row count and
column set. A row names its file by its position in the second (FILE_ID, 4 bytes), not by its path:
the paths were two thirds of the rows' bytes, and reading and writing them most of an update's cost
of the cache at 1,000 classes. The second is columnar, not JSON in the first one's metadata: at
ImageNet-21k's 504,000 files that JSON would be 72 MB, and Parquet refuses to read a footer holding
75 MB of metadata (it also keeps it base64-encoded in the Arrow schema, past Thrift's 100 MB limit).
It reads again only the files whose signature changed, the new ones, and the racy ones (changed
within a clock tick of the last gathering: a write just after it could keep the signature;
`observe.py` says more). An update that rewrote one class's 24 files reads 24 files, whatever the
number of classes.

The cache only saves reads: a missing, unreadable or older-format cache means every file is read
again (with a warning where it existed), and the rows returned are always those the files hold now.
It also keeps each file's column set, so that scores_db knows without opening a file whether its views
must unify columns by name (`ScoreRows.uniform_schema`).

The score files are `scores/class=<c>/shift=<s>/part.parquet`, a file per class x shift pair, or at the
class grain `scores/class=<c>/part.parquet`, a file per class holding all its shifts (`grain`, as the
settings' `partition_grain`): at 1,000 classes 1,000 files to list instead of 24,000, whose listing was
most of what an update of one class spent here.

`count_through_view` does the same for scores_db's rows check: the view counts again only the classes
whose files changed since it last counted them right (`<root>/.scores_db/counted.parquet`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_path, sweep_dead_temporaries
from .observe import file_signature, racy_after

log = logging.getLogger("di_assets")

CACHE = Path(".scores_db") / "rows.parquet"
INDEX = Path(".scores_db") / "files.parquet"  # a row per score file: FILE, signature, rows, schema digest
# count_through_view's memo: a row per file the view last counted right (FILE, signature, rows), and the
# view's SQL in the Parquet metadata. Parquet, not JSON: JSON was 59 MB at ImageNet-21k, read and written whole.
COUNTED = Path(".scores_db") / "counted.parquet"
LEGACY_COUNTED = Path(".scores_db") / "counted.json"  # the memo of older versions, removed when the new one is written
VIEW_KEY = b"di_assets.view"
FORMAT = 4  # bump when the cached rows change meaning: older caches are then ignored
FILE = "file"  # the column that names each row's file, relative to the root
FILE_ID = "file_id"  # the rows' column that names each row's file: its position in the index
_LAST: dict[tuple, "ScoreRows"] = {}  # the last result per (root, columns), in this process
INDEX_KEY = b"di_assets.cache"  # in both files' Parquet metadata: format, columns, and the pair's generation
SIGNATURE = ("size", "mtime_ns", "ctime_ns", "inode")  # INDEX's columns of file_signature; null where racy
# The score files under a scores folder, by grain: a file per class x shift pair, or a file per class.
GLOBS = {"class_shift": "*/*/*.parquet", "class": "*/*.parquet"}


def score_glob(grain: str = "class_shift", folder: str = "scores") -> str:
    """The glob of `folder`'s score files at `grain` (relative to the storage root): what the views read."""
    if grain not in GLOBS:
        raise ValueError(f"grain should be one of {', '.join(GLOBS)}, got {grain!r}")
    return f"{folder}/{GLOBS[grain]}"


def _index_schema():
    """The index's columns (files.parquet, ScoreRows.index): FILE, SIGNATURE's, the file's `rows`, and
    `schema`, its column set's digest. The view's memo (COUNTED) has the same columns but `schema`."""
    import pyarrow as pa

    return pa.schema([(FILE, pa.string()), *((c, pa.int64()) for c in SIGNATURE), ("rows", pa.int64()),
                      ("schema", pa.string())])


def _load(root: Path, columns: list[str]):
    """(cached rows: FILE_ID and `columns`, index: a row per file, _index_schema()), or (None, None) where
    there is no usable cache (none, unreadable, another format or columns, the two files of different
    writes, or rows that do not match the index's counts)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not (root / CACHE).exists():
        return None, None
    try:
        # text columns as Arrow dictionaries, as Parquet keeps them: decoded only for the rows kept (_decoded)
        table, index = pq.read_table(root / CACHE, read_dictionary=columns), pq.read_table(root / INDEX)
        meta, index_meta = (json.loads(t.schema.metadata[INDEX_KEY]) for t in (table, index))
        if meta != index_meta:
            raise ValueError("its two files are of different writes")
        if meta["format"] != FORMAT or meta["columns"] != columns or table.column_names != [FILE_ID, *columns]:
            raise ValueError(f"written for format {meta['format']} and columns {meta['columns']}")
        index = index.select(_index_schema().names).cast(_index_schema())
        ids = table[FILE_ID]
        if (pc.sum(index["rows"]).as_py() or 0) != table.num_rows or ids.null_count or \
                (table.num_rows and not 0 <= pc.min(ids).as_py() <= pc.max(ids).as_py() < index.num_rows):
            raise ValueError("its rows do not match its index")
        return table, index
    except Exception as exc:  # noqa: BLE001 - any unusable cache only means reading every file again
        log.warning("ignoring the score rows cache %s (%s); reading every score file again", root / CACHE,
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return None, None


def _write(root: Path, table, index, columns: list[str]) -> None:
    """The rows and the index of one gathering. The index first, then the rows: a write killed between
    the two leaves files of different generations, which _load refuses (every file is read again)."""
    import secrets

    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {INDEX_KEY: json.dumps({"format": FORMAT, "columns": columns, "generation": secrets.token_hex(8)})}
    # Dictionary pages only for the columns whose values repeat (the rows' text and FILE_ID, the index's
    # schema digests): Parquet's default tries them on every column, and hashing values that turn out
    # unique (2.4 million scores, 24,000 paths) was a third of the rows' write and most of the index's.
    repeated = [f.name for f in table.schema if f.name == FILE_ID or pa.types.is_string(f.type)]
    for path, t, dictionary in ((root / INDEX, index, ["schema"]), (root / CACHE, table, repeated)):
        with atomic_path(path) as tmp:
            pq.write_table(t.replace_schema_metadata(meta), tmp, use_dictionary=dictionary)


def _decoded(table):
    """`table` with its dictionary columns (as _load reads text) as plain arrays of their values."""
    import pyarrow as pa

    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, table[f.name].cast(f.type.value_type))
    return table


def _same_as(table, before, columns: list[str]):
    """Per row of `table` (a row per FILE, sorted by FILE): whether `before` (a row per FILE, any order)
    holds its FILE with the same `columns`, none of them null. Columnar: 24,000 files at 1,000 classes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if before is None or not table.num_rows:
        return pa.array([False] * table.num_rows)
    if not (before.num_rows == table.num_rows and before[FILE].equals(table[FILE])):  # else aligned already
        before = table.select([FILE]).join(before.select([FILE, *columns]), FILE, join_type="left outer").sort_by(FILE)
        if before.num_rows != table.num_rows:  # a FILE twice in `before`: trust none of it
            return pa.array([False] * table.num_rows)
    same = functools.reduce(pc.and_, [pc.equal(table[c], before[c]) for c in columns])
    return pc.fill_null(same, False).combine_chunks()


def _hive_names(files, grain: str = "class_shift") -> dict:
    """Per file (`scores/<class folder>/[<shift folder>/]<name>` as _listed gives them, an Arrow string
    column): its class `folder` and the `class` its Hive folder name gives, and at the class x shift
    grain the `pair` (`<class>|<shift>`) of its folders, as pair_of_file. Split, not a regular
    expression: 7x faster at 24,000 files."""
    import pyarrow.compute as pc

    parts = pc.split_pattern(files, "/")
    folder = pc.list_element(parts, 1)
    cls = pc.replace_substring_regex(folder, "^class=", "")
    if grain == "class":  # a class's file holds every shift: its pairs are in its rows (ScoreRows.pair_rows)
        return {"folder": folder, "class": cls}
    shift = pc.list_element(parts, 2)
    return {"folder": folder, "class": cls,
            "pair": pc.binary_join_element_wise(cls, pc.replace_substring_regex(shift, "^shift=", ""), "|")}


def _read(root: Path, files: list[str], columns: list[str]):
    """`columns` of `files` (relative to `root`), read as the `scores` view reads them (Hive folder
    names, columns matched by name), with each row's file in FILE; and each file's column set."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    absolute = {str(root / f): f for f in files}
    with duckdb.connect() as con:
        table = con.sql(f"SELECT filename, {', '.join(columns)} FROM read_parquet($files, hive_partitioning = true, "
                        "union_by_name = true, filename = true)", params={"files": list(absolute)}).to_arrow_table()
    names = pa.array([absolute[f] for f in table.column("filename").to_pylist()], pa.string())
    schemas = {f: _schema_digest(pq.read_schema(path)) for path, f in absolute.items()}
    return table.drop_columns(["filename"]).add_column(0, FILE, names), schemas


def _schema_digest(schema) -> str:
    """The columns a reader binds by name: names and types, in any order."""
    return hashlib.sha256("\n".join(sorted(f"{f.name}\0{f.type}" for f in schema)).encode()).hexdigest()[:16]


def _walk(root: str | os.PathLike, folder: str, grain: str = "class_shift"):
    """(path relative to `root`, absolute path) of each non-hidden entry of score_glob(grain, folder), in
    no order. os.listdir: at 24,000 folders, DirEntry objects and pathlib's glob cost more than the listing."""
    score_glob(grain)  # a grain it knows
    top = os.path.join(root, folder)

    def names(path: str) -> list[str]:
        try:
            return [n for n in os.listdir(path) if not n.startswith(".")]  # a writer's temporaries are hidden
        except (FileNotFoundError, NotADirectoryError):
            return []

    for cls in names(top):
        if grain == "class":
            listed = names(f"{top}/{cls}")
            if any(n.startswith("shift=") for n in listed):  # an older layout's files: merged first, once
                merge_shift_files(f"{top}/{cls}")
                listed = names(f"{top}/{cls}")
            for name in listed:
                if name.endswith(".parquet"):
                    yield f"{folder}/{cls}/{name}", f"{top}/{cls}/{name}"
            continue
        for shift in names(f"{top}/{cls}"):
            for name in names(f"{top}/{cls}/{shift}"):
                if name.endswith(".parquet"):
                    yield f"{folder}/{cls}/{shift}/{name}", f"{top}/{cls}/{shift}/{name}"


def merge_shift_files(class_folder: str | os.PathLike) -> None:
    """The class grain's one score file of a class (`class=<c>/part.parquet`) from the per-shift files
    `class=<c>/shift=<s>/part.parquet` that older versions wrote at that grain (and the
    class x shift grain writes); the per-shift folders then go. Where the class's file exists already,
    they are only removed (the clip_scores writer removes them after writing it: a run killed between)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(class_folder)
    shifts = sorted(d for d in folder.glob("shift=*") if d.is_dir())
    target = folder / "part.parquet"
    if not target.exists():
        parts = []
        for f in (f for d in shifts for f in sorted(d.glob("*.parquet")) if not f.name.startswith(".")):
            try:
                parts.append(pq.read_table(f))
            except Exception as exc:  # noqa: BLE001 - kept as it is, and named
                key = folder.name.removeprefix("class=")
                raise ValueError(f"cannot merge {f} into its class's score file ({str(exc).splitlines()[0][:200]}); "
                                 f"remove it, or materialize clip_scores of class {key!r} again") from None
        if parts:
            with atomic_path(target) as tmp:
                pq.write_table(pa.concat_tables(parts, promote_options="permissive"), tmp)
        log.info("score files of %s: %d per-shift files merged into %s", folder.name, len(parts), target.name)
    for d in shifts:
        shutil.rmtree(d, ignore_errors=True)


def list_score_files(root: str | os.PathLike, folder: str = "scores", grain: str = "class_shift") -> list[str]:
    """The files of score_glob(grain, folder) under `root` (the `scores` view's glob), relative to
    `root`, sorted; hidden names (a writer's temporaries) are not score files."""
    return sorted(f for f, path in _walk(root, folder, grain) if os.path.isfile(path))


def has_score_files(root: str | os.PathLike, folder: str = "scores", grain: str = "class_shift") -> bool:
    """Whether list_score_files would list a file: the walk stops at the first one (at the class grain it
    walks every class folder, so that each one's older per-shift files are merged, as the views need)."""
    if grain == "class":
        return bool(list_score_files(root, folder, grain))
    return any(os.path.isfile(path) for _, path in _walk(root, folder, grain))


def _listed(root: Path, grain: str):
    """list_score_files's files with their file_signature (os.stat, no file opened): FILE and SIGNATURE's
    columns, sorted by FILE."""
    import pyarrow as pa

    found = []
    for f, path in _walk(root, "scores", grain):
        try:
            st = os.stat(path)
        except FileNotFoundError:  # removed since it was listed: not there now
            continue
        if stat.S_ISREG(st.st_mode):
            found.append((f, *file_signature(st)))
    found.sort()
    fields = list(_index_schema())[:1 + len(SIGNATURE)]
    return pa.table([pa.array([r[i] for r in found], f.type) for i, f in enumerate(fields)], schema=pa.schema(fields))


def _without_racy(signed, start_ns: int):
    """observe.without_racy, columnar: SIGNATURE's columns null in the rows of files that changed within
    a clock tick of `start_ns`."""
    import pyarrow.compute as pc

    ctimes = signed["ctime_ns"]
    whole = pc.equal(pc.multiply(pc.divide(ctimes, 1_000_000_000), 1_000_000_000), ctimes)  # whole seconds
    coarse = signed.num_rows > 0 and pc.all(whole).as_py()
    trusted = pc.less(pc.max_element_wise(signed["mtime_ns"], ctimes), racy_after(start_ns, coarse))
    for c in SIGNATURE:
        signed = signed.set_column(signed.schema.get_field_index(c), c, pc.if_else(trusted, signed[c], None))
    return signed


@dataclass
class ScoreRows:
    """What gather_score_rows returns: `table` (every row of every score file: FILE_ID, the position of
    its file in `index`, and the columns asked for) and `index` (a row per file, sorted by FILE: FILE,
    SIGNATURE's columns, null where the file is racy, its `rows` and its column set's digest `schema`)."""

    table: object
    index: object
    run: str | None = None  # the `run` it was gathered for
    grain: str = "class_shift"  # a file per class x shift pair, or per class (score_glob)

    @property
    def rows(self) -> dict[str, int]:
        return dict(zip(self.index[FILE].to_pylist(), self.index["rows"].to_pylist()))

    @property
    def total_rows(self) -> int:
        import pyarrow.compute as pc

        return pc.sum(self.index["rows"]).as_py() or 0

    @functools.cached_property
    def names(self) -> dict:
        """_hive_names of the index's files, once: the rows check and count_through_view both need them."""
        return _hive_names(self.index[FILE], self.grain)

    @property
    def pairs(self) -> set[str]:
        """The class x shift pairs that have a file: by its folders (pair_of_file), or at the class grain
        those its rows hold."""
        if self.grain == "class":
            return set(self.pair_rows())
        return set(self.names["pair"].to_pylist())

    def pair_rows(self, of_files=None) -> dict[str, int]:
        """{`<class>|<shift>`: rows} of the files where the mask `of_files` (a bool per index row) is
        true, or of every file. At the class grain a row's class is its file's Hive folder name, as
        the view has it, and its shift its own `shift` column."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.grain != "class":
            pairs, counts = self.names["pair"], self.index["rows"]
            if of_files is not None:
                pairs, counts = pairs.filter(of_files), counts.filter(of_files)
            out: dict[str, int] = {}
            for p, n in zip(pairs.to_pylist(), counts.to_pylist()):
                out[p] = out.get(p, 0) + n
            return out
        if "shift" not in self.table.column_names:
            raise ValueError("the class grain's pairs need the rows' `shift` column; gather it")
        ids, shifts = self.table[FILE_ID], self.table["shift"]
        if of_files is not None:
            row_mask = pc.take(of_files, ids)
            ids, shifts = ids.filter(row_mask), shifts.filter(row_mask)
        pairs = pc.binary_join_element_wise(pc.take(self.names["class"], ids), shifts.cast(pa.string()), "|")
        return dict(zip(*_value_counts(pairs)))

    @property
    def uniform_schema(self) -> bool:
        """Every file has the same columns, so a reader need not unify them by name (and may skip files
        by their Hive folder names without opening them)."""
        import pyarrow.compute as pc

        return pc.count_distinct(self.index["schema"]).as_py() <= 1


def gather_score_rows(root: str | os.PathLike, columns: list[str], run: str | None = None,
                      grain: str = "class_shift") -> ScoreRows:
    """`columns` of every row of the score files under `root` (`list_score_files` at `grain`), with FILE_ID naming
    each row's file (its position in the result's index). Reads only the files that changed since the
    last call (see the module's text), then keeps the result for the next call.

    `run` names the caller's unit of work (a Dagster run): a call for the same `run` as the last call in
    this process returns that call's result without looking at the files again. scores_db and its rows
    check then see the same files in one run, and the check does not list 24,000 files again.

    The bookkeeping is columnar (Arrow), so that beyond listing the files an update of one class costs
    about the same at 10 classes and at 1,000. A file that cannot be read raises DuckDB's error (the
    `scores` view could not read it either).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    root = Path(root)
    start = time.time_ns()
    key = (str(root.resolve()), tuple(columns), grain)
    last = _LAST.get(key)
    if run is not None and last is not None and last.run == run:
        log.info("score rows: %d files, as gathered before in this run", last.index.num_rows)
        return last
    now = _listed(root, grain)
    if last is not None and last.index.select(now.column_names).equals(now):  # a racy file's null never equals
        log.info("score rows: %d files, unchanged since the last call in this process", now.num_rows)
        last.run = run
        return last  # a second call in this process, nothing changed since
    cached, index = _load(root, columns)
    same = _same_as(now, index, list(SIGNATURE))
    unchanged, changed = now[FILE].filter(same), now[FILE].filter(pc.invert(same)).to_pylist()
    parts, entries = [], []
    if len(unchanged):
        # the cached rows of unchanged files, their FILE_ID moved from the old index's positions to now's
        kept = pc.is_in(index[FILE], value_set=unchanged)
        rows = _decoded(cached.filter(pc.take(kept, cached[FILE_ID])))
        moved = pc.take(pc.index_in(index[FILE], value_set=now[FILE]).cast(pa.int32()), rows[FILE_ID])
        parts.append(rows.set_column(0, FILE_ID, moved))
        entries.append(index.filter(kept).select([FILE, "rows", "schema"]))
    if changed:
        table, schemas = _read(root, changed, columns)
        parts.append(table.set_column(0, FILE_ID, pc.index_in(table[FILE], value_set=now[FILE]).cast(pa.int32())))
        counts = dict.fromkeys(changed, 0)
        counts.update(zip(*_value_counts(table[FILE])))
        entries.append(pa.table([pa.array(changed, pa.string()), pa.array([counts[f] for f in changed], pa.int64()),
                                 pa.array([schemas[f] for f in changed], pa.string())], names=[FILE, "rows", "schema"]))
    if not parts:
        empty = pa.table({FILE_ID: pa.array([], pa.int32()), **{c: pa.array([], pa.string()) for c in columns}})
        return ScoreRows(empty, _index_schema().empty_table(), run, grain)
    table = pa.concat_tables(parts, promote_options="permissive").select([FILE_ID, *columns])
    known = pa.concat_tables(entries).sort_by(FILE)  # now's files, in now's order
    signed = _without_racy(now, start)
    files = signed.append_column("rows", known["rows"]).append_column("schema", known["schema"])
    try:
        if index is None or not files.equals(index):  # else the cache on disk holds exactly this already
            _write(root, table, files, columns)
        else:  # what a writer killed mid-write left (atomic_path removes it when it writes)
            sweep_dead_temporaries(root / CACHE)
            sweep_dead_temporaries(root / INDEX)
    except OSError as exc:  # a read-only root still gets its rows, only not kept
        log.warning("cannot keep the score rows cache %s (%s)", root / CACHE, exc)
    log.info("score rows: %d files, %d read again, %d from the cache", now.num_rows, len(changed), len(unchanged))
    result = _LAST[key] = ScoreRows(table, files, run, grain)
    return result


def _value_counts(column) -> tuple[list[str], list[int]]:
    import pyarrow.compute as pc

    vc = pc.value_counts(column)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


def class_of_file(file: str) -> str:
    """`scores/class=<c>/...` (either layout) -> `<c>` (the name its Hive folder gives)."""
    return file.split("/")[1].removeprefix("class=")


def pair_of_file(file: str) -> str:
    """`scores/class=<c>/shift=<s>/part.parquet` -> `<c>|<s>` (the names the Hive folders give)."""
    parts = file.split("/")
    return f"{parts[-3].removeprefix('class=')}|{parts[-2].removeprefix('shift=')}"


def narrowed_view(view_sql: str, folders: list[str], folder: str = "scores") -> str | None:
    """The SELECT of a view (`view_sql` as `duckdb_views()` gives it) reading only the class folders
    `folders`: its one glob `'<folder>/*/...'` becomes a list of globs with each folder for the `*`. DuckDB
    expands a glob in full before it filters on a Hive column (0.5 s for 24,000 files, whatever the
    filter), so a count of one class through the whole view costs as much as a count of all.
    None where the view has no such glob exactly once (then only the whole view says what it reads)."""
    m = re.fullmatch(r"CREATE (?:OR REPLACE )?VIEW \S+ AS (.*?);?", view_sql.strip(), re.DOTALL)
    globs = re.findall(rf"'{re.escape(folder)}/\*/([^']*)'", m.group(1)) if m else []
    if len(globs) != 1 or not folders:
        return None
    listed = ", ".join("'{}/{}/{}'".format(folder, f.replace("'", "''"), globs[0]) for f in folders)
    return m.group(1).replace(f"'{folder}/*/{globs[0]}'", f"[{listed}]")


def count_through_view(con, root: str | os.PathLike, rows: ScoreRows, view: str = "scores") -> dict:
    """Count `view`'s rows per class x shift pair (its Hive columns `class` and `shift`) and compare
    them with the rows of the pair's files (`rows`), for the classes with a file that changed since
    the view last counted it: every class the first time, or when the view's definition changed; at
    least one class, so that the view is read every time. Those classes are read through the view's own
    SQL narrowed to their folders (`narrowed_view`), so an update of one class lists and opens that
    class's files only; the bookkeeping over every file is columnar.

    Returns {"db_rows": the view's rows (counted now, or counted before and unchanged since),
    "counted": pairs counted now, "mismatched": pairs whose count differs from their files' rows}.
    What matched is kept in `<root>/.scores_db/counted.parquet` for the next call.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(root)
    found = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = ?", [view]).fetchone()
    if found is None:
        raise ValueError(f"the database has no `{view}` view")
    memo_path = root / COUNTED
    files = rows.index.select([FILE, *SIGNATURE, "rows"])
    try:
        memo = pq.read_table(memo_path)
        before = memo.select(files.column_names).cast(files.schema) \
            if memo.schema.metadata[VIEW_KEY].decode() == found[0] else None
    except Exception:  # noqa: BLE001 - none, unreadable or another format: every class is counted again
        before = None
    names = rows.names  # in the order of files
    classes = names["class"]
    # a class is stale where a file of it is new, racy (no signature) or not as the view last counted it
    stale = set(pc.unique(classes.filter(pc.invert(_same_as(files, before, [*SIGNATURE, "rows"])))).to_pylist())
    if not stale and files.num_rows:
        stale = {pc.min(classes).as_py()}
    source, params = view, []
    if len(stale) <= len(pc.unique(classes)) // 2:
        of_stale = pc.is_in(classes, value_set=pa.array(sorted(stale), pa.string()))
        narrow = narrowed_view(found[0], sorted(pc.unique(names["folder"].filter(of_stale)).to_pylist()))
        if narrow is not None:  # the view's own reader, over the stale classes' folders only
            source = f"({narrow})"
        else:  # a filter on the Hive column: the other folders are listed but not opened
            source += f" WHERE class IN ({', '.join('?' * len(stale))})"
            params = sorted(stale)
    counted, counted_classes = {}, set(stale)
    for c, s, n in con.execute(f"SELECT class, shift, count(*) FROM {source} GROUP BY ALL", params).fetchall():
        counted[f"{c}|{s}"] = n
        counted_classes.add(c)
    if source == view:  # the whole view counted every class, those with files and those it holds
        counted_classes.update(classes.to_pylist())
    in_counted = pc.is_in(classes, value_set=pa.array(list(counted_classes), pa.string()))  # a NULL class too
    file_rows = rows.pair_rows(in_counted)  # of the counted classes' pairs
    pairs = file_rows.keys() | counted.keys()
    mismatched = {p for p in pairs if counted.get(p, 0) != file_rows.get(p, 0)}
    db_rows = sum(counted.values()) + (pc.sum(files["rows"].filter(pc.invert(in_counted))).as_py() or 0)
    # kept: the files of the classes not counted (as the memo had them), and those counted right, but racy
    # ones; a file of a class (the class grain) is right when every pair of its class is
    unit, wrong = ((classes, {p.split("|")[0] for p in mismatched}) if rows.grain == "class"
                   else (names["pair"], mismatched))
    right = pc.invert(pc.is_in(unit, value_set=pa.array(sorted(wrong), pa.string())))
    after = files.filter(pc.or_(pc.invert(in_counted), pc.and_(right, pc.is_valid(files["size"]))))
    try:
        if before is None or not after.equals(before) or not memo_path.exists():
            with atomic_path(memo_path) as tmp:  # columnar: at 21,000 classes x 24 shifts, 504,000 files
                pq.write_table(after.replace_schema_metadata({VIEW_KEY: found[0]}), tmp)
            (root / LEGACY_COUNTED).unlink(missing_ok=True)
        else:
            sweep_dead_temporaries(memo_path)
    except OSError as exc:
        log.warning("cannot keep %s (%s); the view's rows will be counted again", memo_path, exc)
    return {"db_rows": db_rows, "counted": len(pairs), "mismatched": sorted(mismatched)}
