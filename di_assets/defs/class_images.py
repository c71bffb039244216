"""class_images: the class folders of the dataset, observed; a sensor keeps the class partitions in step."""

import json

import dagster as dg

from .partitions import CLASSES
from .resources import StorageResource


@dg.observable_source_asset(
    partitions_def=CLASSES,
    group_name="interface",
    description="Class folders of the image dataset (ImageFolder layout). Data version: content hash of each folder.",
)
def class_images(context, storage: StorageResource) -> dg.DataVersionsByPartition:
    classes = storage.classes()
    known = context.instance.get_dynamic_partitions(CLASSES.name)
    for key in known:
        if key in classes:
            # each class's own record: its data version (the content hash) and what the folder holds
            context.log_event(folder_observation(key, classes[key]))
    return dg.DataVersionsByPartition({})


def folder_observation(key: str, folder) -> dg.AssetObservation:
    """A class folder's observation: content hash as data version; image count, skipped files, path."""
    from di_assets.ml.io import describe_folder

    d = describe_folder(folder.path)
    return dg.AssetObservation(
        asset_key="class_images", partition=key, tags={"dagster/data_version": d["hash"]},
        metadata={"images": d["images"], "skipped_files": len(d["skipped"]),
                  "skipped": ", ".join(d["skipped"][:20]) or "none", "hash": d["hash"],
                  "folder": dg.MetadataValue.path(str(folder.path)), "class_name": folder.name})


observe_class_images = dg.define_asset_job(
    "observe_class_images", selection=dg.AssetSelection.assets("class_images"),
    description="Observe the class folders: records each folder's content hash as its data version.",
)


def build_observe_schedule(cron: str) -> dg.ScheduleDefinition:
    # A changed data version makes that class's token, then its images and scores, rerun
    # through their automation conditions; unchanged classes stay as they are.
    return dg.ScheduleDefinition(
        name="observe_dataset_schedule", job=observe_class_images, cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Observe the dataset folder so that changed classes rerun",
    )


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Adds a `classes` partition for each new class folder; removes (and trashes) the ones whose folder is gone.",
)
def class_folders_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    on_disk = set(storage.classes())
    known = set(context.instance.get_dynamic_partitions(CLASSES.name))
    new, gone = sorted(on_disk - known), sorted(known - on_disk)
    cursor = json.dumps(sorted(on_disk))
    if not new and not gone:
        return dg.SensorResult(skip_reason=f"the {len(on_disk)} class folders are unchanged", cursor=cursor)
    requests, runs, events = [], [], []
    if new:
        context.log.info(f"new classes: {', '.join(new)}")
        requests.append(CLASSES.build_add_request(new))  # class_token's eager condition fills them
        classes = storage.classes()
        # Observe them at once, so their tokens need not wait for the next scheduled observation.
        events = [folder_observation(key, classes[key]) for key in new]
    if gone:
        for key in gone:
            where = storage.retire_class(key)
            context.log.info(f"class {key} removed; its files {'moved to ' + str(where) if where else 'deleted'}")
        requests.append(CLASSES.build_delete_request(gone))
    if gone and not new:
        # Drop the classes from the encoder root. (With new classes too, automation rebuilds the
        # root once their tokens exist.) The DuckDB views read only the files that remain.
        runs.append(dg.RunRequest(run_key=f"remove-{'-'.join(gone)}-{context.cursor or ''}"[:250],
                                  asset_selection=[dg.AssetKey("encoder_root"), dg.AssetKey("scores_db")]))
    return dg.SensorResult(dynamic_partitions_requests=requests, run_requests=runs, asset_events=events, cursor=cursor)
