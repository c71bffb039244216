"""Partitions: classes are dynamic (a sensor adds them), shifts are static (from the catalog)."""

import dagster as dg

CLASSES = dg.DynamicPartitionsDefinition(name="classes")


def class_shift_partitions(shift_keys: list[str]) -> dg.MultiPartitionsDefinition:
    # Keys read "<class>|<shift>": dimensions are sorted by name.
    return dg.MultiPartitionsDefinition({"class": CLASSES, "shift": dg.StaticPartitionsDefinition(shift_keys)})


def class_and_shift(context: dg.AssetExecutionContext) -> tuple[str, str]:
    keys = context.partition_key.keys_by_dimension
    return keys["class"], keys["shift"]
