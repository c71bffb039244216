"""Partitions: classes are dynamic (a sensor adds them), shifts are static (from the catalog)."""

import dagster as dg

CLASSES = dg.DynamicPartitionsDefinition(name="classes")

OWNERS = ["team:dataset-interfaces"]  # shown on every asset in the UI


def class_shift_partitions(shift_keys: list[str]) -> dg.MultiPartitionsDefinition:
    # Keys read "<class>|<shift>": dimensions are sorted by name.
    return dg.MultiPartitionsDefinition({"class": CLASSES, "shift": dg.StaticPartitionsDefinition(shift_keys)})



def missing_or_changed(deps_updated: bool = True) -> dg.AutomationCondition:
    """Eager (with `deps_updated`), and also when the asset's code version changed.

    A classifier or a baseline added to the settings is a new asset; Dagster's eager condition
    leaves what was missing at its first evaluation alone, so a missing partition whose upstream
    exists runs too (unless its last run failed: then it waits for a change).
    """
    AC = dg.AutomationCondition
    trigger = AC.newly_missing() | AC.code_version_changed()
    if deps_updated:
        trigger = trigger | AC.any_deps_updated()
    return ((trigger.since_last_handled() | (AC.missing() & ~AC.execution_failed()))
            & ~AC.any_deps_missing() & ~AC.any_deps_in_progress() & ~AC.in_progress()
            ).with_label("missing, or upstream or code changed" if deps_updated else "missing, or code changed")


def class_and_shift_keys(context: dg.AssetExecutionContext) -> list[tuple[str, str]]:
    """(class, shift) of every partition in this run: one key, or a range (single-run backfill)."""
    out = []
    for key in context.partition_keys:
        dims = key.keys_by_dimension if isinstance(key, dg.MultiPartitionKey) else dict(
            zip(("class", "shift"), str(key).split("|")))
        out.append((dims["class"], dims["shift"]))
    return out
