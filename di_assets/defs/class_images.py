"""class_images: the class folders of the dataset, observed; a sensor keeps the class partitions in step."""

import hashlib
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
                "(with a suffix once a removed class has come back). Only folders whose listing changed are "
                "hashed again; DI_ASSETS_OBSERVE_FULL=1 hashes every folder.",
)
def class_images(context, storage: StorageResource) -> dg.DataVersionsByPartition:
    """Observe the class folders, incrementally.

    A folder is hashed again only when its listing (names, sizes, time stamps: see
    `di_assets.ml.observe`) changed since the memo in `<storage>/.observed/` recorded it. An
    observation (and its IMAGES_CHECK evaluation) is logged only for a class whose listing changed
    (or that the memo did not hold) or whose data version differs from its latest one (a class
    back after REMOVED, a new Dagster instance); every other class keeps its data version. A class
    the sensor observed gets its IMAGES_CHECK evaluation here (see `checks_due`).
    A rewrite that keeps a file's size, mtime and ctime is not seen (as rsync's quick check does
    not see it): `DI_ASSETS_OBSERVE_FULL=1` in the environment hashes every folder again.
    """
    from di_assets.ml.observe import ObservationMemo

    classes = storage.classes()
    keys = [k for k in context.instance.get_dynamic_partitions(CLASSES.name) if k in classes]
    memo = ObservationMemo(storage.root)
    was, due = latest_versions(context.instance, keys), checks_due(context.instance, keys)
    described, emitted = {}, []
    try:
        for key in keys:
            d, changed = memo.describe(key, classes[key].path)
            described[key] = d
            version = data_version(d["hash"], was.get(key))
            if changed or version != was.get(key):
                # each class's own record: its data version (the content hash) and what the folder holds
                context.log_event(folder_observation(key, classes[key], d, version))
                emitted.append(key)
            memo.checkpoint()
    finally:
        memo.save(keep=classes)  # also what a failed observation hashed before it failed
    context.log.info(f"observed {len(keys)} class folders: {len(memo.described)} hashed again, "
                     f"{len(emitted)} observations logged")
    # IMAGES_CHECK of each class just observed (or observed by the sensor), from the count its
    # description made (this job leaves the check itself out: it is partitioned, and the observation
    # is not); the summary counts every class
    failed = [k for k in keys if not described[k]["images"]]
    for key in [k for k in keys if k in due or k in emitted]:
        ok, meta = images_check_result(classes[key].path, described[key]["images"])
        context.log_event(evaluation(None, CLASS_IMAGES, IMAGES_CHECK, ok,
                                     {**meta, **({} if ok else failed_summary(failed, len(keys)))}, partition=key))
    if failed:
        context.log.warning(f"{IMAGES_CHECK} failed for {len(failed)} of {len(keys)} classes: {name_list(failed)}")
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


def data_version(content_hash: str, was: str | None) -> str:
    """An observed folder's data version: its content hash, or the `<hash>~<n>` it already has.

    A class that came back after it was removed got `<hash>~<n>` (see `new_class_events`); later
    observations keep that version while the content stays.
    """
    return was if was and was.startswith(content_hash + LIFE) else content_hash


def folder_observation(key: str, folder, d: dict, version: str) -> dg.AssetObservation:
    """A class folder's observation: its data version; image count, skipped files, path (`d`: its description)."""
    return dg.AssetObservation(
        asset_key="class_images", partition=key, tags={"dagster/data_version": version},
        metadata={"images": d["images"], "skipped_files": len(d["skipped"]),
                  "skipped": ", ".join(d["skipped"][:20]) or "none", "hash": d["hash"],
                  "folder": dg.MetadataValue.path(str(folder.path)), "class_name": folder.name})


BATCH = 500  # partition keys per query (SQLite allows 999 parameters in older builds)


def latest_versions(instance: dg.DagsterInstance, keys: list[str]) -> dict[str, str]:
    """The data version of each key's latest observation: one query per BATCH keys, not one per key."""
    out = {}
    for i in range(0, len(keys), BATCH):
        tags = instance.event_log_storage.get_latest_tags_by_partition(
            CLASS_IMAGES, dg.DagsterEventType.ASSET_OBSERVATION, ["dagster/data_version"],
            asset_partitions=keys[i:i + BATCH])
        out.update({k: t["dagster/data_version"] for k, t in tags.items() if "dagster/data_version" in t})
    return out


def new_class_events(instance: dg.DagsterInstance, root: str, classes: dict, new: list[str], memo=None) -> list:
    """The observations of classes the sensor adds (their IMAGES_CHECK follows in the next observation job).

    A class that comes back after it was removed (earlier records of its key) is new data even
    with the same images: its token, images and scores left with it. Its data version is then
    the hash with a suffix (`<hash>~<n>`, n: its latest record's storage id) that no earlier
    version of the key has, so class_token reruns whenever automation last looked (also when no
    automation tick saw the REMOVED version in between). The latest records of all `new` keys
    come from one query per BATCH keys; `memo` (an ObservationMemo) then holds their
    descriptions, so that the next observation does not hash them again.
    """
    from di_assets.ml.observe import ObservationMemo

    memo = memo if memo is not None else ObservationMemo(root)
    last = _latest_storage_ids(instance, new)
    events = []
    for key in new:
        d = memo.describe(key, classes[key].path)[0]
        version = f"{d['hash']}{LIFE}{last[key]}" if key in last else d["hash"]
        events.append(folder_observation(key, classes[key], d, version))
    return events


def _latest_storage_ids(instance: dg.DagsterInstance, keys: list[str]) -> dict[str, int]:
    out = {}
    for i in range(0, len(keys), BATCH):
        out.update(instance.get_latest_storage_id_by_partition(
            CLASS_IMAGES, dg.DagsterEventType.ASSET_OBSERVATION, set(keys[i:i + BATCH])))
    return out


def checks_due(instance: dg.DagsterInstance, keys: list[str]) -> set[str]:
    """The keys whose IMAGES_CHECK has no evaluation since their latest observation (one the sensor
    logged: a sensor cannot log a partitioned check's evaluation twice, Dagster 1.13 refuses it)."""
    if not instance.event_log_storage.supports_asset_checks:
        return set()
    check = dg.AssetCheckKey(CLASS_IMAGES, IMAGES_CHECK)
    observed = _latest_storage_ids(instance, keys)
    evaluated = {}
    for i in range(0, len(keys), BATCH):
        infos = instance.event_log_storage.get_asset_check_partition_info([check], partition_keys=keys[i:i + BATCH])
        evaluated.update({info.partition_key: info.latest_check_event_storage_id for info in infos})
    return {k for k in keys if k in observed and evaluated.get(k, -1) < observed[k]}


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


def class_set_cursor(previous: str | None, classes) -> str:
    """`<digest of the class set>:<number of changes seen>`: a digest, not the names, as Dagster stores
    the cursor with every tick (21,000 names are 300 KB a tick); the count makes each change's cursor
    new, also when a class leaves, comes back and leaves again."""
    digest = hashlib.sha256(json.dumps(sorted(classes)).encode()).hexdigest()[:16]
    last, _, changes = (previous or "").partition(":")
    if last == digest:
        return previous
    return f"{digest}:{int(changes) + 1 if changes.isdigit() else 1}"


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Adds a `classes` partition for each new class folder; removes (and trashes) the ones whose folder is gone.",
)
def class_folders_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    from di_assets.ml.observe import ObservationMemo

    classes = storage.classes()
    on_disk = set(classes)
    known = set(context.instance.get_dynamic_partitions(CLASSES.name))
    new, gone = sorted(on_disk - known), sorted(known - on_disk)
    cursor = class_set_cursor(context.cursor, on_disk)
    if not new and not gone:
        return dg.SensorResult(skip_reason=f"the {len(on_disk)} class folders are unchanged", cursor=cursor)
    requests, runs, events = [], [], []
    memo = ObservationMemo(storage.root)
    if new:
        context.log.info(f"{len(new)} new classes: {name_list(new)}")
        requests.append(CLASSES.build_add_request(new))  # class_token's eager condition fills them
        # Observe them at once, so their tokens need not wait for the next scheduled observation.
        events = new_class_events(context.instance, storage.root, classes, new, memo)
    if gone:
        for key in gone:
            where = storage.retire_class(key)
            context.log.info(f"class {key} removed; its files {'moved to ' + str(where) if where else 'deleted'}")
        # The folder's data version becomes REMOVED: its files just left. A class of that key that
        # comes back (the same images or not) gets a new data version (see new_class_events), so
        # its token is learned again and everything downstream follows.
        events += [removed_observation(key) for key in gone]
        requests.append(CLASSES.build_delete_request(gone))
    memo.save(keep=on_disk)
    if gone and not new:
        # Drop the classes from the encoder root. (With new classes too, automation rebuilds the
        # root once their tokens exist.) The DuckDB views read only the files that remain.
        runs.append(dg.RunRequest(run_key=f"remove-{cursor}",  # once per change
                                  asset_selection=[dg.AssetKey("encoder_root"), dg.AssetKey("scores_db")]))
    return dg.SensorResult(dynamic_partitions_requests=requests, run_requests=runs, asset_events=events, cursor=cursor)
