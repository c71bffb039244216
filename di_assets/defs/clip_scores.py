"""clip_scores: CLIP similarity of each counterfactual to its class and shift captions."""

import dagster as dg

from di_assets.ml.shifts import Shift, class_caption

from .checks import emit, partitioned_checks, run_partition_keys
from .executors import gpu_tags
from .progress import partition_progress
from .metadata import captioned_strip_markdown, table_schema
from .partitions import OWNERS, class_and_shift_keys
from .resources import InterfaceParams, ModelResource, StorageResource

RANGE_CHECK = "scores_in_range"
# The columns of every score file (and of the `scores` view), as the UI's Columns section shows them.
SCORE_COLUMNS = [
    ("class_key", "string", "Class partition key"),
    ("class_name", "string", "Class display name, as in the captions"),
    ("shift", "string", "Shift key"),
    ("seed", "int", "Seed of the image"),
    ("image_path", "string", "The image file"),
    ("sim_class", "float", "CLIP similarity to the class caption `a photo of a <class>`"),
    ("sim_shift", "float", "CLIP similarity to the shift caption (`a photo in the snow`)"),
    ("sim_base", "float", "CLIP similarity to the base caption `a photo`"),
    ("zero_shot_class", "string", "CLIP's choice among the dataset's class captions"),
    ("sim_class_floor", "float", "The calibrated floor of sim_class for this partition (null where none)"),
    ("kept", "bool", "The CLIP filter keeps the image"),
    ("drop_reason", "string", "Why the filter dropped it (null when kept)"),
    ("diffusion_model", "string", "Base model of the counterfactuals"),
    ("clip_model", "string", "CLIP model / pretrained weights of the scores"),
    ("created_at", "timestamp", "When the scores were written"),
]


def score_schema() -> dg.TableSchema:
    return table_schema(SCORE_COLUMNS)



def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def build_clip_scores(shifts: list[Shift], partitions_def, code_version: str,
                      baseline: bool = False) -> dg.AssetsDefinition:
    """The scores; with `baseline`, of the class-name baseline's images (`baseline/scores/...`)."""
    by_key = {s.key: s for s in shifts}
    asset_name = "baseline_scores" if baseline else "clip_scores"
    where = "baseline/scores" if baseline else "scores"

    @dg.asset(
        name=asset_name,
        partitions_def=partitions_def,
        deps=[dg.AssetKey("baseline_counterfactuals" if baseline else "counterfactuals")],
        group_name="metrics",
        owners=OWNERS,
        code_version=code_version,
        pool="gpu",
        op_tags=gpu_tags(),  # dagster-k8s: a pod with a GPU, on GPU nodes
        kinds={"pytorch", "parquet"},
        # and only partitions whose images passed their blocking count check, partition by partition
        automation_condition=(dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
                              ).with_label("eager, images checked"),
        metadata={"dagster/column_schema": score_schema()},
        backfill_policy=dg.BackfillPolicy.single_run(),
        # Its check (RANGE_CHECK, build_range_check) runs after it in the same run, per partition.
        description=f"Scores in Hive layout: `{where}/class=<c>/shift=<s>/part.parquet`",
    )
    def clip_scores(
        context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource, params: InterfaceParams
    ) -> dg.MaterializeResult:
        from datetime import datetime, timezone

        import pyarrow as pa
        import pyarrow.parquet as pq

        from di_assets.ml.clip_metric import BASE_CAPTION, class_floor, drop_reasons, get_scorer
        from di_assets.ml.io import atomic_path, load_class_images, read_counterfactuals

        classes = storage.classes()  # once per run: every class caption takes part in the zero-shot filter
        class_keys = list(classes)
        index = {k: i for i, k in enumerate(class_keys)}
        captions = [class_caption(c.name) for c in classes.values()]
        pairs = class_and_shift_keys(context)
        # On a machine with several GPUs, this step holds one of them until it ends.
        with models.leased_spec() as spec:
            scorer = get_scorer(spec)
            rule = params.scoring.rule()
            stats, real_sim, dropped = [], {}, []
            if rule.calibrated:  # what a match looks like for this model: the class's real images, once per run
                for key in dict.fromkeys(k for k, _ in pairs):
                    if key in classes:
                        real = load_class_images(classes[key].path, limit=params.scoring.real_images)
                        real_sim[key] = scorer.similarity(real, [captions[index[key]]])[:, 0].median().item()
            for key, shift_key in pairs:
                shift = by_key[shift_key]
                folder = storage.images_dir(key, shift_key, baseline)
                manifest, images = read_counterfactuals(folder)
                if key not in classes:
                    raise dg.Failure(f"class {key!r} has no folder in {storage.dataset}; was it removed?")
                name, own = classes[key].name, index[key]
                # text features of every caption are computed once per process (the scorer caches them)
                sims = scorer.similarity(images, captions + [shift.caption, BASE_CAPTION])
                class_sims, sim_shift, sim_base = sims[:, :-2], sims[:, -2], sims[:, -1]
                floor = class_floor(class_sims, own, real_sim.get(key))
                reasons = drop_reasons(class_sims, own, class_keys, sim_shift, sim_base, shift.caption, rule, floor)
                sim_class = class_sims[:, own].tolist()
                kept = [r is None for r in reasons]
                n = len(images)
                table = pa.table({
                    "class_key": [key] * n,
                    "class_name": [name] * n,
                    "shift": [shift_key] * n,
                    "seed": pa.array([r["seed"] for r in manifest["images"]], pa.int64()),
                    "image_path": [str(folder / r["file"]) for r in manifest["images"]],
                    "sim_class": pa.array(sim_class, pa.float32()),
                    "sim_shift": pa.array(sim_shift.tolist(), pa.float32()),
                    "sim_base": pa.array(sim_base.tolist(), pa.float32()),
                    "zero_shot_class": [class_keys[i] for i in class_sims.argmax(1).tolist()],
                    "sim_class_floor": pa.array([floor] * n, pa.float32()),
                    "kept": kept,
                    "drop_reason": pa.array(reasons, pa.string()),
                    "diffusion_model": [manifest["model"]] * n,
                    "clip_model": [scorer.model_id] * n,
                    "created_at": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
                })
                with atomic_path(storage.scores_file(key, shift_key, baseline)) as tmp:
                    pq.write_table(table, tmp)
                stats.append((key, shift_key, n, _mean(sim_class), _mean(sim_shift.tolist()), sum(kept)))
                for img, rec, c, h, why in zip(images, manifest["images"], sim_class, sim_shift.tolist(), reasons):
                    if why is not None and len(dropped) < DROPPED_PREVIEW:  # a few, with their numbers and reason
                        dropped.append((img, f"{key}/{shift_key} seed {rec['seed']}: sim_class {c:.3f}, "
                                             f"sim_shift {h:.3f}; {why}"))
                context.log.info(f"{key} / {shift_key}: {sum(kept)}/{n} kept, mean sim_class {_mean(sim_class):.3f} "
                                 f"{partition_progress(len(stats), len(pairs))}")
        metadata = {
            "dagster/row_count": sum(s[2] for s in stats),
            "mean_sim_class": _mean([s[3] for s in stats]),
            "mean_sim_shift": _mean([s[4] for s in stats]),
            "kept": sum(s[5] for s in stats),
            "partitions": dg.MetadataValue.md(
                "| class | shift | images | sim_class | sim_shift | kept |\n|---|---|---|---|---|---|\n" + "\n".join(
                    f"| {k} | {s} | {n} | {c:.4f} | {h:.4f} | {kp} |" for k, s, n, c, h, kp in stats[:50])),
            # the images the CLIP filter dropped (the first few), with their scores and reason; all of them
            # are in the `dropped` view of scores.duckdb
            "dropped_images": dg.MetadataValue.md(
                f"{sum(s[2] - s[5] for s in stats)} dropped; the first {len(dropped)}:\n\n"
                + captioned_strip_markdown(dropped) if dropped else "none dropped"),
        }
        if len(stats) == 1:
            metadata["path"] = dg.MetadataValue.path(str(storage.scores_file(*stats[0][:2], baseline)))
            metadata["shift_caption"] = by_key[stats[0][1]].caption
        return dg.MaterializeResult(metadata=metadata)

    return clip_scores


SIM_COLUMNS = ["sim_class", "sim_shift", "sim_base"]
DROPPED_PREVIEW = 8  # dropped images shown in a run's record


def range_check_results(storage: StorageResource, keys: list[str], baseline: bool = False) -> dict:
    """RANGE_CHECK of each partition (`class|shift`), from its Parquet file: {key: (passed, metadata)}."""
    import numpy as np
    import pyarrow.parquet as pq

    out = {}
    for key in keys:
        class_key, shift = key.split("|")
        path = storage.scores_file(class_key, shift, baseline)
        meta = {"path": dg.MetadataValue.path(str(path))}
        try:
            table = pq.read_table(path, columns=SIM_COLUMNS)
        except (OSError, ValueError, KeyError) as exc:  # missing, unreadable, or without the columns
            out[key] = (False, {**meta, "reason": f"cannot read {', '.join(SIM_COLUMNS)} "
                                                  f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})"})
            continue
        # nulls read as NaN: a missing similarity fails the check like a NaN
        values = np.concatenate([table[c].to_numpy().astype("float64") for c in SIM_COLUMNS])
        finite = values[np.isfinite(values)]
        bad = int(values.size - finite.size)
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (float("nan"), float("nan"))
        ok = table.num_rows > 0 and bad == 0 and -1 <= lo and hi <= 1
        reason = ("no rows" if not table.num_rows else f"{bad} NaN, inf or missing values" if bad
                  else f"values in [{lo:.4g}, {hi:.4g}]")
        out[key] = (ok, {**meta, "rows": table.num_rows, "non_finite": bad,
                         **({"min": lo, "max": hi} if finite.size else {}), **({} if ok else {"reason": reason})})
    return out


def build_range_check(partitions_def, baseline: bool = False) -> dg.AssetChecksDefinition:
    """RANGE_CHECK, per class x shift (not blocking)."""
    asset = dg.AssetKey("baseline_scores" if baseline else "clip_scores")
    with partitioned_checks():
        @dg.asset_check(asset=asset, name=RANGE_CHECK, partitions_def=partitions_def,
                        description="Every similarity lies in [-1, 1], with no NaN (read from the Parquet file)")
        def range_check(context: dg.AssetCheckExecutionContext, storage: StorageResource):
            keys = run_partition_keys(context, partitions_def)
            yield from emit(context, asset, RANGE_CHECK, range_check_results(storage, keys, baseline))

    return range_check
