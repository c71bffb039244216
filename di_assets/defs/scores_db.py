"""scores_db: a DuckDB file of views over the score Parquet files, for SQL."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from .clip_scores import score_schema
from .metadata import table_schema
from .partitions import OWNERS
from .resources import StorageResource
from .versions import SCORES_DB_CODE

VIEWS = {
    # One row per image; `class` and `shift` also come from the Hive folder names.
    "scores": "SELECT * FROM read_parquet('{glob}', hive_partitioning = true, union_by_name = true)",
    "mean_scores": """
        SELECT class_key, any_value(class_name) AS class_name, shift, count(*) AS images,
               avg(sim_class) AS mean_sim_class, avg(sim_shift) AS mean_sim_shift,
               avg(kept::INTEGER) AS kept_fraction
        FROM scores GROUP BY class_key, shift ORDER BY class_key, shift""",
}


# What the UI shows of the scores: per shift across classes, and the weakest class x shift pairs.
PER_SHIFT_SQL = """
    SELECT shift, count(DISTINCT class_key) AS classes, count(*) AS images, avg(sim_class) AS mean_sim_class,
           avg(sim_shift) AS mean_sim_shift, avg(kept::INTEGER) AS kept_fraction
    FROM scores GROUP BY shift ORDER BY kept_fraction, shift"""
WORST_PAIRS_SQL = """
    SELECT class_key, shift, images, mean_sim_class, mean_sim_shift, kept_fraction FROM mean_scores
    ORDER BY kept_fraction, mean_sim_class, class_key, shift LIMIT 10"""
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
    "baseline_scores": "SELECT * FROM read_parquet('{baseline_glob}', hive_partitioning = true, union_by_name = true)",
    "token_vs_name": """
        SELECT t.class_key, any_value(t.class_name) AS class_name, t.shift,
               avg(t.sim_class) AS token_sim_class, avg(n.sim_class) AS name_sim_class,
               avg(t.sim_shift) AS token_sim_shift, avg(n.sim_shift) AS name_sim_shift,
               avg(t.kept::INTEGER) AS token_kept_fraction, avg(n.kept::INTEGER) AS name_kept_fraction
        FROM scores t JOIN baseline_scores n ON n.class_key = t.class_key AND n.shift = t.shift AND n.seed = t.seed
        GROUP BY t.class_key, t.shift ORDER BY t.class_key, t.shift""",
}


def build_scores_db(baseline: bool = False) -> dg.AssetsDefinition:
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
        description=f"DuckDB views {', '.join(f'`{v}`' for v in views)} over "
                    "`scores/class=*/shift=*/part.parquet`" + (" and `baseline/scores/...`" if baseline else ""),
    )
    def scores_db(context: dg.AssetExecutionContext, storage: StorageResource,
                  duckdb: DuckDBResource) -> dg.MaterializeResult:
        from pathlib import Path

        if not list(Path(storage.root).glob("scores/*/*/*.parquet")):
            raise FileNotFoundError(f"no score files under {storage.root}/scores; materialize clip_scores first")
        chosen = dict(VIEWS)
        if baseline and list(storage.variant_root(True).glob("scores/*/*/*.parquet")):
            chosen.update(BASELINE_VIEWS)
        globs = {"glob": storage.scores_glob.replace("'", "''"),
                 "baseline_glob": storage.scores_glob_of(True).replace("'", "''")}
        with duckdb.get_connection() as con:
            con.execute("BEGIN TRANSACTION")  # readers see the old views or the new ones, never a mix
            for name, sql in chosen.items():
                con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql.format(**globs)}")
            con.execute("COMMIT")
            total = con.execute("SELECT count(*) FROM scores").fetchone()[0]
            pairs = con.execute("SELECT count(*) FROM mean_scores").fetchone()[0]
            per_shift, worst = summary_table(con, PER_SHIFT_SQL), summary_table(con, WORST_PAIRS_SQL)
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(storage.scores_db)),
            "dagster/row_count": total,
            "partitions": pairs,
            "per_shift": per_shift,  # across classes, the shifts the filter keeps least first
            "weakest_class_shift_pairs": worst,
        })

    return scores_db
