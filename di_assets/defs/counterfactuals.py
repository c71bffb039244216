"""counterfactuals: images of one class in one shift (partitioned by class x shift)."""

import dagster as dg

from di_assets.ml.io import MANIFEST
from di_assets.ml.shifts import Shift

from .checks import emit, failed_partitions, name_list, partitioned_checks, run_partition_keys
from .class_token import TOKEN_CHECK
from .executors import gpu_tags
from .progress import partition_progress
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
    newer than the encoder root, so the images always come from a root that holds that token,
    and until the class's token passed its blocking check (TOKEN_CHECK, partition by partition:
    a class whose token failed waits, the others run).
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
        & AC.all_deps_blocking_checks_passed()
    ).with_label("token changed and checked, encoder root caught up")


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
        # Its check (COUNT_CHECK, build_count_check) runs after it in the same run, per partition.
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

        if not baseline:  # before any work (and before it holds a GPU)
            refuse_failed_tokens(context.instance, list(dict.fromkeys(k for k, _ in class_and_shift_keys(context))))
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
                context.log.info(f"{key} / {shift_key}: {n} images {partition_progress(i, len(pairs))}")
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(storage.images_dir(*pairs[0], baseline) if len(pairs) == 1
                                                  else storage.root)),
                "prompt": by_key[pairs[0][1]].prompt if len(pairs) == 1 else f"{len(pairs)} partitions",
                "num_images": sum(counts),
                "thumbnails": dg.MetadataValue.md(image_grid_markdown(grid, labels, [f"seed {seed + j}" for j in range(min(n, 6))])),
            },
        )

    return counterfactuals


def refuse_failed_tokens(instance: dg.DagsterInstance, class_keys: list[str]) -> None:
    """Fail before any work if a class's current token failed its check (TOKEN_CHECK).

    Automation never asks for such a class; this stops a run launched by hand (UI, CLI). A run over
    a range cannot leave some of its partitions out, so the whole run stops, naming the classes.
    """
    blocked = failed_partitions(instance, dg.AssetCheckKey(CLASS_TOKEN, TOKEN_CHECK), class_keys)
    if blocked:
        others = [k for k in class_keys if k not in blocked]
        raise dg.Failure(
            f"the token of class {name_list(blocked)} failed its blocking check {TOKEN_CHECK}; no counterfactuals "
            "are made from it. Retrain the token (materialize class_token for the class) or fix it and execute "
            "the check again" + (f"; run the other classes ({len(others)}) without it" if others else ""),
            metadata={"blocked_classes": name_list(blocked), "blocked_count": len(blocked)})


def count_check_results(storage: StorageResource, keys: list[str], expected: int, baseline: bool = False) -> dict:
    """COUNT_CHECK of each partition (`class|shift`), from its folder: {key: (passed, metadata)}.

    Passes when the manifest lists `expected` images, each of them is a non-empty file in the
    folder, and the folder holds no other PNG.
    """
    import json

    out = {}
    for key in keys:
        class_key, shift = key.split("|")
        folder = storage.images_dir(class_key, shift, baseline)
        meta = {"path": dg.MetadataValue.path(str(folder)), "expected": expected}
        try:
            listed = [r["file"] for r in json.loads((folder / MANIFEST).read_text())["images"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = "no image folder" if not folder.is_dir() else f"unreadable {MANIFEST} ({exc.__class__.__name__})"
            out[key] = (False, {**meta, "reason": why})
            continue
        present = sum(1 for f in listed if (folder / f).is_file() and (folder / f).stat().st_size > 0)
        pngs = sum(1 for _ in folder.glob("*.png"))
        ok = len(listed) == present == pngs == expected
        out[key] = (ok, {**meta, "listed": len(listed), "present": present, "png_files": pngs,
                         **({} if ok else {"reason": f"{MANIFEST} lists {len(listed)} images, {present} of them "
                                                     f"present, {pngs} PNG files; expected {expected}"})})
    return out


def build_count_check(partitions_def, baseline: bool = False) -> dg.AssetChecksDefinition:
    """COUNT_CHECK, per class x shift and blocking (the partition's scores wait for it)."""
    asset = dg.AssetKey(BASELINE if baseline else "counterfactuals")
    with partitioned_checks():
        @dg.asset_check(asset=asset, name=COUNT_CHECK, blocking=True, partitions_def=partitions_def,
                        description="Every partition holds as many images as were asked for, each listed in "
                                    "its manifest (read from the image folder)")
        def count_check(context: dg.AssetCheckExecutionContext, storage: StorageResource, params: InterfaceParams):
            keys = run_partition_keys(context, partitions_def)
            yield from emit(context, asset, COUNT_CHECK,
                            count_check_results(storage, keys, params.generation.num_samples, baseline), blocking=True)

    return count_check
