"""What Dagster itself stores per class x shift pair: the floor under any record of ours.

    python benchmarks/bench_dagster_floor.py [--storage postgres,sqlite] [--checks none,both] [--classes 10,20]

Two bare assets partitioned like counterfactuals and clip_scores at the class x shift grain (a dynamic
`class` dimension and a static `shift` one; `a` -> `b`), with no metadata, no output stored and no
code of ours, optionally each with a partitioned asset check that yields one evaluation per partition
(no metadata), as each of ours does. They are materialized as `di-assets run` materializes the flow:
runs of at most RUN_PARTITIONS partitions, each a rectangle of whole classes. The table gives the
instance's growth from the first to the second class count, per added pair:

  KB/pair          bytes (KB: 1,000) the instance grew by / added pairs: SQLite's files under the instance folder
                   (each run's database and the index), or the PostgreSQL database (pg_database_size);
  KB/pair, live    PostgreSQL after VACUUM FULL, which leaves only live rows (what the tables hold,
                   without the space that updated rows leave until autovacuum reuses it);
  events/pair      event log rows added per pair.

With --storage postgres it starts a PostgreSQL server as the tests do (Debian's `postgresql` package;
di_assets_tests/test_postgres.py) and gives each configuration a new database, set up as the README
says (the project's dagster.yaml with its Postgres snippet). Compare with `bench_scale.py --postgres --classes 10,20 --grain class_shift`,
which measures the same growth with the flow's own records.
"""

import argparse
import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bare_definitions(shifts: int, checks: bool):
    import dagster as dg

    pd = dg.MultiPartitionsDefinition({"class": dg.DynamicPartitionsDefinition(name="classes"),
                                       "shift": dg.StaticPartitionsDefinition([f"s{j:02d}" for j in range(shifts)])})

    @dg.asset(partitions_def=pd)
    def a() -> None:  # no output stored: nothing but Dagster's own records
        return None

    @dg.asset(partitions_def=pd, deps=[a])
    def b() -> None:
        return None

    def check(asset: str):
        @dg.asset_check(asset=asset, name=f"{asset}_check", partitions_def=pd)
        def evaluate(context: dg.AssetCheckExecutionContext):
            for key in context.partition_keys:
                yield dg.AssetCheckEvaluation(asset_key=dg.AssetKey(asset), check_name=f"{asset}_check",
                                              passed=True, partition=key)
            yield dg.Output(None)

        return evaluate

    return dg.Definitions(assets=[a, b], asset_checks=[check("a"), check("b")] if checks else [])


def class_keys(n: int) -> list[str]:
    return [f"class_{i:05d}" for i in range(n)]


def materialize(instance, job, classes: list[str], shifts: int, run_partitions: int) -> None:
    """A run per rectangle of whole classes, at most run_partitions partitions, as the driver splits them."""
    per_run = max(1, run_partitions // shifts)
    for i in range(0, len(classes), per_run):
        first, last = classes[i], classes[min(i + per_run, len(classes)) - 1]
        result = job.execute_in_process(instance=instance, tags={
            "dagster/asset_partition_range_start": f"{first}|s00",
            "dagster/asset_partition_range_end": f"{last}|s{shifts - 1:02d}"})
        if not result.success:
            raise RuntimeError(f"the run over {first}..{last} failed")


class Postgres:
    """A database per configuration on one server; its size as is and after VACUUM FULL."""

    def __init__(self, stack: contextlib.ExitStack):
        from di_assets_tests.test_postgres import Server, _server_bin

        self.server = Server(_server_bin())
        stack.callback(self.server.stop)
        self.server.start()
        self.made = 0

    def instance(self, home: Path):
        import dagster as dg

        self.made += 1
        self.db = f"floor{self.made}"
        os.environ.update(self.server.dagster_home(home, self.db))  # the README's set-up
        return dg.DagsterInstance.get()

    def size(self, live: bool = False) -> int:
        return self.server.database_size(self.db, compact=live)

    def events(self) -> int:
        conn = self.server.connect(self.db)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM event_logs")
                return cur.fetchone()[0]
        finally:
            conn.close()


class Sqlite:
    def instance(self, home: Path):
        import dagster as dg

        self.home = home
        home.mkdir(parents=True)
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        return dg.DagsterInstance.from_config(str(home))

    def size(self, live: bool = False) -> int | None:
        if live:
            return None
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(self.home) for f in fs)

    def events(self) -> int:
        import sqlite3

        with contextlib.closing(sqlite3.connect(self.home / "history" / "runs" / "index.db")) as con:
            return con.execute("SELECT count(*) FROM event_logs").fetchone()[0]


def measure(store, home: Path, checks: bool, counts: tuple[int, int], shifts: int, run_partitions: int) -> dict:
    defs = bare_definitions(shifts, checks)
    job = defs.resolve_implicit_global_asset_job_def()
    instance = store.instance(home)
    first, second = class_keys(counts[0]), class_keys(counts[1])
    instance.add_dynamic_partitions("classes", second)
    materialize(instance, job, first, shifts, run_partitions)
    # Growth from a compact start (VACUUM FULL on PostgreSQL): as is, with what the new runs' updates
    # leave behind, and live, compacted again.
    start = store.size(live=True) or store.size()
    events = store.events()
    materialize(instance, job, second[counts[0]:], shifts, run_partitions)
    grown, live, events = store.size(), store.size(live=True), store.events() - events
    pairs = (counts[1] - counts[0]) * shifts
    return {"bytes": (grown - start) / pairs, "live": None if live is None else (live - start) / pairs,
            "events": events / pairs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", default="postgres,sqlite", help="postgres and/or sqlite (default both)")
    ap.add_argument("--checks", default="none,both",
                    help="none (the two assets alone) and/or both (each with a partitioned check); default both")
    ap.add_argument("--classes", default="10,20", help="the class counts to grow from and to (default 10,20)")
    ap.add_argument("--shifts", type=int, default=24, help="shifts per class (default 24)")
    args = ap.parse_args()
    storages, variants = args.storage.split(","), args.checks.split(",")
    if set(storages) - {"postgres", "sqlite"} or set(variants) - {"none", "both"}:
        ap.error("--storage takes postgres,sqlite and --checks takes none,both")
    counts = tuple(int(c) for c in args.classes.split(","))
    if len(counts) != 2 or not 0 < counts[0] < counts[1]:
        ap.error("--classes takes two counts, the second larger: e.g. 10,20")
    import dagster as dg

    from di_assets.defs.driver import RUN_PARTITIONS

    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    import logging

    logging.getLogger("dagster").setLevel(logging.WARNING)
    rows = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_floor-")))
        postgres = Postgres(stack) if "postgres" in storages else None
        for storage in storages:
            for variant in variants:
                home = work / f"{storage}-{variant}"
                store = postgres if storage == "postgres" else Sqlite()
                print(f"{storage}, checks {variant}: {counts[0]} then {counts[1]} classes x {args.shifts} shifts",
                      file=sys.stderr, flush=True)
                rows.append((storage, variant, measure(store, home, variant == "both", counts, args.shifts,
                                                       RUN_PARTITIONS)))
    print(f"\nDagster's own records per added class x shift pair ({counts[0]} -> {counts[1]} classes, "
          f"{args.shifts} shifts, runs of at most {RUN_PARTITIONS} partitions)\n")
    print("| storage | checks | KB/pair | KB/pair, live | events/pair |")
    print("|---|---|---|---|---|")
    for storage, variant, m in rows:
        live = "" if m["live"] is None else f"{m['live'] / 1e3:.1f}"
        print(f"| {storage} | {variant} | {m['bytes'] / 1e3:.1f} | {live} | {m['events']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
