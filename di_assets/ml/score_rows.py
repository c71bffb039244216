"""The score files' rows that scores_db's record reads, gathered once and kept between runs.

At 1,000 classes x 24 shifts the score files are 24,000 small Parquet files: opening each costs far
more than its rows, so a fresh read of all of them takes most of a minute, while their rows, a few
columns, fit in one file of a few MB. `gather_score_rows` keeps those columns of every file in one
Parquet file (`<root>/.scores_db/rows.parquet`), and in a second one (`files.parquet`, a row a file)
each file's signature (size, mtime, ctime, inode: `os.stat`, no file opened), row count and column
set. The second is columnar, not JSON in the first one's metadata: at ImageNet-21k's 504,000 files
that JSON would be 72 MB, and Parquet refuses to read a footer holding 75 MB of metadata (it also
keeps it base64-encoded in the Arrow schema, past Thrift's 100 MB limit). It reads again only the
files whose signature changed, the new ones, and the racy ones (changed within a clock tick of the
last gathering: a write just after it could keep the signature; `observe.py` says more). An update
that rewrote one class's 24 files reads 24 files, whatever the number of classes.

The cache only saves reads: a missing, unreadable or older-format cache means every file is read
again (with a warning where it existed), and the rows returned are always those the files hold now.
It also keeps each file's column set, so that scores_db knows without opening a file whether its views
must unify columns by name (`ScoreRows.uniform_schema`).

`count_through_view` does the same for scores_db's rows check: the view counts again only the classes
whose files changed since it last counted them right (`<root>/.scores_db/counted.parquet`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_path, sweep_dead_temporaries
from .observe import file_signature, without_racy

log = logging.getLogger("di_assets")

CACHE = Path(".scores_db") / "rows.parquet"
INDEX = Path(".scores_db") / "files.parquet"  # a row per score file: FILE, signature, rows, schema digest
# count_through_view's memo: a row per file the view last counted right (FILE, signature, rows), and the
# view's SQL in the Parquet metadata. Parquet, not JSON: JSON was 59 MB at ImageNet-21k, read and written whole.
COUNTED = Path(".scores_db") / "counted.parquet"
LEGACY_COUNTED = Path(".scores_db") / "counted.json"  # the memo of older versions, removed when the new one is written
VIEW_KEY = b"di_assets.view"
FORMAT = 3  # bump when the cached rows change meaning: older caches are then ignored
FILE = "file"  # the column that names each row's file, relative to the root
_LAST: dict[tuple, "ScoreRows"] = {}  # the last result per (root, columns), in this process
INDEX_KEY = b"di_assets.cache"  # in both files' Parquet metadata: format, columns, and the pair's generation
SIGNATURE = ("size", "mtime_ns", "ctime_ns", "inode")  # INDEX's columns of file_signature; null where racy


def _load(root: Path, columns: list[str]):
    """(cached table, {file: [signature or None, rows, schema digest]}), or (None, {}) where there is
    no usable cache (none, unreadable, another format or columns, or the two files of different writes)."""
    import pyarrow.parquet as pq

    if not (root / CACHE).exists():
        return None, {}
    try:
        table, index = pq.read_table(root / CACHE), pq.read_table(root / INDEX)
        meta, index_meta = (json.loads(t.schema.metadata[INDEX_KEY]) for t in (table, index))
        if meta != index_meta:
            raise ValueError("its two files are of different writes")
        if meta["format"] != FORMAT or meta["columns"] != columns or table.column_names != [FILE, *columns]:
            raise ValueError(f"written for format {meta['format']} and columns {meta['columns']}")
        return table, _file_entries(index, "schema")
    except Exception as exc:  # noqa: BLE001 - any unusable cache only means reading every file again
        log.warning("ignoring the score rows cache %s (%s); reading every score file again", root / CACHE,
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return None, {}


def _write(root: Path, table, files: dict, columns: list[str]) -> None:
    """The rows and the index of one gathering. The index first, then the rows: a write killed between
    the two leaves files of different generations, which _load refuses (every file is read again)."""
    import secrets

    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {INDEX_KEY: json.dumps({"format": FORMAT, "columns": columns, "generation": secrets.token_hex(8)})}
    index = _file_table(files, schema=pa.array([e[2] for e in files.values()], pa.string()))
    for path, t in ((root / INDEX, index), (root / CACHE, table)):
        with atomic_path(path) as tmp:
            pq.write_table(t.replace_schema_metadata(meta), tmp)


def _file_table(files: dict, **columns):
    """{file: [signature or None, rows, ...]} as columns: FILE, SIGNATURE's (null where racy), rows, and
    `columns` (Arrow arrays in the same order)."""
    import pyarrow as pa

    sigs = [e[0] or [None] * len(SIGNATURE) for e in files.values()]
    return pa.table({FILE: pa.array(list(files), pa.string()),
                     **{c: pa.array([s[i] for s in sigs], pa.int64()) for i, c in enumerate(SIGNATURE)},
                     "rows": pa.array([e[1] for e in files.values()], pa.int64()), **columns})


def _file_entries(table, *columns: str) -> dict:
    """_file_table's inverse: {file: [signature or None, rows, *columns' values]}."""
    sizes, mtimes, ctimes, inodes = (table.column(c).to_pylist() for c in SIGNATURE)
    names, rows, *more = (table.column(c).to_pylist() for c in (FILE, "rows", *columns))
    return {f: [None if size is None else [size, m, c, i], n, *rest]
            for f, size, m, c, i, n, *rest in zip(names, sizes, mtimes, ctimes, inodes, rows, *more)}


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


def list_score_files(root: str | os.PathLike, folder: str = "scores") -> list[str]:
    """The files `<folder>/*/*/*.parquet` under `root` (the `scores` view's glob), relative to `root`,
    sorted; hidden names (a writer's temporaries) are not score files. os.scandir, as pathlib's glob
    costs a second at 24,000 files."""
    found = []

    def entries(path: str):
        try:
            with os.scandir(path) as it:
                return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []

    for cls in entries(os.path.join(root, folder)):
        if cls.is_dir():
            for shift in entries(cls.path):
                if shift.is_dir():
                    found += [f"{folder}/{cls.name}/{shift.name}/{e.name}" for e in entries(shift.path)
                              if e.name.endswith(".parquet") and e.is_file()]
    return found


@dataclass
class ScoreRows:
    """What gather_score_rows returns: `table` (FILE and the columns asked for, every row of every
    score file) and `files` ({file: [signature or None where racy, rows, schema digest]})."""

    table: object
    files: dict[str, list]
    run: str | None = None  # the `run` it was gathered for

    @property
    def rows(self) -> dict[str, int]:
        return {f: e[1] for f, e in self.files.items()}

    @property
    def uniform_schema(self) -> bool:
        """Every file has the same columns, so a reader need not unify them by name (and may skip files
        by their Hive folder names without opening them)."""
        return len({e[2] for e in self.files.values()}) <= 1


def gather_score_rows(root: str | os.PathLike, columns: list[str], run: str | None = None) -> ScoreRows:
    """`columns` of every row of the score files under `root` (`list_score_files`), with FILE naming
    each row's file relative to `root`. Reads only the files that changed since the last call (see
    the module's text), then keeps the result for the next call.

    `run` names the caller's unit of work (a Dagster run): a call for the same `run` as the last call in
    this process returns that call's result without looking at the files again. scores_db and its rows
    check then see the same files in one run, and the check does not list 24,000 files again.

    A file that cannot be read raises DuckDB's error (the `scores` view could not read it either).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    root = Path(root)
    start = time.time_ns()
    key = (str(root.resolve()), tuple(columns))
    last = _LAST.get(key)
    if run is not None and last is not None and last.run == run:
        log.info("score rows: %d files, as gathered before in this run", len(last.files))
        return last
    now = {}  # file -> signature, for the files there now
    for f in list_score_files(root):
        try:
            now[f] = file_signature(os.stat(os.path.join(root, f)))  # not pathlib: 24,000 of them
        except FileNotFoundError:  # removed since it was listed: not there now
            continue
    if last is not None and {f: e[0] for f, e in last.files.items()} == now:
        log.info("score rows: %d files, unchanged since the last call in this process", len(now))
        last.run = run
        return last  # a second call in this process, nothing changed since
    cached, index = _load(root, columns)
    unchanged = [f for f, sig in now.items() if cached is not None and f in index and index[f][0] == sig]
    kept = set(unchanged)
    changed = [f for f in now if f not in kept]
    parts, schemas = [], {f: index[f][2] for f in unchanged}
    if unchanged:
        parts.append(cached.filter(pc.is_in(cached.column(FILE), pa.array(unchanged, pa.string()))))
    if changed:
        table, read_schemas = _read(root, changed, columns)
        parts.append(table)
        schemas.update(read_schemas)
    if not parts:
        return ScoreRows(pa.table({FILE: pa.array([], pa.string())}), {})
    table = pa.concat_tables(parts, promote_options="permissive").select([FILE, *columns])
    counts = dict.fromkeys(now, 0)
    for f, n in zip(*_value_counts(table.column(FILE))):
        counts[f] = n
    stable = without_racy(now, start)
    files = {f: [stable[f], counts[f], schemas[f]] for f in now}
    try:
        if files != index:  # else the cache on disk holds exactly this already
            _write(root, table, files, columns)
        else:  # what a writer killed mid-write left (atomic_path removes it when it writes)
            sweep_dead_temporaries(root / CACHE)
            sweep_dead_temporaries(root / INDEX)
    except OSError as exc:  # a read-only root still gets its rows, only not kept
        log.warning("cannot keep the score rows cache %s (%s)", root / CACHE, exc)
    log.info("score rows: %d files, %d read again, %d from the cache", len(now), len(changed), len(unchanged))
    result = _LAST[key] = ScoreRows(table, files, run)  # a racy file's None never equals its signature
    return result


def _value_counts(column) -> tuple[list[str], list[int]]:
    import pyarrow.compute as pc

    vc = pc.value_counts(column)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


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
    class's files only.

    Returns {"db_rows": the view's rows (counted now, or counted before and unchanged since),
    "counted": pairs counted now, "mismatched": pairs whose count differs from their files' rows}.
    What matched is kept in `<root>/.scores_db/counted.parquet` for the next call.
    """
    import pyarrow.parquet as pq

    root = Path(root)
    found = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = ?", [view]).fetchone()
    if found is None:
        raise ValueError(f"the database has no `{view}` view")
    memo_path = root / COUNTED
    try:
        memo = pq.read_table(memo_path)
        before = _file_entries(memo) if memo.schema.metadata[VIEW_KEY].decode() == found[0] else {}
    except Exception:  # noqa: BLE001 - none, unreadable or another format: every class is counted again
        before = {}
    files_of: dict[str, list[str]] = {}
    for f in rows.files:
        files_of.setdefault(pair_of_file(f), []).append(f)
    class_of = {p: p.split("|")[0] for p in files_of}  # once: 24,000 pairs at 1,000 classes
    file_rows = {p: sum(rows.files[f][1] for f in fs) for p, fs in files_of.items()}
    stale = {class_of[p] for p, fs in files_of.items()
             if any(rows.files[f][0] is None or before.get(f) != rows.files[f][:2] for f in fs)}
    if not stale and files_of:
        stale = {class_of[min(files_of)]}
    all_classes = set(class_of.values())
    source, params = view, []
    if len(stale) <= len(all_classes) // 2:
        folders = sorted({f.split("/")[-3] for p, fs in files_of.items() if class_of[p] in stale for f in fs})
        narrow = narrowed_view(found[0], folders)
        if narrow is not None:  # the view's own reader, over the stale classes' folders only
            source = f"({narrow})"
        else:  # a filter on the Hive column: the other folders are listed but not opened
            source += f" WHERE class IN ({', '.join('?' * len(stale))})"
            params = sorted(stale)
    counted = {}
    for c, s, n in con.execute(f"SELECT class, shift, count(*) FROM {source} GROUP BY ALL", params).fetchall():
        counted[f"{c}|{s}"] = n
        class_of.setdefault(f"{c}|{s}", c)
    counted_classes = stale if source != view else all_classes | {class_of[p] for p in counted}
    pairs = {p for p in {*files_of, *counted} if class_of[p] in counted_classes}
    mismatched = {p for p in pairs if counted.get(p, 0) != file_rows.get(p, 0)}
    db_rows = sum(counted.values()) + sum(n for p, n in file_rows.items() if class_of[p] not in counted_classes)
    after = {f: before[f] for p, fs in files_of.items() if class_of[p] not in counted_classes
             for f in fs if f in before}
    after.update({f: rows.files[f][:2] for p in pairs - mismatched for f in files_of.get(p, [])
                  if rows.files[f][0] is not None})
    try:
        if after != before or not memo_path.exists():
            with atomic_path(memo_path) as tmp:  # columnar: at 21,000 classes x 24 shifts, 504,000 files
                pq.write_table(_file_table(after).replace_schema_metadata({VIEW_KEY: found[0]}), tmp)
            (root / LEGACY_COUNTED).unlink(missing_ok=True)
        else:
            sweep_dead_temporaries(memo_path)
    except OSError as exc:
        log.warning("cannot keep %s (%s); the view's rows will be counted again", memo_path, exc)
    return {"db_rows": db_rows, "counted": len(pairs), "mismatched": sorted(mismatched)}
