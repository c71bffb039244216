"""clip_scores: CLIP similarity of each counterfactual to its class and shift captions."""

import dagster as dg

from di_assets.ml.shifts import Shift

from .counterfactuals import MANIFEST
from .partitions import class_and_shift
from .resources import InterfaceParams, ModelResource, StorageResource

RANGE_CHECK = "scores_in_range"


def class_caption(name: str) -> str:
    return f"a photo of a {name}"


def build_clip_scores(shifts: list[Shift], partitions_def: dg.MultiPartitionsDefinition) -> dg.AssetsDefinition:
    by_key = {s.key: s for s in shifts}

    @dg.asset(
        partitions_def=partitions_def,
        deps=[dg.AssetKey("counterfactuals")],
        group_name="metrics",
        code_version="clip-metric-v1",
        pool="gpu",
        kinds={"pytorch", "parquet"},
        check_specs=[dg.AssetCheckSpec(RANGE_CHECK, asset="clip_scores",
                                       description="Every similarity lies in [-1, 1], with no NaN")],
        description="Scores in Hive layout: scores/class=<c>/shift=<s>/part.parquet",
    )
    def clip_scores(
        context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource, params: InterfaceParams
    ) -> dg.MaterializeResult:
        import json
        from datetime import datetime, timezone

        import pyarrow as pa
        import pyarrow.parquet as pq
        from PIL import Image

        from di_assets.ml.clip_metric import get_scorer
        from di_assets.ml.io import atomic_path

        key, shift_key = class_and_shift(context)
        shift = by_key[shift_key]
        folder = storage.images_dir(key, shift_key)
        manifest = json.loads((folder / MANIFEST).read_text())
        name = storage.class_folder(key).name
        images = []
        for rec in manifest["images"]:
            with Image.open(folder / rec["file"]) as im:
                images.append(im.convert("RGB"))
        scorer = get_scorer(models.spec())
        sims = scorer.similarity(images, [class_caption(name), shift.caption])
        sim_class, sim_shift = sims[:, 0].tolist(), sims[:, 1].tolist()
        sp = params.scoring
        kept = [c >= sp.min_sim_class and s >= sp.min_sim_shift for c, s in zip(sim_class, sim_shift)]
        n = len(images)
        table = pa.table({
            "class_key": [key] * n,
            "class_name": [name] * n,
            "shift": [shift_key] * n,
            "seed": pa.array([r["seed"] for r in manifest["images"]], pa.int64()),
            "image_path": [str(folder / r["file"]) for r in manifest["images"]],
            "sim_class": pa.array(sim_class, pa.float32()),
            "sim_shift": pa.array(sim_shift, pa.float32()),
            "kept": kept,
            "diffusion_model": [manifest["model"]] * n,
            "clip_model": [scorer.model_id] * n,
            "created_at": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
        })
        with atomic_path(storage.scores_file(key, shift_key)) as tmp:
            pq.write_table(table, tmp)
        finite = bool(sims.isfinite().all())
        in_range = finite and bool(((sims >= -1) & (sims <= 1)).all())
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(storage.scores_file(key, shift_key))),
                "dagster/row_count": n,
                "mean_sim_class": mean(sim_class),
                "mean_sim_shift": mean(sim_shift),
                "kept": sum(kept),
                "class_caption": class_caption(name),
                "shift_caption": shift.caption,
            },
            check_results=[dg.AssetCheckResult(check_name=RANGE_CHECK, passed=in_range,
                                               metadata={"min": float(sims.min()) if n else 0.0,
                                                         "max": float(sims.max()) if n else 0.0})],
        )

    return clip_scores
