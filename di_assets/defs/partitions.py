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


def interface_partitions(shift_keys: list[str], grain: str = "class_shift") -> dg.PartitionsDefinition:
    """The partitions of counterfactuals, scores and predictions: class x shift, or class only."""
    return CLASSES if grain == "class" else class_shift_partitions(shift_keys)


def grain_of(partitions_def: dg.PartitionsDefinition) -> str:
    """The grain (settings' `partition_grain`) that interface_partitions made `partitions_def` for."""
    return "class_shift" if isinstance(partitions_def, dg.MultiPartitionsDefinition) else "class"


def pairs_of(key: str, shift_keys: list[str]) -> list[tuple[str, str]]:
    """The (class, shift) pairs that one partition makes: `class|shift` one, a class key every shift."""
    if "|" in key:
        class_key, shift = key.split("|")
        return [(class_key, shift)]
    return [(key, s) for s in shift_keys]


def partition_pairs(context: dg.AssetExecutionContext, shift_keys: list[str]) -> list[tuple[str, str, str]]:
    """(partition key, class, shift) of every pair this run makes, partition by partition: one key,
    or a range (single-run backfill); at the class grain a partition makes all its class's shifts."""
    return [(str(key), c, s) for key in context.partition_keys for c, s in pairs_of(str(key), shift_keys)]


def ends_partition(work: list[tuple[str, str, str]], done: int) -> bool:
    """Whether the `done`-th pair of `work` (1-based) is the last of its partition: its record is due."""
    return done == len(work) or work[done][0] != work[done - 1][0]
