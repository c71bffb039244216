"""The Dagster layer: assets (one file per stage), partitions, resources and the sensor."""

from __future__ import annotations

import dagster as dg
from dagster_duckdb import DuckDBResource

from di_assets.ml.shifts import select_shifts
from di_assets.settings import Settings

from .class_images import class_folders_sensor, class_images
from .class_token import class_token
from .clip_scores import build_clip_scores
from .counterfactuals import build_counterfactuals
from .encoder_root import encoder_root
from .partitions import CLASSES, class_shift_partitions
from .resources import (
    GenerationParams, InterfaceParams, ModelResource, ScoringParams, StorageResource, TextualInversionParams,
)
from .scores_db import scores_db


observe_class_images = dg.define_asset_job(
    "observe_class_images", selection=dg.AssetSelection.keys("class_images"),
    description="Observe the class folders: records each folder's content hash as its data version.",
)


def build_resources(settings: Settings) -> dict:
    storage = StorageResource(root=settings.storage, dataset=settings.dataset)
    return {
        "storage": storage,
        "models": ModelResource(**settings.models),
        "params": InterfaceParams(
            textual_inversion=TextualInversionParams(**settings.textual_inversion),
            generation=GenerationParams(**settings.generation),
            scoring=ScoringParams(**settings.scoring),
        ),
        "duckdb": DuckDBResource(database=str(storage.scores_db)),
    }


def build_assets(settings: Settings) -> list:
    shifts = select_shifts(settings.shifts)
    grid = class_shift_partitions([s.key for s in shifts])
    return [class_images, class_token, encoder_root, build_counterfactuals(shifts, grid),
            build_clip_scores(shifts, grid), scores_db]


def build_defs(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.load()
    return dg.Definitions(
        assets=build_assets(settings),
        jobs=[observe_class_images],
        sensors=[class_folders_sensor],
        resources=build_resources(settings),
        # In-process: models load once per run and stay loaded for every partition of it.
        executor=dg.in_process_executor,
    )


__all__ = ["CLASSES", "build_assets", "build_defs", "build_resources"]
