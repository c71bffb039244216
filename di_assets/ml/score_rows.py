"""The score files' rows that scores_db's record reads, gathered once and kept between runs.

At 1,000 classes x 24 shifts the score files are 24,000 small Parquet files: opening each costs far
more than its rows, so a fresh read of all of them takes most of a minute, while their rows, a few
columns, fit in one file of a few MB. `gather_score_rows` keeps those columns of every file in one
Parquet file (`<root>/.scores_db/rows.parquet`) with each file's signature (size, mtime, ctime,
inode: `os.stat`, no file opened) and row count, and reads again only the files whose signature
changed, the new ones, and the racy ones (changed within a clock tick of the last gathering: a write
just after it could keep the signature; `observe.py` says more). An update that rewrote one class's
24 files reads 24 files, whatever the number of classes.

The cache only saves reads: a missing, unreadable or older-format cache means every file is read
again (with a warning where it existed), and the rows returned are always those the files hold now.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .io import atomic_path
from .observe import COARSE_RACY_NS, RACY_NS

log = logging.getLogger("di_assets")

CACHE = Path(".scores_db") / "rows.parquet"
FORMAT = 1  # bump when the cached rows change meaning: older caches are then ignored
FILE = "file"  # the column that names each row's file, relative to the root
INDEX_KEY = b"di_assets.files"  # in the cache's Parquet metadata: {file: [signature or null, rows]}


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _load(path: Path, columns: list[str]):
    """(cached table, {file: [signature, rows]}), or (None, {}) where there is no usable cache."""
    import pyarrow.parquet as pq

    if not path.exists():
        return None, {}
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[INDEX_KEY])
        if meta["format"] != FORMAT or meta["columns"] != columns or table.column_names != [FILE, *columns]:
            raise ValueError(f"written for format {meta['format']} and columns {meta['columns']}")
        return table, meta["files"]
    except Exception as exc:  # noqa: BLE001 - any unusable cache only means reading every file again
        log.warning("ignoring the score rows cache %s (%s); reading every score file again", path,
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return None, {}


def _read(root: Path, files: list[str], columns: list[str]):
    """`columns` of `files` (relative to `root`), read as the `scores` view reads them (Hive folder
    names, columns matched by name), with each row's file in FILE."""
    import duckdb
    import pyarrow as pa

    absolute = {str(root / f): f for f in files}
    with duckdb.connect() as con:
        table = con.sql(f"SELECT filename, {', '.join(columns)} FROM read_parquet($files, hive_partitioning = true, "
                        "union_by_name = true, filename = true)", params={"files": list(absolute)}).to_arrow_table()
    names = pa.array([absolute[f] for f in table.column("filename").to_pylist()], pa.string())
    return table.drop_columns(["filename"]).add_column(0, FILE, names)


def gather_score_rows(root: str | os.PathLike, glob: str, columns: list[str]):
    """(`columns` of every row of the files under `root` matching `glob` as one Arrow table, with
    FILE naming each row's file relative to `root`; {file: row count}). Reads only the files that
    changed since the last call (see the module's text), then keeps the result for the next call.

    A file that cannot be read raises DuckDB's error (the `scores` view could not read it either).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(root)
    cache_path = root / CACHE
    start = time.time_ns()
    now = {}  # file -> signature, for the files there now
    for path in sorted(root.glob(glob)):
        try:
            now[path.relative_to(root).as_posix()] = _signature(path.stat())
        except FileNotFoundError:  # removed since the glob listed it: not there now
            continue
    cached, index = _load(cache_path, columns)
    unchanged = [f for f, sig in now.items() if cached is not None and f in index and index[f][0] == sig]
    kept = set(unchanged)
    changed = [f for f in now if f not in kept]
    parts = []
    if unchanged:
        parts.append(cached.filter(pc.is_in(cached.column(FILE), pa.array(unchanged, pa.string()))))
    if changed:
        parts.append(_read(root, changed, columns))
    if not parts:
        return pa.table({FILE: pa.array([], pa.string())}), {}
    table = pa.concat_tables(parts, promote_options="permissive").select([FILE, *columns])
    counts = {f: 0 for f in now}
    for f, n in zip(*_value_counts(table.column(FILE))):
        counts[f] = n
    coarse = all(sig[2] % 1_000_000_000 == 0 for sig in now.values()) and bool(now)
    racy_after = start - (COARSE_RACY_NS if coarse else RACY_NS)
    files = {f: [sig if max(sig[1], sig[2]) < racy_after else None, counts[f]] for f, sig in now.items()}
    meta = {"format": FORMAT, "columns": columns, "files": files}
    try:
        with atomic_path(cache_path) as tmp:
            pq.write_table(table.replace_schema_metadata({INDEX_KEY: json.dumps(meta)}), tmp)
    except OSError as exc:  # a read-only root still gets its rows, only not kept
        log.warning("cannot keep the score rows cache %s (%s)", cache_path, exc)
    log.info("score rows: %d files, %d read again, %d from the cache", len(now), len(changed), len(unchanged))
    return table, counts


def _value_counts(column) -> tuple[list[str], list[int]]:
    import pyarrow.compute as pc

    vc = pc.value_counts(column)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
