"""clip_scores: CLIP similarity of each counterfactual to its class and shift captions."""

import dagster as dg

from di_assets.ml.shifts import Shift, class_caption

from .checks import by_partition, emit, partitioned_checks, run_partition_keys
from .executors import gpu_tags
from .progress import ProgressLines
from .metadata import table_schema
from .partitions import OWNERS, ends_partition, grain_of, partition_pairs
from .resources import InterfaceParams, ModelResource, StorageResource

RANGE_CHECK = "scores_in_range"
# The columns of every score file (and of the `scores` view), as the UI's Columns section shows them.
SCORE_COLUMNS = [
    ("class_key", "string", "Class partition key"),
    ("class_name", "string", "Class display name, as in the captions"),
    ("shift", "string", "Shift key"),
    ("seed", "int", "Seed of the image"),
    ("image_path", "string", "The image file, relative to the storage root (`images/<class>/<shift>/<seed>.png`)"),
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
    shift_keys = [s.key for s in shifts]
    asset_name = "baseline_scores" if baseline else "clip_scores"
    where = "baseline/scores" if baseline else "scores"
    # At the class grain a partition's scores are one file of all its shifts: 1,000 files at 1,000
    # classes instead of 24,000 for every reader to list (ml.score_rows.score_glob).
    by_class = grain_of(partitions_def) == "class"

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
        description=f"Scores in Hive layout: `{where}/class=<c>/{'' if by_class else 'shift=<s>/'}part.parquet`",
    )
    def clip_scores(
        context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource, params: InterfaceParams
    ) -> dg.MaterializeResult:
        from datetime import datetime, timezone

        import pyarrow as pa

        from di_assets.ml.clip_metric import BASE_CAPTION, class_floor, drop_reasons, get_scorer
        from di_assets.ml.io import atomic_path, load_class_images, read_counterfactuals

        classes = storage.classes()  # once per run: every class caption takes part in the zero-shot filter
        class_keys = list(classes)
        index = {k: i for i, k in enumerate(class_keys)}
        captions = [class_caption(c.name) for c in classes.values()]
        work = partition_pairs(context, shift_keys)
        progress = ProgressLines(context.log, len(work))
        # On a machine with several GPUs, this step holds one of them until it ends.
        with models.leased_spec() as spec:
            scorer = get_scorer(spec)
            rule = params.scoring.rule()
            stats, real_sim, acc = [], {}, {}
            if rule.calibrated:  # what a match looks like for this model: the class's real images, once per run
                for key in dict.fromkeys(c for _, c, _ in work):
                    if key in classes:
                        real = load_class_images(classes[key].path, limit=params.scoring.real_images)
                        real_sim[key] = scorer.similarity(real, [captions[index[key]]])[:, 0].median().item()
            for pkey, key, shift_key in work:
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
                    "image_path": [(folder / r["file"]).relative_to(storage.root).as_posix() for r in manifest["images"]],
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
                part = acc.setdefault(pkey, {"n": 0, "kept": 0, "sim_class": [], "sim_shift": [], "drops": [],
                                             "shifts": [], "tables": []})
                if by_class:  # written when the class's last shift is scored
                    part["tables"].append(table)
                else:
                    write_scores(storage.scores_file(key, shift_key, baseline), [table])
                stats.append((n, sum(kept)))
                part["n"] += n
                part["kept"] += sum(kept)
                part["sim_class"] += sim_class
                part["sim_shift"] += sim_shift.tolist()
                part["shifts"].append(shift_key)
                part["drops"] += [(img, f"{shift_key} seed {rec['seed']}: sim_class {c:.3f}, sim_shift {h:.3f}; {why}")
                                  for img, rec, c, h, why in zip(images, manifest["images"], sim_class,
                                                                 sim_shift.tolist(), reasons)
                                  if why is not None][:DROPPED_PREVIEW - len(part["drops"])]
                part["dropped"] = part.get("dropped", 0) + n - sum(kept)
                progress(len(stats), f"{key} / {shift_key}: {sum(kept)}/{n} kept, mean sim_class {_mean(sim_class):.3f}")
                if not ends_partition(work, len(stats)):
                    continue  # the partition has more shifts to score
                # Each partition's own record, also in a run over many partitions: its numbers (the UI's
                # Plots tab draws them per partition) and a file of its dropped images, linked.
                part = acc.pop(pkey)
                where = storage.scores_file(key, None if by_class else shift_key, baseline)
                if by_class:
                    write_scores(where, part["tables"])
                meta = {
                    "dagster/row_count": part["n"], "mean_sim_class": _mean(part["sim_class"]),
                    "mean_sim_shift": _mean(part["sim_shift"]), "kept": part["kept"],
                    "kept_fraction": part["kept"] / part["n"] if part["n"] else float("nan"),
                    "dropped": part["dropped"], "path": dg.MetadataValue.path(str(where)),
                    **({"shift_caption": shift.caption} if len(part["shifts"]) == 1 else {"shifts": len(part["shifts"])}),
                }
                if part["drops"]:
                    sheet = where.parent / DROPPED_SHEET
                    with atomic_path(sheet) as tmp:
                        dropped_sheet(part["drops"]).save(tmp, format="JPEG", quality=85)
                    meta["dropped_preview"] = dg.MetadataValue.path(str(sheet))
                    meta["dropped_reasons"] = "; ".join(c for _, c in part["drops"][:3])[:500]
                context.add_asset_metadata(meta, partition_key=pkey)
        if len(context.partition_keys) > 1:  # the run's summary goes to its log; scores_db holds the totals
            context.log.info(f"{sum(k for _, k in stats)} of {sum(n for n, _ in stats)} images kept "
                             f"in {len(context.partition_keys)} partitions")
        return dg.MaterializeResult()

    return clip_scores


def write_scores(path, tables) -> None:
    """A score file (atomically) from the tables of its pairs. Then the class's files of the other
    grain's layout go (`class=<c>/part.parquet` beside `class=<c>/shift=<s>/part.parquet`): after the
    grain changed they are stale, and the views and readers take either layout of a class."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from di_assets.ml.io import atomic_path
    from di_assets.ml.score_rows import merge_shift_files

    with atomic_path(path) as tmp:
        pq.write_table(pa.concat_tables(tables), tmp)
    if path.parent.name.startswith("shift="):
        (path.parent.parent / "part.parquet").unlink(missing_ok=True)
    else:
        merge_shift_files(path.parent)  # with the class's file there: removes the per-shift files


SIM_COLUMNS = ["sim_class", "sim_shift", "sim_base"]
DROPPED_PREVIEW = 8  # dropped images in a partition's preview file
DROPPED_SHEET = "dropped.jpg"  # beside the partition's part.parquet


def dropped_sheet(items):
    """A picture of a partition's dropped images, each under its seed, scores and reason."""
    import textwrap

    from PIL import Image, ImageDraw

    size, line, width = 128, 12, 44  # characters per caption line at Pillow's default font
    captions = [textwrap.wrap(c, width, break_on_hyphens=False)[:9] for _, c in items]
    sheet = Image.new("RGB", (size + 16 + 6 * width, (size + 8) * len(items)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((image, _), lines) in enumerate(zip(items, captions)):
        y = i * (size + 8)
        sheet.paste(image.convert("RGB").resize((size, size)), (4, y + 4))
        for k, text in enumerate(lines):
            draw.text((size + 8, y + 4 + k * line), text, fill="black")
    return sheet


def range_check_results(storage: StorageResource, keys: list[str], baseline: bool = False,
                        shift_keys: list[str] = ()) -> dict:
    """RANGE_CHECK of each partition (`class|shift`, or a class at the class grain), from its
    Parquet files: {key: (passed, metadata)}."""
    import functools

    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    by_class = any("|" not in k for k in keys)  # the class grain: a class's file holds all its shifts

    @functools.cache
    def class_file(path):  # at the class grain, read once for all its shifts: (table, None) or (None, error)
        try:
            return pq.read_table(path, columns=["shift", *SIM_COLUMNS]), None
        except (OSError, ValueError, KeyError) as exc:
            return None, exc

    def one(class_key: str, shift: str) -> tuple[bool, dict]:
        path = storage.scores_file(class_key, None if by_class else shift, baseline)
        meta = {"path": dg.MetadataValue.path(str(path))}
        try:
            if by_class:
                whole, error = class_file(path)
                if error is not None:
                    raise error
                table = whole.filter(pc.equal(whole["shift"], shift)).select(SIM_COLUMNS)
            else:
                table = pq.read_table(path, columns=SIM_COLUMNS)
        except (OSError, ValueError, KeyError) as exc:  # missing, unreadable, or without the columns
            return False, {**meta, "reason": f"cannot read {', '.join(SIM_COLUMNS)} "
                                             f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})"}
        # nulls read as NaN: a missing similarity fails the check like a NaN
        values = np.concatenate([table[c].to_numpy().astype("float64") for c in SIM_COLUMNS])
        finite = values[np.isfinite(values)]
        bad = int(values.size - finite.size)
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (float("nan"), float("nan"))
        ok = table.num_rows > 0 and bad == 0 and -1 <= lo and hi <= 1
        reason = ("no rows" if not table.num_rows else f"{bad} NaN, inf or missing values" if bad
                  else f"values in [{lo:.4g}, {hi:.4g}]")
        return ok, {**meta, "rows": table.num_rows, "non_finite": bad,
                    **({"min": lo, "max": hi} if finite.size else {}), **({} if ok else {"reason": reason})}

    return by_partition(keys, shift_keys, one)


def build_range_check(partitions_def, baseline: bool = False, shift_keys: list[str] = ()) -> dg.AssetChecksDefinition:
    """RANGE_CHECK, per partition (not blocking)."""
    asset = dg.AssetKey("baseline_scores" if baseline else "clip_scores")
    with partitioned_checks():
        @dg.asset_check(asset=asset, name=RANGE_CHECK, partitions_def=partitions_def,
                        description="Every similarity lies in [-1, 1], with no NaN (read from the Parquet file)")
        def range_check(context: dg.AssetCheckExecutionContext, storage: StorageResource):
            keys = run_partition_keys(context, partitions_def)
            yield from emit(context, asset, RANGE_CHECK, range_check_results(storage, keys, baseline, list(shift_keys)))

    return range_check
