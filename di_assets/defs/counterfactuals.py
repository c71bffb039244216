"""counterfactuals: images of one class in one shift (partitioned by class x shift)."""

import dagster as dg

from di_assets.ml.io import MANIFEST
from di_assets.ml.shifts import Shift

from .checks import by_partition, emit, failed_partitions, name_list, partitioned_checks, run_partition_keys
from .class_token import TOKEN_CHECK
from .executors import gpu_tags
from .progress import ProgressLines
from .partitions import OWNERS, ends_partition, missing_or_changed, partition_pairs
from .resources import InterfaceParams, ModelResource, StorageResource

COUNT_CHECK = "has_expected_image_count"
PREVIEW = "preview.jpg"  # a contact sheet of the partition's first images, beside them
PREVIEW_IMAGES, PREVIEW_SIZE = 8, 128
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
    shift_keys = [s.key for s in shifts]
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
        from di_assets.ml.generate import contact_sheet, generate_many
        from di_assets.ml.io import atomic_dir, atomic_path
        from di_assets.ml.models import portable_base_model
        from di_assets.ml.textual_inversion import EMBEDS_FILE, load_learned_embeds

        work = partition_pairs(context, shift_keys)
        progress = ProgressLines(context.log, len(work))
        if not baseline:  # before any work (and before it holds a GPU)
            refuse_failed_tokens(context.instance, list(dict.fromkeys(c for _, c, _ in work)))
        # On a machine with several GPUs, this step holds one of them until it ends.
        with models.leased_spec() as spec:
            cfg = params.generation_config(spec.family)
            n, seed = params.generation.num_samples, params.generation.seed
            for key in [] if baseline else dict.fromkeys(c for _, c, _ in work):
                # Never generate from a root that predates this class's current token.
                _, learned = load_learned_embeds(storage.token_dir(key) / EMBEDS_FILE)
                if resolve_class(storage.encoder_root, key).embeds_sha != embeds_digest(learned):
                    raise dg.Failure(f"the encoder root holds an older token for class {key!r}; "
                                     "materialize encoder_root, then rerun this partition")
            rows: dict[str, list] = {}  # the partition's preview rows so far (one per shift)
            # Every pair's images, in pipeline batches filled across pairs and partitions (each image from
            # its own seed's generator); each pair's samples arrive as soon as its last image is made.
            jobs = [(key, by_key[shift_key].prompt, range(seed, seed + n)) for _, key, shift_key in work]
            produced = generate_many(storage.encoder_root, jobs, model=spec, config=cfg, use_token=not baseline)
            for i, ((pkey, key, shift_key), samples) in enumerate(zip(work, produced), 1):
                shift = by_key[shift_key]
                out = storage.images_dir(key, shift_key, baseline)
                first = [s.image for s in samples[:PREVIEW_IMAGES]]
                with atomic_dir(out) as tmp:
                    for s in samples:
                        s.image.save(tmp / f"{s.seed}.png")
                    # a small preview beside the images (the record links it: no image bytes in Dagster)
                    contact_sheet([first], col_labels=[f"seed {seed + j}" for j in range(len(first))],
                                  size=PREVIEW_SIZE).save(tmp / PREVIEW, quality=85)
                    (tmp / MANIFEST).write_text(json.dumps({
                        "class": key, "shift": shift_key, "prompt": shift.prompt, "caption": shift.caption,
                        "model": portable_base_model(spec.resolved().diffusion), "settings": cfg.__dict__,
                        "images": [{"seed": s.seed, "file": f"{s.seed}.png", "prompt": s.prompt, "text": s.text}
                                   for s in samples],
                    }, indent=2) + "\n")
                rows.setdefault(pkey, []).append((shift_key, first))
                progress(i, f"{key} / {shift_key}: {n} images")
                if not ends_partition(work, i):
                    continue  # the partition has more shifts to make
                # Each partition's own record, also in a run over many partitions: a few hundred bytes.
                made = rows.pop(pkey)
                meta = {"num_images": n * len(made), "seeds": f"{seed}..{seed + n - 1}"}
                if len(made) == 1:
                    meta.update(path=dg.MetadataValue.path(str(out)), preview=dg.MetadataValue.path(str(out / PREVIEW)),
                                prompt=shift.prompt)
                else:  # the class grain: one sheet of the class, a row per shift
                    sheet = out.parent / PREVIEW
                    with atomic_path(sheet) as tmp:
                        contact_sheet([im for _, im in made], [s for s, _ in made],
                                      [f"seed {seed + j}" for j in range(len(made[0][1]))],
                                      size=PREVIEW_SIZE // 2).save(tmp, format="JPEG", quality=85)
                    meta.update(path=dg.MetadataValue.path(str(out.parent)), preview=dg.MetadataValue.path(str(sheet)),
                                shifts=len(made))
                context.add_asset_metadata(meta, partition_key=pkey)
        if len(context.partition_keys) > 1:
            context.log.info(f"{n * len(work)} images in {len(context.partition_keys)} partitions")
        return dg.MaterializeResult()

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


def count_check_results(storage: StorageResource, keys: list[str], expected: int, baseline: bool = False,
                        shift_keys: list[str] = ()) -> dict:
    """COUNT_CHECK of each partition (`class|shift`, or a class at the class grain), from its
    folders: {key: (passed, metadata)}.

    Passes when the manifest lists `expected` images, each of them is a non-empty file in the
    folder, and the folder holds no other PNG (at the class grain: for every shift).
    """
    import json

    def one(class_key: str, shift: str) -> tuple[bool, dict]:
        folder = storage.images_dir(class_key, shift, baseline)
        meta = {"path": dg.MetadataValue.path(str(folder)), "expected": expected}
        try:
            listed = [r["file"] for r in json.loads((folder / MANIFEST).read_text())["images"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = "no image folder" if not folder.is_dir() else f"unreadable {MANIFEST} ({exc.__class__.__name__})"
            return False, {**meta, "reason": why}
        present = sum(1 for f in listed if (folder / f).is_file() and (folder / f).stat().st_size > 0)
        pngs = sum(1 for _ in folder.glob("*.png"))
        ok = len(listed) == present == pngs == expected
        return ok, {**meta, "listed": len(listed), "present": present, "png_files": pngs,
                    **({} if ok else {"reason": f"{MANIFEST} lists {len(listed)} images, {present} of them "
                                                f"present, {pngs} PNG files; expected {expected}"})}

    return by_partition(keys, shift_keys, one)


def build_count_check(partitions_def, baseline: bool = False, shift_keys: list[str] = ()) -> dg.AssetChecksDefinition:
    """COUNT_CHECK, per partition and blocking (the partition's scores wait for it)."""
    asset = dg.AssetKey(BASELINE if baseline else "counterfactuals")
    with partitioned_checks():
        @dg.asset_check(asset=asset, name=COUNT_CHECK, blocking=True, partitions_def=partitions_def,
                        description="Every partition holds as many images as were asked for, each listed in "
                                    "its manifest (read from the image folder)")
        def count_check(context: dg.AssetCheckExecutionContext, storage: StorageResource, params: InterfaceParams):
            keys = run_partition_keys(context, partitions_def)
            yield from emit(context, asset, COUNT_CHECK, count_check_results(
                storage, keys, params.generation.num_samples, baseline, list(shift_keys)), blocking=True)

    return count_check
