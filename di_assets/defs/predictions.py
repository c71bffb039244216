"""predictions/<classifier>: a classifier under diagnosis on every counterfactual (class x shift),
and real_predictions/<classifier>: the same classifier on each class's own images.

One asset pair per classifier, so that adding a classifier evaluates that classifier only, and
changing one (its settings or its weights file) makes only its predictions stale.
"""


import dataclasses

import dagster as dg

from .class_images import class_images
from .executors import gpu_tags
from .progress import ProgressLines
from .metadata import table_schema
from .partitions import CLASSES, OWNERS, ends_partition, missing_or_changed, partition_pairs
from .resources import ModelResource, StorageResource

PREDICTIONS = "predictions"
REAL_PREDICTIONS = "real_predictions"
PREDICTION_COLUMNS = {
    "classifier": "Classifier name (from the settings' `classifiers`)",
    "class_key": "Class partition key", "class_name": "Class display name", "shift": "Shift key",
    "seed": "Seed of the generated image", "image_path": "Image file, relative to the storage root",
    "label": "The classifier's label that the class maps to", "top1": "Predicted label",
    "top5": "Top-5 predicted labels", "top5_prob": "Their softmax probabilities",
    "correct1": "top1 is the class's label", "correct5": "The class's label is among the top 5",
    "kept": "The CLIP filter kept the image", "drop_reason": "Why the CLIP filter dropped it (null when kept)",
}


def prediction_key(name: str) -> dg.AssetKey:
    return dg.AssetKey([PREDICTIONS, name])


def real_prediction_key(name: str) -> dg.AssetKey:
    return dg.AssetKey([REAL_PREDICTIONS, name])


def _load(spec, storage: StorageResource, device: str):
    """The classifier on this step's device, and the class -> label index map, resolved once per run."""
    from di_assets.ml.classifiers import load_classifier, map_classes

    classes = storage.classes()
    if spec.device == "auto":
        spec = dataclasses.replace(spec, device=device)
    clf = load_classifier(spec, class_names=[c.name for c in classes.values()])
    targets = map_classes([(k, c.name) for k, c in classes.items()], clf, spec.mapping)
    return clf, classes, targets


def _asset_args(code_version: str) -> dict:
    """What both assets of a classifier share: a GPU step, one run over many partitions, and
    automation that also runs a classifier added or changed in the settings."""
    return dict(group_name="diagnosis", owners=OWNERS, code_version=code_version, pool="gpu", op_tags=gpu_tags(),
                kinds={"pytorch", "parquet"}, automation_condition=missing_or_changed(),
                backfill_policy=dg.BackfillPolicy.single_run())


def build_predictions(spec, partitions_def, code_version: str, shift_keys: list[str] = ()) -> dg.AssetsDefinition:
    shift_keys = list(shift_keys)

    @dg.asset(
        key=prediction_key(spec.name),
        partitions_def=partitions_def,
        deps=[dg.AssetKey("counterfactuals"), dg.AssetKey("clip_scores")],
        **_asset_args(code_version),
        metadata={"dagster/column_schema": table_schema((c, "string", d) for c, d in PREDICTION_COLUMNS.items())},
        description=f"Classifier `{spec.name}` ({spec.kind}) on every counterfactual: "
                    f"`predictions/classifier={spec.name}/class=<c>/shift=<s>/part.parquet`",
    )
    def predictions(context: dg.AssetExecutionContext, storage: StorageResource,
                    models: ModelResource) -> dg.MaterializeResult:
        from datetime import datetime, timezone

        import pyarrow as pa
        import pyarrow.parquet as pq

        from di_assets.ml.diagnosis import predict_partition, predictions_file
        from di_assets.ml.io import atomic_path

        work = partition_pairs(context, shift_keys)
        progress = ProgressLines(context.log, len(work))
        with models.leased_spec() as mspec:
            clf, classes, targets = _load(spec, storage, mspec.device)
            acc: dict[str, list[int]] = {}  # the partition's rows, correct, kept, kept and correct so far
            for i, (pkey, key, shift) in enumerate(work, 1):
                table = predict_partition(clf, storage.root, key, classes[key].name, shift, targets[key])
                table = table.append_column("created_at", pa.array([datetime.now(timezone.utc)] * table.num_rows,
                                                                    pa.timestamp("us", tz="UTC")))
                with atomic_path(predictions_file(storage.root, spec.name, key, shift)) as tmp:
                    pq.write_table(table, tmp)
                right, kept = table.column("correct1").to_pylist(), table.column("kept").to_pylist()
                part = acc.setdefault(pkey, [0, 0, 0, 0])
                part[0] += table.num_rows
                part[1] += sum(right)
                part[2] += sum(kept)
                part[3] += sum(c and k for c, k in zip(right, kept))
                progress(i, f"{spec.name}: {key} / {shift}: {sum(right)}/{table.num_rows} correct")
                if not ends_partition(work, i):
                    continue  # the partition has more shifts
                # each partition's own record, also in a run over many partitions
                total, correct, kept_total, kept_correct = acc.pop(pkey)
                context.add_asset_metadata({
                    "dagster/row_count": total,
                    "accuracy": correct / total if total else float("nan"),
                    "accuracy_kept": kept_correct / kept_total if kept_total else float("nan"),
                    "kept": kept_total, "label": clf.labels[targets[key]],
                }, partition_key=pkey)
        return dg.MaterializeResult()

    return predictions


def build_real_predictions(spec, code_version: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=real_prediction_key(spec.name),
        partitions_def=CLASSES,
        deps=[class_images],
        **_asset_args(code_version),
        description=f"Classifier `{spec.name}` on each class's own images (the class folder), to tell "
                    "failures in a shift from failures on generated images",
    )
    def real_predictions(context: dg.AssetExecutionContext, storage: StorageResource,
                         models: ModelResource) -> dg.MaterializeResult:
        import pyarrow.parquet as pq

        from di_assets.ml.diagnosis import predict_images, prediction_table, real_predictions_file
        from di_assets.ml.io import atomic_path, load_class_images

        keys = [str(k) for k in context.partition_keys]
        with models.leased_spec() as mspec:
            clf, classes, targets = _load(spec, storage, mspec.device)
            for key in keys:
                folder = classes[key].path
                files, images = load_class_images(folder, with_files=True)
                cols = predict_images(clf, images, targets[key])
                cols["file"] = [f.name for f in files]
                table = prediction_table(cols, classifier=spec.name, class_key=key, class_name=classes[key].name)
                with atomic_path(real_predictions_file(storage.root, spec.name, key)) as tmp:
                    pq.write_table(table, tmp)
                # each class's own record, also in a run over many classes
                context.add_asset_metadata({
                    "dagster/row_count": len(images),
                    "accuracy": sum(cols["correct1"]) / len(images) if images else float("nan"),
                    "label": clf.labels[targets[key]],
                }, partition_key=key)
        return dg.MaterializeResult()

    return real_predictions
