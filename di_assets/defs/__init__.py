"""The Dagster layer: assets (one file per stage), partitions, resources, sensor and schedule."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from di_assets.ml.shifts import select_shifts
from di_assets.settings import Settings

from .class_images import (
    build_observe_schedule,
    class_folders_sensor,
    class_images,
    images_check,
    observe_class_images,
)
from .class_token import build_class_token, build_token_check
from .clip_scores import build_clip_scores, build_range_check
from .counterfactuals import build_count_check, build_counterfactuals
from .diagnosis import build_diagnosis
from .encoder_root import build_encoder_root, build_root_check
from .executors import build_executor
from .partitions import CLASSES, interface_partitions
from .predictions import build_predictions, build_real_predictions
from .progress import LOGGERS
from .resources import InterfaceParams, ModelResource, StorageResource
from .scores_db import build_rows_check, build_scores_db
from .versions import classifier_version, code_versions


GC_ENV = "DI_ASSETS_GC_THRESHOLD"
GC_THRESHOLD = (50_000, 10, 10)  # Python's default is (700, 10, 10)


def collect_less_often() -> None:
    """Python's cyclic garbage collector, at its default thresholds, runs a full collection every few
    hundred thousand allocations, and each one walks every object of the process: with Dagster, torch
    and the models loaded, 0.2-0.35 s each, 4-6 of them in one `di-assets update` of one class (1.3-1.9
    s of 7-10 s, more with more classes). Our objects are freed by reference counting; cycles are few
    and small. So the youngest generation holds 50,000 objects before a collection, which makes every
    collection about 70 times rarer. And the objects that exist when a process first loads the
    definitions (Dagster's and ours: modules, classes, functions, kept for the process's life) are
    frozen once (gc.freeze): a full collection skips them. In an update that saves its one full
    collection, and the collector's time falls from 0.49-0.55 s to 0.28-0.32 s; cycles already
    garbage then are kept, once. `$DI_ASSETS_GC_THRESHOLD` (three integers, as gc.set_threshold takes them: `700,10,10` is
    Python's default) overrides the thresholds and leaves the objects unfrozen."""
    import gc
    import os

    value = os.environ.get(GC_ENV, "").strip()
    try:
        threshold = tuple(int(v) for v in value.split(",")) if value else GC_THRESHOLD
        if len(threshold) != 3 or min(threshold) < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{GC_ENV}={value!r}: give three integers, as gc.set_threshold takes them "
                         "(e.g. 700,10,10)") from None
    gc.set_threshold(*threshold)
    if not value and not gc.get_freeze_count():  # once: a second load finds them frozen
        gc.freeze()


def build_resources(settings: Settings) -> dict:
    from di_assets.ml.threads import set_wait_policy

    set_wait_policy(settings.models.get("omp_wait_policy"))  # before this process imports torch
    collect_less_often()  # in every process that loads the definitions: `di-assets`, code servers, runs
    storage = StorageResource(root=settings.storage, dataset=settings.dataset, removed_classes=settings.removed_classes)
    return {
        "storage": storage,
        "models": ModelResource(**settings.models),
        # every unset hyperparameter at its family default, so that the launchpad shows the values in use
        "params": InterfaceParams.for_settings(settings),
        # the views read paths relative to the storage root (so that a root can move): resolve them there
        "duckdb": DuckDBResource(database=str(storage.scores_db),
                                 connection_config={"file_search_path": str(Path(storage.root).resolve())}),
    }


def build_assets(settings: Settings) -> list:
    shifts = select_shifts(settings.shifts)
    keys = [s.key for s in shifts]
    grid = interface_partitions(keys, settings.partition_grain)
    versions = code_versions(settings, shifts)
    assets = [
        class_images,
        build_class_token(versions["class_token"]),
        build_encoder_root(versions["encoder_root"]),
        build_counterfactuals(shifts, grid, versions["counterfactuals"]),
        build_clip_scores(shifts, grid, versions["clip_scores"]),
        build_scores_db(settings.baseline, keys, settings.partition_grain),
        # The asset checks (each reads its asset's files; it runs after its asset, or alone from the UI)
        images_check,
        build_token_check(),
        build_root_check(),
        build_count_check(grid, shift_keys=keys),
        build_range_check(grid, shift_keys=keys),
        build_rows_check(keys, settings.partition_grain),
    ]
    if settings.baseline:  # the paper's class-name baseline, to compare with the tokens shift by shift
        assets += [build_counterfactuals(shifts, grid, versions["counterfactuals"], baseline=True),
                   build_clip_scores(shifts, grid, versions["clip_scores"], baseline=True),
                   build_count_check(grid, baseline=True, shift_keys=keys),
                   build_range_check(grid, baseline=True, shift_keys=keys)]
    classifiers = settings.classifier_specs()
    for spec in classifiers:
        assets += [build_predictions(spec, grid, classifier_version(spec), keys),
                   build_real_predictions(spec, classifier_version(spec))]
    if classifiers:
        assets.append(build_diagnosis([s.name for s in classifiers], versions["diagnosis"]))
    return assets


def build_defs(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.load()
    return dg.Definitions(
        assets=build_assets(settings),
        jobs=[observe_class_images],
        schedules=[build_observe_schedule(settings.observe_cron)],
        sensors=[class_folders_sensor],
        resources=build_resources(settings),
        # In-process by default (models load once per run); $DI_ASSETS_EXECUTOR picks multiprocess or k8s.
        executor=build_executor(),
        loggers=LOGGERS,  # Dagster's console logger, and the command line's bar and log file
    )


__all__ = ["CLASSES", "build_assets", "build_defs", "build_resources"]
