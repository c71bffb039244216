"""What Dagster itself costs an update of one class, at 10 and at 1,000 classes: the floor under ours.

    python benchmarks/bench_dagster_update_floor.py [--classes 10,1000] [--rounds 5]

Bare assets shaped like the flow at the class grain (`partition_grain: class`, as bench_update.py's
storages): an observable source `class_images` and `class_token`, `counterfactuals` and
`clip_scores` partitioned by a dynamic `classes` dimension, and `encoder_root` and `scores_db`
unpartitioned between them, each with the flow's own automation condition (eager; counterfactuals'
`after_class_change`; clip_scores' wait for blocking checks), and a bare check on each (partitioned
where its asset is, blocking on class_token and counterfactuals), as the flow has. No asset stores an output
or writes metadata, and none runs code of ours: what remains is Dagster's automation ticks, runs and
event log. For each N, in one process on a new SQLite instance: N classes are added, observed and
materialized as `di-assets run` does (every asset upstream first, in runs of at most RUN_PARTITIONS
classes), the automation settles, and then each round reports a new data version of one class's `class_images` (as the
observation does when a class folder changed) and times `LocalDriver.settle`, the loop `di-assets
update` runs: ticks until automation requests nothing, each request executed in process. The table
gives the median over the rounds, its range, and the ticks' share.
"""

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def bare_definitions():
    import dagster as dg

    from di_assets.defs.checks import emit
    from di_assets.defs.counterfactuals import after_class_change

    classes = dg.DynamicPartitionsDefinition(name="classes")
    eager = dg.AutomationCondition.eager()
    checked = (eager & dg.AutomationCondition.all_deps_blocking_checks_passed()).with_label("eager, images checked")

    @dg.observable_source_asset(partitions_def=classes)
    def class_images():
        return None  # observed only by the benchmark's reported events

    def asset(name: str, deps: list[str], partitioned: bool, condition):
        @dg.asset(name=name, deps=deps, partitions_def=classes if partitioned else None, automation_condition=condition)
        def bare() -> None:
            return None

        return bare

    def check(name: str, partitioned: bool, blocking: bool):
        @dg.asset_check(asset=name, name=f"{name}_check", partitions_def=classes if partitioned else None,
                        blocking=blocking)
        def evaluate(context: dg.AssetCheckExecutionContext):
            # passing evaluations with no metadata, each tied to the materialization it checked, as the
            # flow's checks.emit yields them (without that tie automation does not count them as current)
            keys = context.partition_keys if partitioned else [None]
            yield from emit(context, dg.AssetKey(name), f"{name}_check", {k: (True, {}) for k in keys}, blocking)

        return evaluate

    # (asset, deps, partitioned, automation condition, its check blocking): the flow's conditions
    shape = [("class_token", ["class_images"], True, eager, True),
             ("encoder_root", ["class_token"], False, eager, False),
             ("counterfactuals", ["class_token", "encoder_root"], True, after_class_change(), True),
             ("clip_scores", ["counterfactuals"], True, checked, False),
             ("scores_db", ["clip_scores"], False, eager, False)]
    return dg.Definitions(assets=[class_images, *(asset(*s[:4]) for s in shape)],
                          asset_checks=[check(name, partitioned, blocking)
                                        for name, _, partitioned, _, blocking in shape])


def observe(instance, keys: list[str], version: str) -> None:
    """A new data version of these classes' images, as the observation reports a changed folder."""
    import dagster as dg

    for key in keys:
        instance.report_runless_asset_event(dg.AssetObservation(
            asset_key="class_images", partition=key, tags={"dagster/data_version": f"{key}-{version}"}))


def measure(n: int, rounds: int, work: Path) -> dict:
    from bench_dagster_floor import Sqlite, class_keys

    from di_assets.defs.driver import LocalDriver

    instance = Sqlite().instance(work / f"n{n}")  # a new SQLite instance, as the storage floor's
    driver = LocalDriver(bare_definitions(), instance, run_config=QUIET)
    keys = class_keys(n)
    instance.add_dynamic_partitions("classes", keys)
    observe(instance, keys, "0")
    start = time.perf_counter()  # as `di-assets run`: every asset, upstream first, in runs of whole ranges
    driver.execute({name: {None} if name in ("encoder_root", "scores_db") else set(keys) for name in driver.order
                    if name != "class_images"})
    driver.settle()  # starts the automation cursor, as `run` does at its end
    print(f"{n} classes: everything materialized in {time.perf_counter() - start:.1f} s, {driver.runs} runs",
          file=sys.stderr, flush=True)
    changed = keys[n // 2]
    times, ticks = [], []
    for r in range(rounds):
        observe(instance, [changed], str(r + 1))
        spent, tick = [0.0], driver.tick

        def timed_tick():
            t = time.perf_counter()
            try:
                return tick()
            finally:
                spent[0] += time.perf_counter() - t

        driver.tick = timed_tick
        start = time.perf_counter()
        reran = driver.settle()
        times.append(time.perf_counter() - start)
        ticks.append(spent[0])
        del driver.tick
        expected = {"class_token": {changed}, "encoder_root": {None}, "counterfactuals": {changed},
                    "clip_scores": {changed}, "scores_db": {None}}
        if reran != expected:
            raise SystemExit(f"round {r + 1} at {n} classes reran {reran}, not one class's partitions")
        print(f"  round {r + 1}: {times[-1]:.3f} s, ticks {ticks[-1]:.3f} s", file=sys.stderr, flush=True)
    return {"median": statistics.median(times), "low": min(times), "high": max(times),
            "ticks": statistics.median(ticks)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", default="10,1000", help="class counts (default 10,1000)")
    ap.add_argument("--rounds", type=int, default=5, help="updates timed per class count (default 5)")
    args = ap.parse_args()
    counts = [int(c) for c in args.classes.split(",")]
    import dagster as dg

    for category in (dg.PreviewWarning, dg.BetaWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("dagster").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_update_floor-") as work:
        got = {n: measure(n, args.rounds, Path(work)) for n in counts}
    print(f"\nDagster alone: the update after one class changed (bare assets, class grain), medians of {args.rounds}\n")
    print("| classes | update s | range s | of it, ticks s |")
    print("|---|---|---|---|")
    for n, m in got.items():
        print(f"| {n:,} | {m['median']:.3f} | {m['low']:.3f}-{m['high']:.3f} | {m['ticks']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
