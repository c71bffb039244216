"""counterfactuals: images of one class in one shift (partitioned by class x shift)."""

import dagster as dg

from di_assets.ml.shifts import Shift

from .encoder_root import encoder_root
from .metadata import image_grid_markdown
from .partitions import class_and_shift
from .resources import InterfaceParams, ModelResource, StorageResource

COUNT_CHECK = "has_expected_image_count"
MANIFEST = "manifest.json"


def build_counterfactuals(shifts: list[Shift], partitions_def: dg.MultiPartitionsDefinition) -> dg.AssetsDefinition:
    by_key = {s.key: s for s in shifts}

    @dg.asset(
        partitions_def=partitions_def,
        deps=[encoder_root],
        group_name="counterfactuals",
        code_version="generation-v1",
        pool="gpu",
        kinds={"pytorch", "png"},
        check_specs=[dg.AssetCheckSpec(COUNT_CHECK, asset="counterfactuals",
                                       description="The partition holds as many images as were asked for")],
        description="Generated images: images/<class>/<shift>/<seed>.png and a manifest.json",
    )
    def counterfactuals(
        context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource, params: InterfaceParams
    ) -> dg.MaterializeResult:
        import json

        from di_assets.ml.generate import generate_samples
        from di_assets.ml.io import atomic_dir

        key, shift_key = class_and_shift(context)
        shift = by_key[shift_key]
        spec = models.spec()
        cfg = params.generation_config(spec.family)
        n, seed = params.generation.num_samples, params.generation.seed
        samples = generate_samples(
            storage.encoder_root, key, shift.prompt, seeds=range(seed, seed + n), model=spec, config=cfg,
            progress=lambda done, total: context.log.info(f"{key} / {shift_key}: {done}/{total} images"),
        )
        out = storage.images_dir(key, shift_key)
        with atomic_dir(out) as tmp:
            records = []
            for s in samples:
                s.image.save(tmp / f"{s.seed}.png")
                records.append({"seed": s.seed, "file": f"{s.seed}.png", "prompt": s.prompt, "text": s.text})
            (tmp / MANIFEST).write_text(json.dumps({
                "class": key, "shift": shift_key, "prompt": shift.prompt, "caption": shift.caption,
                "model": spec.resolved().diffusion, "settings": cfg.__dict__, "images": records,
            }, indent=2) + "\n")
        written = len(list(out.glob("*.png")))
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(out)),
                "prompt": shift.prompt,
                "num_images": written,
                "thumbnails": dg.MetadataValue.md(
                    image_grid_markdown([s.image for s in samples[:8]], [f"seed {s.seed}" for s in samples[:8]])
                ),
            },
            check_results=[dg.AssetCheckResult(check_name=COUNT_CHECK, passed=written == n,
                                               metadata={"expected": n, "found": written})],
        )

    return counterfactuals
