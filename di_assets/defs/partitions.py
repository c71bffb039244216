"""Partitions: classes are dynamic (a sensor adds them), shifts are static (from the catalog)."""

import dagster as dg

CLASSES = dg.DynamicPartitionsDefinition(name="classes")

OWNERS = ["team:dataset-interfaces"]  # shown on every asset in the UI


def class_shift_partitions(shift_keys: list[str]) -> dg.MultiPartitionsDefinition:
    # Keys read "<class>|<shift>": dimensions are sorted by name.
    return dg.MultiPartitionsDefinition({"class": CLASSES, "shift": dg.StaticPartitionsDefinition(shift_keys)})



def class_and_shift_keys(context: dg.AssetExecutionContext) -> list[tuple[str, str]]:
    """(class, shift) of every partition in this run: one key, or a range (single-run backfill)."""
    out = []
    for key in context.partition_keys:
        dims = key.keys_by_dimension if isinstance(key, dg.MultiPartitionKey) else dict(
            zip(("class", "shift"), str(key).split("|")))
        out.append((dims["class"], dims["shift"]))
    return out
