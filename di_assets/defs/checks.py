"""What every asset check of the flow shares: one evaluation per partition, read from the files.

Each check is its own `@dg.asset_check` (defined beside its asset, in the stage's file), so that it
runs right after its asset in any run that materializes the asset (Dagster adds an asset's checks to
the run by default, also in backfills and automation runs), and alone from the UI's "Execute" on a
check, without the asset. A check reads the artifacts on disk (token files, image folders and
manifests, score Parquet files), never the asset's return value, so both ways give the same result.

The checks of partitioned assets are partitioned the same way (`partitions_def`; a preview in
Dagster 1.13), and report one evaluation per partition, also in a single run over a range of
partitions: Dagster's `AssetCheckResult` has no partition argument (it takes the run's partition
key, which a range run lacks), so a check yields `AssetCheckEvaluation`s with their partition and
the materialization each one checked. The UI then shows each partition's status, and declarative
automation reads it per partition (`AutomationCondition.all_deps_blocking_checks_passed`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import dagster as dg

# The most partition names one record lists (the count is always exact): records stay small.
MAX_NAMED = 50


@contextlib.contextmanager
def partitioned_checks() -> Iterator[None]:
    """Define partitioned checks without Dagster's preview warning (we opt in on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)
        yield


def name_list(keys: Sequence[str]) -> str:
    """`a, b, c`, at most MAX_NAMED names, then `(and N more)`."""
    head = ", ".join(keys[:MAX_NAMED])
    return head + (f" (and {len(keys) - MAX_NAMED} more)" if len(keys) > MAX_NAMED else "")


def failed_summary(failed: Sequence[str], checked: int) -> dict[str, Any]:
    """Metadata that names the failing partitions of one run of a check, and counts them."""
    return {"failed": name_list(list(failed)) or "none", "failed_count": len(failed), "checked": checked}


def run_partition_keys(context: dg.AssetCheckExecutionContext, partitions_def) -> list[str]:
    """The partitions this run checks: its key or range; in a run without partitions, every partition."""
    if context.has_partition_key or context.has_partition_key_range:
        return [str(k) for k in context.partition_keys]
    return [str(k) for k in partitions_def.get_partition_keys(dynamic_partitions_store=context.instance)]


def _target(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None):
    """The latest materialization of the asset (partition): what the evaluation checked."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition] if partition is not None else None),
        limit=1).records
    if not records:
        return None
    r = records[0]
    return AssetCheckEvaluationTargetMaterializationData(storage_id=r.storage_id, run_id=r.run_id,
                                                         timestamp=r.timestamp)


def evaluation(instance: dg.DagsterInstance | None, asset_key: dg.AssetKey, check_name: str, passed: bool,
               metadata: Mapping[str, Any], partition: str | None = None, blocking: bool = False,
               description: str | None = None) -> dg.AssetCheckEvaluation:
    """One evaluation, tied to the materialization it checked (so that Dagster counts it as current)."""
    return dg.AssetCheckEvaluation(
        asset_key=asset_key, check_name=check_name, passed=passed, metadata=dict(metadata), partition=partition,
        blocking=blocking, description=description,
        target_materialization_data=_target(instance, asset_key, partition) if instance is not None else None)


def emit(context: dg.AssetCheckExecutionContext, asset_key: dg.AssetKey, check_name: str,
         results: Mapping[str | None, tuple[bool, Mapping[str, Any]]], blocking: bool = False) -> Iterable:
    """Yield one evaluation per partition (None: the unpartitioned asset), then the check's output.

    The failing evaluations carry the run's summary (`failed`: their partitions, `failed_count`).
    A blocking check with failures ends its step with one line that names them (and so stops the
    downstream steps of the run, as Dagster's blocking does); a non-blocking one logs that line.
    """
    failed = [str(k) for k, (ok, _) in results.items() if not ok and k is not None]
    summary = failed_summary(failed, len(results))
    line = None
    for key, (ok, meta) in results.items():
        yield evaluation(context.instance, asset_key, check_name, ok,
                         {**meta, **(summary if not ok and key is not None else {})},
                         partition=key, blocking=blocking)
        if not ok and key is None:  # an unpartitioned check names what failed in its own metadata
            line = f"{check_name} failed for {asset_key.to_user_string()}: {meta.get('failed', meta.get('reason', ''))}"
    if failed:
        line = f"{check_name} failed for {len(failed)} of {len(results)} partitions of {asset_key.to_user_string()}: " \
               + name_list(failed)
    if line and blocking:
        raise dg.Failure(line, metadata=summary)
    if line:
        context.log.warning(line)
    yield dg.Output(None)


def by_partition(keys: Iterable[str], shift_keys: Sequence[str], pair_result) -> dict:
    """A check's result of each partition from the results of the (class, shift) pairs it holds.

    A class x shift partition's result is its pair's; a class partition (the class grain) passes
    when every shift does, and names the failing shifts with the first one's reason.
    """
    from .partitions import pairs_of

    out = {}
    for key in keys:
        results = [(s, *pair_result(c, s)) for c, s in pairs_of(key, list(shift_keys))]
        if len(results) == 1:
            out[key] = tuple(results[0][1:])
            continue
        bad = [(s, meta) for s, ok, meta in results if not ok]
        meta = {"shifts": len(results), "failed_shifts": name_list([s for s, _ in bad]) or "none",
                **({"reason": f"{bad[0][0]}: {bad[0][1].get('reason', 'failed')}"
                              + (f" (and {len(bad) - 1} more shifts)" if len(bad) > 1 else "")} if bad else {})}
        out[key] = (not bad, meta)
    return out


def failed_partitions(instance: dg.DagsterInstance, check_key: dg.AssetCheckKey,
                      partition_keys: Iterable[str]) -> list[str]:
    """The partitions whose latest evaluation of the check failed, on their current materialization.

    A partition never checked, or materialized again since, does not count (as in Dagster: only a
    failed result blocks).
    """
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    keys = list(partition_keys)
    if not keys:
        return []
    infos = instance.event_log_storage.get_asset_check_partition_info([check_key], partition_keys=keys)
    return sorted(i.partition_key for i in infos
                  if i.latest_execution_status == AssetCheckExecutionRecordStatus.FAILED and i.is_current)
