"""class_images: the class folders of the dataset, observed; a sensor keeps the class partitions in step."""

import json

import dagster as dg

from .checks import emit, evaluation, failed_summary, name_list, partitioned_checks, run_partition_keys
from .partitions import CLASSES
from .resources import StorageResource

REMOVED = "removed"  # the data version of a class folder that is gone
LIFE = "~"  # "<content hash>~<n>": the data version of a class folder that came back after it was removed
CLASS_IMAGES = dg.AssetKey("class_images")
IMAGES_CHECK = "has_a_readable_image"


@dg.observable_source_asset(
    partitions_def=CLASSES,
    group_name="interface",
    description="Class folders of the image dataset (ImageFolder layout). Data version: content hash of each folder "
                "(with a suffix once a removed class has come back).",
)
def class_images(context, storage: StorageResource) -> dg.DataVersionsByPartition:
    classes = storage.classes()
    known = context.instance.get_dynamic_partitions(CLASSES.name)
    checked = {}
    for key in known:
        if key in classes:
            # each class's own record: its data version (the content hash) and what the folder holds
            observation = folder_observation(key, classes[key], context.instance)
            context.log_event(observation)
            checked[key] = images_check_result(classes[key].path, observation.metadata["images"].value)
    # IMAGES_CHECK of every observed class, from the count the observation just made (this job leaves
    # the check itself out: it is partitioned, and the observation is not)
    failed = [k for k, (ok, _) in checked.items() if not ok]
    for key, (ok, meta) in checked.items():
        context.log_event(evaluation(None, CLASS_IMAGES, IMAGES_CHECK, ok,
                                     {**meta, **({} if ok else failed_summary(failed, len(checked)))}, partition=key))
    if failed:
        context.log.warning(f"{IMAGES_CHECK} failed for {len(failed)} of {len(checked)} classes: {name_list(failed)}")
    return dg.DataVersionsByPartition({})


def images_check_result(path, readable: int | None = None) -> tuple[bool, dict]:
    """IMAGES_CHECK of a class folder: at least one image that loads as the training loads it.

    `readable`: the count an observation just made (`describe_folder`); without it, the folder is
    read up to its first readable image.
    """
    from di_assets.ml.io import load_class_images

    meta = {"folder": dg.MetadataValue.path(str(path))}
    if readable is not None:
        return readable > 0, {**meta, "readable_images": readable,
                              **({} if readable else {"reason": "no readable image"})}
    try:
        files, _ = load_class_images(path, with_files=True, limit=1)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        return False, {**meta, "reason": str(exc).strip().splitlines()[0]}
    return True, {**meta, "first_readable": files[0].name}


with partitioned_checks():
    @dg.asset_check(asset=CLASS_IMAGES, name=IMAGES_CHECK, partitions_def=CLASSES,
                    description="The class folder holds at least one image that loads (as the training loads it)")
    def images_check(context: dg.AssetCheckExecutionContext, storage: StorageResource):
        classes = storage.classes()
        results = {key: images_check_result(classes[key].path) if key in classes else
                   (False, {"reason": f"no folder {key!r} in {storage.dataset}"})
                   for key in run_partition_keys(context, CLASSES)}
        yield from emit(context, CLASS_IMAGES, IMAGES_CHECK, results)


def folder_observation(key: str, folder, instance: dg.DagsterInstance | None = None, *,
                       new: bool = False) -> dg.AssetObservation:
    """A class folder's observation: content hash as data version; image count, skipped files, path.

    A class that comes back after it was removed (`new`, with earlier records of its key) is
    new data even with the same images: its token, images and scores left with it. Its data
    version is then the hash with a suffix (`<hash>~<n>`) that no earlier version of the key has,
    so class_token reruns whenever automation last looked (also when no automation tick saw the
    REMOVED version in between); later observations keep that version while the content stays.
    """
    from di_assets.ml.io import describe_folder

    d = describe_folder(folder.path)
    version = d["hash"]
    last = _latest_observation(instance, key) if instance is not None else None
    if last is not None:
        was = last.asset_observation.tags.get("dagster/data_version") or ""
        if new:
            version = f"{d['hash']}{LIFE}{last.storage_id}"
        elif was.startswith(d["hash"] + LIFE):
            version = was
    return dg.AssetObservation(
        asset_key="class_images", partition=key, tags={"dagster/data_version": version},
        metadata={"images": d["images"], "skipped_files": len(d["skipped"]),
                  "skipped": ", ".join(d["skipped"][:20]) or "none", "hash": d["hash"],
                  "folder": dg.MetadataValue.path(str(folder.path)), "class_name": folder.name})


def _latest_observation(instance: dg.DagsterInstance, key: str):
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("class_images"), asset_partitions=[key]), limit=1).records
    return records[0] if records else None


def removed_observation(key: str) -> dg.AssetObservation:
    """A removed class folder's observation: data version REMOVED (no content hash is equal to it)."""
    return dg.AssetObservation(asset_key="class_images", partition=key, tags={"dagster/data_version": REMOVED},
                               metadata={"images": 0, "removed": True})


observe_class_images = dg.define_asset_job(
    # without the (partitioned) check: the observation reports it for every class (see class_images)
    "observe_class_images", selection=dg.AssetSelection.assets("class_images").without_checks(),
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
        events = [folder_observation(key, classes[key], context.instance, new=True) for key in new]
    if gone:
        for key in gone:
            where = storage.retire_class(key)
            context.log.info(f"class {key} removed; its files {'moved to ' + str(where) if where else 'deleted'}")
        # The folder's data version becomes REMOVED: its files just left. A class of that key that
        # comes back (the same images or not) gets a new data version (see folder_observation), so
        # its token is learned again and everything downstream follows.
        events += [removed_observation(key) for key in gone]
        requests.append(CLASSES.build_delete_request(gone))
    if gone and not new:
        # Drop the classes from the encoder root. (With new classes too, automation rebuilds the
        # root once their tokens exist.) The DuckDB views read only the files that remain.
        runs.append(dg.RunRequest(run_key=f"remove-{'-'.join(gone)}-{context.cursor or ''}"[:250],
                                  asset_selection=[dg.AssetKey("encoder_root"), dg.AssetKey("scores_db")]))
    return dg.SensorResult(dynamic_partitions_requests=requests, run_requests=runs, asset_events=events, cursor=cursor)
