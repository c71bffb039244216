"""scores_db: a DuckDB file of views over the score Parquet files, for SQL."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from .checks import emit, failed_summary, name_list
from .clip_scores import score_schema
from .metadata import png_markdown, table_schema
from .partitions import CLASSES, OWNERS, pairs_of
from .resources import BASELINE_DIR, StorageResource
from .versions import SCORES_DB_CODE

SCORES_DB = dg.AssetKey("scores_db")
ROWS_CHECK = "rows_match_score_files"
# The views read the score files by their glob relative to the storage root (ml.score_rows.score_glob:
# `scores/*/*/*.parquet`, or `scores/*/*.parquet` at the class grain): every connection resolves it against
# the root the database is in (ml.diagnosis.use_storage_root), so a copied or moved root reads its own files.
# The Hive folder names as text (a class named `001` stays `001`); at the class grain the files' folders
# name the class only, and `shift` is the files' own column. Columns are unified by name across
# files only while files of different columns coexist (score files of two code versions): unifying
# opens every file for every query, while one shared set of columns lets DuckDB skip the files of other
# classes by their folder names (a query of one class at 1,000 classes: 0.7 s against 4 s).
HIVE = {"class_shift": "hive_partitioning = true, hive_types = {'class': VARCHAR, 'shift': VARCHAR}",
        "class": "hive_partitioning = true, hive_types = {'class': VARCHAR}"}
UNIFY = ", union_by_name = true"

VIEWS = {
    # One row per image; `class` and `shift` (`class` only, at the class grain) also from the Hive folder names.
    "scores": "SELECT * FROM read_parquet('{glob}', {hive}{unify})",
    "mean_scores": """
        SELECT class_key, any_value(class_name) AS class_name, shift, count(*) AS images,
               avg(sim_class) AS mean_sim_class, avg(sim_shift) AS mean_sim_shift,
               avg(kept::INTEGER) AS kept_fraction
        FROM scores GROUP BY class_key, shift ORDER BY class_key, shift""",
    # The images the CLIP filter dropped, and why: the failed generations a diagnosis leaves out.
    "dropped": """
        SELECT class_key, class_name, shift, seed, image_path, sim_class, sim_shift, sim_class_floor,
               zero_shot_class, drop_reason
        FROM scores WHERE NOT kept ORDER BY class_key, shift, seed""",
}


# What the UI shows of the scores: per shift across classes, and the weakest class x shift pairs.
PER_SHIFT_SQL = """
    SELECT shift, count(DISTINCT class_key) AS classes, count(*) AS images, avg(sim_class) AS mean_sim_class,
           avg(sim_shift) AS mean_sim_shift, avg(kept::INTEGER) AS kept_fraction
    FROM scores GROUP BY shift ORDER BY kept_fraction, shift"""
WORST_PAIRS_SQL = """
    SELECT class_key, shift, images, mean_sim_class, mean_sim_shift, kept_fraction FROM mean_scores
    ORDER BY kept_fraction, mean_sim_class, class_key, shift LIMIT 10"""
SUMMARY_INPUT = ("class_key", "class_name", "shift", "sim_class", "sim_shift", "kept")  # what they read of `scores`
SUMMARY_COLUMNS = {
    "shift": ("string", "Shift key"), "class_key": ("string", "Class partition key"),
    "classes": ("int", "Classes scored in the shift"), "images": ("int", "Images scored"),
    "mean_sim_class": ("float", "Mean similarity to the class caption"),
    "mean_sim_shift": ("float", "Mean similarity to the shift caption"),
    "kept_fraction": ("float", "Share of images the CLIP filter kept"),
}


def summary_table(con, sql: str) -> dg.MetadataValue:
    """A query's rows as a UI table with a column schema (floats rounded for reading)."""
    cur = con.execute(sql)
    cols = [d[0] for d in cur.description]
    rows = [dg.TableRecord({c: round(v, 4) if isinstance(v, float) else v for c, v in zip(cols, r)})
            for r in cur.fetchall()]
    return dg.MetadataValue.table(rows, schema=table_schema([(c, *SUMMARY_COLUMNS[c]) for c in cols]))


# With the class-name baseline: its scores, and per class and shift the token beside the name.
BASELINE_VIEWS = {
    "baseline_scores": f"SELECT * FROM read_parquet('{{baseline_glob}}', {{hive}}{UNIFY})",
    "token_vs_name": """
        SELECT t.class_key, any_value(t.class_name) AS class_name, t.shift,
               avg(t.sim_class) AS token_sim_class, avg(n.sim_class) AS name_sim_class,
               avg(t.sim_shift) AS token_sim_shift, avg(n.sim_shift) AS name_sim_shift,
               avg(t.kept::INTEGER) AS token_kept_fraction, avg(n.kept::INTEGER) AS name_kept_fraction
        FROM scores t JOIN baseline_scores n ON n.class_key = t.class_key AND n.shift = t.shift AND n.seed = t.seed
        GROUP BY t.class_key, t.shift ORDER BY t.class_key, t.shift""",
}


def build_scores_db(baseline: bool = False, shift_keys: list[str] | None = None,
                    grain: str = "class_shift") -> dg.AssetsDefinition:
    from di_assets.ml.score_rows import score_glob

    deps = [dg.AssetKey("clip_scores")] + ([dg.AssetKey("baseline_scores")] if baseline else [])
    views = {**VIEWS, **(BASELINE_VIEWS if baseline else {})}

    @dg.asset(
        deps=deps,
        group_name="metrics",
        owners=OWNERS,
        code_version=SCORES_DB_CODE,
        kinds={"duckdb"},
        automation_condition=dg.AutomationCondition.eager(),
        metadata={"dagster/column_schema": score_schema()},  # of its main view, `scores`
        description=f"DuckDB views {', '.join(f'`{v}`' for v in views)} over `{score_glob(grain)}`"
                    + (f" and `{score_glob(grain, f'{BASELINE_DIR}/scores')}`" if baseline else ""),
    )
    def scores_db(context: dg.AssetExecutionContext, storage: StorageResource,
                  duckdb: DuckDBResource) -> dg.MaterializeResult:
        import hashlib

        from di_assets.ml.diagnosis import use_storage_root
        from di_assets.ml.report import score_chart
        from di_assets.ml.score_rows import gather_score_rows, has_score_files

        # The rows the record's numbers and chart use, of every score file: gather_score_rows reads again
        # only the files that changed since the last run (at 1,000 classes x 24 shifts, 24,000 files;
        # 1,000 at the class grain, a file per class).
        # Its rows check, in this run, takes the same gathering.
        rows = gather_score_rows(storage.root, list(SUMMARY_INPUT), run=context.run.run_id, grain=grain)
        if not rows.index.num_rows:
            raise FileNotFoundError(f"no score files under {storage.root}/scores; materialize clip_scores first")
        chosen = dict(VIEWS)
        if baseline and has_score_files(storage.root, f"{BASELINE_DIR}/scores", grain):
            chosen.update(BASELINE_VIEWS)
        globs = {"glob": score_glob(grain), "baseline_glob": score_glob(grain, f"{BASELINE_DIR}/scores"),  # relative
                 "hive": HIVE[grain], "unify": "" if rows.uniform_schema else UNIFY}
        with duckdb.get_connection() as con:
            use_storage_root(con, storage.root)
            # A view reads its files when it is queried, so one whose SQL is unchanged stays as it is:
            # creating a view lists every file of its glob (0.5 s a view at 24,000 files). Each view's
            # comment holds the digest of the SQL it was created from.
            made = dict(con.execute("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall())
            con.execute("BEGIN TRANSACTION")  # readers see the old views or the new ones, never a mix
            for name, sql in chosen.items():
                sql = sql.format(**globs)
                digest = hashlib.sha256(sql.encode()).hexdigest()[:16]
                if made.get(name) != digest:
                    con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
                    con.execute(f"COMMENT ON VIEW {name} IS '{digest}'")
            con.execute("COMMIT")
        # The record's numbers and chart from those rows in memory, not from one read per query through the views.
        import duckdb as duckdb_module

        with duckdb_module.connect() as mem:
            mem.register("score_rows", rows.table)
            # a view over the Arrow table, not a copy of it: 1.2 million rows at ImageNet-1k's 50 images a pair
            mem.execute(f"CREATE VIEW scores AS SELECT {', '.join(SUMMARY_INPUT)} FROM score_rows")
            mem.execute(f"CREATE VIEW mean_scores AS {VIEWS['mean_scores']}")
            total = mem.execute("SELECT count(*) FROM scores").fetchone()[0]
            pairs = mem.execute("SELECT count(*) FROM mean_scores").fetchone()[0]
            per_shift, worst = summary_table(mem, PER_SHIFT_SQL), summary_table(mem, WORST_PAIRS_SQL)
            dropped = mem.execute("SELECT count(*) FROM scores WHERE NOT kept").fetchone()[0]  # the `dropped` view's rows
            chart = score_chart(mem, shift_keys)
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(storage.scores_db)),
            "dagster/row_count": total,
            "partitions": pairs,
            "per_shift": per_shift,  # across classes, the shifts the filter keeps least first
            "weakest_class_shift_pairs": worst,
            "dropped_images": dropped,  # the `dropped` view lists them with their reasons
            # one run-wide chart: the score distributions and the kept share, shift by shift
            "scores_per_shift": dg.MetadataValue.md(png_markdown(chart, "CLIP scores and kept fraction per shift")),
        })

    return scores_db


def rows_check_result(storage: StorageResource, instance: dg.DagsterInstance,
                      shift_keys: list[str], run: str | None = None, grain: str = "class_shift") -> tuple[bool, dict]:
    """ROWS_CHECK: the `scores` view counts as many rows as the Parquet files of the materialized
    clip_scores partitions hold, with no file missing and no file of another partition in the view.
    The files' rows come from gather_score_rows and the view counts the classes whose files changed
    since it last counted them (count_through_view): an update of one class opens that class's files.
    In the run that materialized scores_db (`run`), the files are those it gathered. At the class
    grain a file holds its class's pairs: those its rows name."""
    from pathlib import Path

    import duckdb
    import pyarrow.parquet as pq

    from di_assets.ml.diagnosis import use_storage_root
    from di_assets.ml.score_rows import (class_of_file, count_through_view, gather_score_rows, list_score_files,
                                         pair_of_file)

    classes, shifts = set(instance.get_dynamic_partitions(CLASSES.name)), set(shift_keys)
    # a class x shift partition holds its pair; a class partition (the class grain) every shift
    expected = {f"{c}|{s}" for k in instance.get_materialized_partitions(dg.AssetKey("clip_scores"))
                for c, s in pairs_of(k, shift_keys) if c in classes and s in shifts}
    unreadable, rows = [], None
    try:
        rows = gather_score_rows(storage.root, list(SUMMARY_INPUT), run=run, grain=grain)
        listed, file_rows = rows.pairs, rows.total_rows
    except Exception:  # noqa: BLE001 - a corrupt file fails the check: find it, to name its partition
        files = {}  # what the view reads (its glob), by partition (at the class grain, by class)
        for f in list_score_files(storage.root, grain=grain):
            files.setdefault(pair_of_file(f) if grain != "class" else class_of_file(f), []).append(f)
        listed, file_rows = files.keys(), 0
        for key, paths in files.items():
            try:
                file_rows += sum(pq.ParquetFile(Path(storage.root) / p).metadata.num_rows for p in paths)
            except Exception:  # noqa: BLE001
                unreadable.append(key)
        if grain == "class":  # what a class's file would hold: its pairs
            listed = {f"{c}|{s}" for key in listed for c, s in pairs_of(key, shift_keys)}
    missing, extra = sorted(expected - listed), sorted(listed - expected)
    meta = {"path": dg.MetadataValue.path(str(storage.scores_db)), "partitions": len(expected),
            "file_rows": file_rows, "missing": name_list(missing) or "none", "extra": name_list(extra) or "none",
            **({"unreadable": name_list(unreadable)} if unreadable else {})}
    try:
        if rows is None:
            raise ValueError("a score file cannot be read")
        con = duckdb.connect(str(storage.scores_db), read_only=True)
        try:
            use_storage_root(con, storage.root)
            view = count_through_view(con, storage.root, rows)
        finally:
            con.close()
    except (duckdb.Error, OSError, ValueError) as exc:  # no database or view, a file it cannot read, a bad root
        return False, {**meta, **failed_summary(sorted({*missing, *extra, *unreadable}), len(expected)),
                       "reason": f"cannot count the scores view: {str(exc).splitlines()[0][:200]}"}
    meta["db_rows"], meta["pairs_counted"] = view["db_rows"], view["counted"]
    failed = sorted({*missing, *extra, *view["mismatched"]})
    ok = not failed and view["db_rows"] == file_rows
    if not ok:
        meta["reason"] = (f"{len(missing)} partitions have no score file, {len(extra)} score files belong to no "
                          "materialized partition" if missing or extra
                          else f"the view counts other rows than the files of {name_list(view['mismatched'])}"
                          if view["mismatched"] else f"the view counts {view['db_rows']} rows, the files {file_rows}")
    return ok, {**meta, **failed_summary(failed, len(expected))}


def build_rows_check(shift_keys: list[str], grain: str = "class_shift") -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=SCORES_DB, name=ROWS_CHECK,
                    description="The `scores` view counts as many rows as the score files of the materialized "
                                "clip_scores partitions, with no file missing and none extra (classes whose files "
                                "changed since the last check are counted again)")
    def rows_check(context: dg.AssetCheckExecutionContext, storage: StorageResource):
        yield from emit(context, SCORES_DB, ROWS_CHECK,
                        {None: rows_check_result(storage, context.instance, shift_keys, context.run.run_id, grain)})

    return rows_check
