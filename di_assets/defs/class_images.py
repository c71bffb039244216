"""class_images: the class folders of the dataset, observed; a sensor adds new classes."""

import dagster as dg

from .partitions import CLASSES
from .resources import StorageResource


@dg.observable_source_asset(
    partitions_def=CLASSES,
    group_name="interface",
    description="Class folders of the image dataset (ImageFolder layout). Data version: content hash of each folder.",
)
def class_images(context, storage: StorageResource) -> dg.DataVersionsByPartition:
    from di_assets.ml.io import hash_folder

    classes = storage.classes()
    known = context.instance.get_dynamic_partitions(CLASSES.name)
    versions = {key: dg.DataVersion(hash_folder(classes[key].path)) for key in known if key in classes}
    return dg.DataVersionsByPartition(versions)


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Adds a `classes` partition for each new class folder in the dataset.",
)
def class_folders_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    on_disk = storage.classes()
    known = set(context.instance.get_dynamic_partitions(CLASSES.name))
    new = sorted(set(on_disk) - known)
    if not new:
        return dg.SkipReason(f"no new class folders in {storage.dataset}")
    context.log.info("new classes: %s", ", ".join(new))
    return dg.SensorResult(dynamic_partitions_requests=[CLASSES.build_add_request(new)])
