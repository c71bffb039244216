"""counterfactuals: images of one class in one shift (partitioned by class x shift)."""

import dagster as dg

from di_assets.ml.io import MANIFEST
from di_assets.ml.shifts import Shift

from .executors import gpu_tags
from .metadata import image_grid_markdown
from .partitions import OWNERS, class_and_shift_keys, missing_or_changed
from .resources import InterfaceParams, ModelResource, StorageResource

COUNT_CHECK = "has_expected_image_count"
ENCODER_ROOT = dg.AssetKey("encoder_root")
CLASS_TOKEN = dg.AssetKey("class_token")


def after_class_change() -> dg.AutomationCondition:
    """Run a class's partitions when they are missing or its token changed, once the root has it.

    The encoder root is rebuilt whenever any class changes; that alone must not rerun every
    class, so only the partition's own class token triggers it. It waits while the token is
    newer than the encoder root, so the images always come from a root that holds that token.
    """
    AC = dg.AutomationCondition
    token_updated = AC.any_deps_updated().allow(dg.AssetSelection.assets(CLASS_TOKEN))
    root_updated = AC.any_deps_updated().allow(dg.AssetSelection.assets(ENCODER_ROOT))
    return (
        (AC.newly_missing() | token_updated).since_last_handled()
        & ~token_updated.since(root_updated)
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("token changed, encoder root caught up")


BASELINE = "baseline_counterfactuals"


def build_counterfactuals(shifts: list[Shift], partitions_def, code_version: str,
                          baseline: bool = False) -> dg.AssetsDefinition:
    """The counterfactuals; with `baseline`, the paper's class-name baseline (`use_token=False`):
    the same prompts and seeds with the class name in place of the token, under `baseline/`."""
    by_key = {s.key: s for s in shifts}
    name = BASELINE if baseline else "counterfactuals"
    where = "baseline/images" if baseline else "images"

    @dg.asset(
        name=name,
        partitions_def=partitions_def,
        # Dagster maps a class x shift partition to its class's token partition by itself. The
        # baseline needs no token: it is made once per class, from the encoder root's base model.
        deps=[ENCODER_ROOT] if baseline else [CLASS_TOKEN, ENCODER_ROOT],
        group_name="counterfactuals",
        owners=OWNERS,
        code_version=code_version,
        pool="gpu",
        op_tags=gpu_tags(),  # dagster-k8s: a pod with a GPU, on GPU nodes
        kinds={"pytorch", "png"},
        automation_condition=missing_or_changed(deps_updated=False) if baseline else after_class_change(),
        backfill_policy=dg.BackfillPolicy.single_run(),
        check_specs=[dg.AssetCheckSpec(COUNT_CHECK, asset=name,
                                       description="Every partition holds as many images as were asked for")],
        description=(f"Generated images: `{where}/<class>/<shift>/<seed>.png` and a `manifest.json`"
                     + (", with the class name in place of the token (the paper's baseline)" if baseline else "")),
    )
    def counterfactuals(
        context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource, params: InterfaceParams
    ) -> dg.MaterializeResult:
        import json

        from di_assets.ml.encoder_root import embeds_digest, resolve_class
        from di_assets.ml.generate import generate_samples
        from di_assets.ml.io import atomic_dir
        from di_assets.ml.models import portable_base_model
        from di_assets.ml.textual_inversion import EMBEDS_FILE, load_learned_embeds

        # On a machine with several GPUs, this step holds one of them until it ends.
        with models.leased_spec() as spec:
            cfg = params.generation_config(spec.family)
            n, seed = params.generation.num_samples, params.generation.seed
            pairs = class_and_shift_keys(context)
            for key in [] if baseline else dict.fromkeys(k for k, _ in pairs):
                # Never generate from a root that predates this class's current token.
                _, learned = load_learned_embeds(storage.token_dir(key) / EMBEDS_FILE)
                if resolve_class(storage.encoder_root, key).embeds_sha != embeds_digest(learned):
                    raise dg.Failure(f"the encoder root holds an older token for class {key!r}; "
                                     "materialize encoder_root, then rerun this partition")
            grid, labels, counts = [], [], []
            for i, (key, shift_key) in enumerate(pairs, 1):
                shift = by_key[shift_key]
                samples = generate_samples(storage.encoder_root, key, shift.prompt, seeds=range(seed, seed + n),
                                           model=spec, config=cfg, use_token=not baseline)
                out = storage.images_dir(key, shift_key, baseline)
                with atomic_dir(out) as tmp:
                    for s in samples:
                        s.image.save(tmp / f"{s.seed}.png")
                    (tmp / MANIFEST).write_text(json.dumps({
                        "class": key, "shift": shift_key, "prompt": shift.prompt, "caption": shift.caption,
                        "model": portable_base_model(spec.resolved().diffusion), "settings": cfg.__dict__,
                        "images": [{"seed": s.seed, "file": f"{s.seed}.png", "prompt": s.prompt, "text": s.text}
                                   for s in samples],
                    }, indent=2) + "\n")
                counts.append(len(list(out.glob("*.png"))))
                if len(grid) < 24:  # a preview, not the whole backfill
                    grid.append([s.image for s in samples[:6]])
                    labels.append(f"{key} / {shift_key}")
                context.log.info(f"{key} / {shift_key}: {n} images ({i}/{len(pairs)} partitions)")
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(storage.images_dir(*pairs[0], baseline) if len(pairs) == 1
                                                  else storage.root)),
                "prompt": by_key[pairs[0][1]].prompt if len(pairs) == 1 else f"{len(pairs)} partitions",
                "num_images": sum(counts),
                "thumbnails": dg.MetadataValue.md(image_grid_markdown(grid, labels, [f"seed {seed + j}" for j in range(min(n, 6))])),
            },
            check_results=[dg.AssetCheckResult(check_name=COUNT_CHECK, passed=all(c == n for c in counts),
                                               metadata={"expected_per_partition": n, "partitions": len(counts),
                                                         "short_partitions": sum(c != n for c in counts)})],
        )

    return counterfactuals
