"""The `di-assets` command: run the whole flow, query the scores, write the diagnosis report, import
ImageNet* tokens, export encoder roots in the paper's format."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path


def _settings(args):
    """The settings file with the command's flags, checked whole (a one-line error names the setting).

    For `run` and `update`, also everything they read before any work starts (`_preflight`)."""
    from di_assets.settings import Settings

    if getattr(args, "checked_settings", None) is not None:  # checked once per command
        return args.checked_settings
    overrides = {"dataset": getattr(args, "dataset", None), "storage": getattr(args, "storage", None)}
    settings = Settings.load(args.config, **overrides)
    flags = []
    if getattr(args, "family", None):
        settings.models = {**settings.models, "family": args.family}
        flags.append(f"--family {args.family}")
    if getattr(args, "device", None):
        settings.models = {**settings.models, "device": args.device}
        flags.append(f"--device {args.device}")
    if getattr(args, "shifts", None):
        settings.shifts = [s.strip() for s in args.shifts.split(",") if s.strip()]
        flags.append(f"--shifts {args.shifts}")
    if getattr(args, "num_samples", None) is not None:
        settings.generation = {**settings.generation, "num_samples": args.num_samples}
        flags.append(f"--num-samples {args.num_samples}")
    if flags:  # the file passed on its own: a problem now is the flags'
        settings.source = f"{settings.source or 'settings'} with {' '.join(flags)}"
        settings.validate()
    if getattr(args, "command", None) in ("run", "update"):
        _preflight(settings)
    args.checked_settings = settings
    return settings


SETTINGS_TAG = "di_assets/settings"


def _settings_tag(settings) -> dict:
    """The run tag that records the resolved settings (every family default filled in), as JSON."""
    import json

    from di_assets.defs.resources import resolved_settings

    return {SETTINGS_TAG: json.dumps(resolved_settings(settings), sort_keys=True)}


def _instance(storage: Path):
    """The Dagster instance: $DAGSTER_HOME if set, else one kept beside the artifacts."""
    from di_assets.defs.instance import open_instance

    return open_instance(storage)


def _print_table(columns, rows, out=None, indent: str = ""):
    out = out or sys.stdout
    cells = [[("%.4f" % v) if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print(indent + "  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=out)
    print(indent + "  ".join("-" * w for w in widths), file=out)
    for r in cells:
        print(indent + "  ".join(v.ljust(w) for v, w in zip(r, widths)), file=out)


def _one_at_a_time(command):
    """One `run` or `update` per storage root at a time: a second one waits for the first to end."""
    import functools

    @functools.wraps(command)
    def locked(args) -> int:
        from di_assets.defs.instance import storage_lock

        from di_assets.ml.observe import shared_listings

        with shared_listings():  # the preflight's listing of each class folder serves the observation
            settings = _settings(args)  # bad settings fail before anything is written
            with storage_lock(Path(settings.storage)):
                return command(args)

    return locked


@_one_at_a_time
def cmd_run(args) -> int:
    import dagster as dg

    from di_assets.defs import CLASSES, build_defs
    from di_assets.defs.checks import name_list
    from di_assets.defs.driver import LocalDriver
    from di_assets.defs.instance import run_tags
    from di_assets.defs.progress import run_loggers
    from di_assets.ml.shifts import select_shifts

    settings = _settings(args)  # checked, with the models, classifier files and class folders it names
    storage = Path(settings.storage)
    shifts = [s.key for s in select_shifts(settings.shifts)]
    defs = build_defs(settings)
    instance = _instance(storage)
    job = defs.resolve_implicit_global_asset_job_def()
    # Dagster's own event log stays in the instance (and the UI). The terminal shows a bar per stage and
    # our summary lines; every line of the runs goes to the log file (and, with --verbose, the terminal).
    log_file = storage / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    settings_tag = _settings_tag(settings)  # each run records the settings it used, defaults filled in
    if not args.verbose:  # the sensor's own lines (new classes, ...): the command says it in its own words
        logging.getLogger("dagster").setLevel(logging.WARNING)
    t0 = time.time()

    def step(label, selection, partitions=1, ranges=None):
        """One stage: one run, or one run per range of its partitions (see LocalDriver.ranges)."""
        t = time.time()
        for i, (first, last) in enumerate(ranges or [(None, None)], 1):
            tags = {} if first is None else {"dagster/asset_partition_range_start": first,
                                              "dagster/asset_partition_range_end": last}
            part = f"{label} [{i}/{len(ranges)}]" if ranges and len(ranges) > 1 else label
            size = partitions if not ranges or len(ranges) == 1 else _range_size(selection[0], first, last)
            try:
                job.execute_in_process(
                    instance=instance, tags={**run_tags(), **settings_tag, **tags},
                    run_config=run_loggers(log_file, args.verbose, part.split(":")[0], size, args.log_level),
                    asset_selection=[s if isinstance(s, dg.AssetKey) else dg.AssetKey(s) for s in selection])
            except Exception as exc:  # the stage's own error, in one line; its traceback is in the log file
                cause = getattr(exc, "user_exception", None) or exc
                raise SystemExit(f"error: {label.split(':')[0]} failed: {str(cause).strip().splitlines()[0]} "
                                 f"(the run's log: {log_file})") from None
        runs = f", {len(ranges)} runs" if ranges and len(ranges) > 1 else ""
        print(f"  [{time.time() - t0:6.1f}s] {label} ({time.time() - t:.1f}s{runs})", flush=True)

    def _range_size(asset, first, last) -> int:
        return driver.range_size((asset if isinstance(asset, dg.AssetKey) else dg.AssetKey(asset)).to_user_string(),
                                 first, last)

    def every(asset) -> list[tuple[str, str]]:
        """All partitions of `asset` as few runs, each small enough that Dagster's records of a run stay
        small (a run's planned-check records grow with its partitions squared), models loaded once."""
        key = asset if isinstance(asset, dg.AssetKey) else dg.AssetKey(asset)
        keys = defs.resolve_assets_def(key).partitions_def.get_partition_keys(dynamic_partitions_store=instance)
        return driver.ranges(key.to_user_string(), {str(k) for k in keys})

    driver = LocalDriver(defs, instance, run_loggers(log_file, args.verbose, log_level=args.log_level, bar=False),
                         settings_tag)
    driver.sensor()  # the same sensor as in `dagster dev`: add new class folders, retire removed ones
    classes = instance.get_dynamic_partitions(CLASSES.name)
    if not classes:
        raise SystemExit(f"error: no class folders in {settings.dataset}")
    print(f"dataset  {settings.dataset}: {len(classes)} classes ({name_list(classes)})")  # at most 50 names
    print(f"shifts   {len(shifts)}: {', '.join(shifts)}")
    print(f"models   {settings.models.get('family', 'tiny')}; storage {storage}")
    print(f"log      {log_file} (every line of the runs; --verbose shows them here)")

    driver.observe()
    n, grid = len(classes), len(classes) * len(shifts)
    step(f"class_token: {n} classes", ["class_token"], n, every("class_token"))
    step("encoder_root", ["encoder_root"])
    step(f"counterfactuals + clip_scores: {len(classes)} classes x {len(shifts)} shifts",
         ["counterfactuals", "clip_scores"], grid, every("counterfactuals"))
    if settings.baseline:
        step(f"baseline (class names): {len(classes)} classes x {len(shifts)} shifts",
             ["baseline_counterfactuals", "baseline_scores"], grid, every("baseline_counterfactuals"))
    step("scores_db", ["scores_db"])
    classifiers = [c.name for c in settings.classifier_specs()]
    if classifiers:
        from di_assets.defs.predictions import prediction_key, real_prediction_key

        step(f"real_predictions: {len(classifiers)} classifiers x {len(classes)} classes",
             [real_prediction_key(c) for c in classifiers], n, every(real_prediction_key(classifiers[0])))
        step(f"predictions: {len(classifiers)} classifiers x {len(classes)} classes x {len(shifts)} shifts",
             [prediction_key(c) for c in classifiers], grid, every(prediction_key(classifiers[0])))
        step("diagnosis", ["diagnosis"])
    print(f"\ndone in {time.time() - t0:.1f}s. Results under {storage}:")
    print(f"  tokens        {storage / 'tokens'}/<class>/learned_embeds.safetensors")
    print(f"  encoder root  {storage / 'encoder_root'}")
    print(f"  images        {storage / 'images'}/<class>/<shift>/<seed>.png")
    print(f"  scores        {storage / 'scores'}/class=<c>/" + ("part.parquet" if settings.partition_grain == "class"
                                                                   else "shift=<s>/part.parquet"))
    print(f"  DuckDB        {storage / 'scores.duckdb'} (views: scores, mean_scores, dropped"
          + (", predictions, accuracy, shift_failures, class_failures, real_vs_base)" if classifiers else ")"))
    print(f"  picture       {_write_contact_sheet(storage, classes, shifts)} (first image of each class and shift)")
    if classifiers:
        print(f"  report        {storage / 'diagnosis' / 'report.html'} (charts, heat maps, misclassified images)")
    print("\nmean CLIP similarity per shift and class (sim_class / sim_shift):")
    _print_mean_scores(storage / "scores.duckdb", classes, shifts)
    if settings.baseline:
        print("\nthe token against the class name (the paper's baseline), mean over classes:")
        _query(storage / "scores.duckdb",
               "SELECT shift, avg(token_sim_class) AS token_sim_class, avg(name_sim_class) AS name_sim_class, "
               "avg(token_sim_shift) AS token_sim_shift, avg(name_sim_shift) AS name_sim_shift "
               "FROM token_vs_name GROUP BY shift ORDER BY list_position(?, shift)", [shifts])
    if classifiers:
        _print_diagnosis(storage / "scores.duckdb", shifts)
    return 0


def _print_diagnosis(db: Path, shifts: list[str]) -> None:
    """Per classifier, accuracy per shift on the images the CLIP filter kept, and the drop from base."""
    con = _open_scores_db(db)
    try:
        kept, total, no_shift, no_class = con.execute(
            "SELECT count(*) FILTER (kept), count(*), count(*) FILTER (drop_reason LIKE '%shift not shown%'), "
            "count(*) FILTER (drop_reason LIKE '%zero-shot%' OR drop_reason LIKE '%sim_class%') FROM scores").fetchone()
        print(f"\ndiagnosis: the CLIP filter kept {kept} of {total} images ({no_shift} show no shift, {no_class} "
              "do not look like their class; an image can fail both; see drop_reason in the scores).")
        print("Accuracy on kept images, averaged over classes, and its drop from base with a 95% interval "
              "(* = significant):")
        rows = con.execute(
            "SELECT classifier, shift, accuracy, drop, drop_low, drop_high, significant, classes_dropping, classes "
            "FROM shift_failures ORDER BY classifier, list_position(?, shift)", [shifts]).fetchall()
    finally:
        con.close()
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name]
        worst = sorted((r for r in mine if r[1] != "base"), key=lambda r: -(r[3] or 0))[:5]
        base = next((r for r in mine if r[1] == "base"), None)
        print(f"\n  {name}: base accuracy {base[2]:.3f}" if base else f"\n  {name}:")
        _print_table(["shift", "accuracy", "drop", "95% interval", "classes dropping"], [
            (r[1], f"{r[2]:.3f}", f"{r[3]:+.3f}{' *' if r[6] else ''}", f"[{r[4]:+.3f}, {r[5]:+.3f}]", f"{r[7]}/{r[8]}")
            for r in worst], indent="    ")


def _check_classifier_files(settings) -> None:
    """Every local file a classifier under diagnosis needs exists (nothing is ever downloaded)."""
    for spec in settings.classifier_specs():
        missing = spec.missing_files()
        if missing:
            setting, path = missing[0]
            raise SystemExit(f"error: {setting}: {path} does not exist")


def _preflight(settings) -> None:
    """Before `run` or `update` writes anything: the models, the classifiers' files and the class
    folders are there and readable, so that a missing one is one line now, not a failed stage later."""
    from di_assets.defs.resources import ModelResource
    from di_assets.ml.models import check_model_files

    check_model_files(ModelResource(**settings.models).spec())
    _check_classifier_files(settings)
    _check_class_folders(settings.dataset, settings.storage)


def _check_class_folders(dataset: str, storage: str | None = None) -> None:
    """Each class folder and its files can be read, and it holds an image (the first one that opens:
    cheap next to the content hash that the observation computes of a changed folder). An empty or
    unreadable folder would otherwise fail a stage later, under a page of Dagster's stack.

    A folder is not walked again where its listing is the one the observation memo of `storage`
    recorded (the same files, byte for byte and mode for mode) and the observation then read and
    decoded every top-level file as an image, skipping none. So an update walks only new and changed
    folders (at ImageNet-1k, 1,000 folders of 1,300 images each), and the listing serves the
    observation too (shared_listings)."""
    from di_assets.ml.classes import discover_classes
    from di_assets.ml.observe import ObservationMemo

    memo = ObservationMemo(storage) if storage else None

    def refused(exc: OSError):
        if isinstance(exc, PermissionError):
            what = "class folder" if Path(exc.filename) == c.path else f"folder in class {c.name!r}:"
            raise PermissionError(f"{what} {exc.filename} cannot be read (permission denied); "
                                  "make it readable (chmod -R u+rX) or remove it") from None
        raise exc

    for c in discover_classes(dataset):
        known = memo.unchanged(c.key, c.path) if memo is not None else None
        if known is not None and known["images"] and not known["skipped"]:
            continue  # each of its images decoded when the observation read them; none was skipped
        has_image = False
        for root, dirs, files in os.walk(c.path, onerror=refused):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden entries are not hashed
            files = [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
            for path in files:
                if not os.access(path, os.R_OK):
                    raise PermissionError(f"{path} cannot be read (permission denied); make it readable "
                                          "(chmod u+r) or remove it")
            if Path(root) == c.path:  # the class's images are its top-level files
                has_image = any(_opens_as_image(f) for f in files)
        if not has_image:
            raise ValueError(f"class folder {c.path} has no readable images; add .jpg/.png files or "
                             "remove the folder")


def _opens_as_image(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path):  # the header only
            return True
    except PermissionError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _one_line(exc: BaseException) -> str:
    """An error the user can fix, as one line: a pydantic error's first problem, a YAML error's
    place, else the message's first line."""
    import yaml
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        what = err["msg"].removeprefix("Input ")
        return f"{'.'.join(str(p) for p in (exc.title, *err['loc']))}: {what}, got {err.get('input')!r}"
    if isinstance(exc, yaml.YAMLError):
        from di_assets.settings import _yaml_problem

        return f"not valid YAML: {_yaml_problem(exc)}"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _write_contact_sheet(storage: Path, classes: list[str], shifts: list[str]) -> Path:
    """A class per row, a shift per column: the first counterfactual of each pair."""
    from di_assets.ml.generate import contact_sheet
    from di_assets.ml.io import atomic_path, open_rgb

    rows = [[open_rgb(min((storage / "images" / c / s).glob("*.png"), key=lambda p: int(p.stem))) for s in shifts]
            for c in classes]
    out = storage / "counterfactuals.png"
    with atomic_path(out) as tmp:
        contact_sheet(rows, classes, shifts).save(tmp, format="PNG")
    return out


def _print_mean_scores(db: Path, classes: list[str], shifts: list[str]) -> None:
    """Mean scores, a shift per row and a class per column (keys are query parameters, never SQL)."""
    con = _open_scores_db(db)
    try:
        cells = {(shift, key): f"{c:.3f} / {s:.3f}" for shift, key, c, s in con.execute(
            "SELECT shift, class_key, mean_sim_class, mean_sim_shift FROM mean_scores "
            "WHERE list_contains(?, class_key) AND list_contains(?, shift)", [classes, shifts]).fetchall()}
    finally:
        con.close()
    _print_table(["shift", *classes], [[s, *(cells.get((s, k), "") for k in classes)] for s in shifts])


@_one_at_a_time
def cmd_update(args) -> int:
    """Rerun only what changed since the last update: new, changed and removed classes."""
    from dagster_shared.serdes import deserialize_value, serialize_value

    from di_assets.defs import build_defs
    from di_assets.defs.driver import LocalDriver
    from di_assets.defs.progress import run_loggers

    settings = _settings(args)
    storage = Path(settings.storage)
    if args.full:  # the observation reads it (di_assets.ml.observe), in this process
        from di_assets.ml.observe import FULL_ENV

        os.environ[FULL_ENV] = "1"
    log_file = storage / "logs" / f"update-{time.strftime('%Y%m%d-%H%M%S')}.log"
    driver = LocalDriver(build_defs(settings), _instance(storage),
                         run_loggers(log_file, args.verbose, log_level=args.log_level, bar=False),
                         _settings_tag(settings))
    cursor_file = storage / ".automation_cursor"
    if cursor_file.exists():
        driver.cursor = deserialize_value(cursor_file.read_text())
    else:
        driver.tick()  # the first update only starts watching; what exists now counts as handled
    t0 = time.time()
    sync = driver.sensor()
    for req in sync.dynamic_partitions_requests:
        print(f"classes {'added' if 'Add' in type(req).__name__ else 'removed'}: {', '.join(req.partition_keys)}")
    driver.observe()
    done = driver.settle()
    from di_assets.ml.io import atomic_path

    with atomic_path(cursor_file) as tmp:
        tmp.write_text(serialize_value(driver.cursor))
    if not done:
        print("everything is up to date")
    for name in driver.order:
        if name in done:
            keys = sorted(k for k in done[name] if k is not None)
            print(f"  {name}: {', '.join(keys) if keys else 'rebuilt'}")
    print(f"{driver.runs} runs in {time.time() - t0:.1f}s")
    return 0


# The folders whose Parquet files the views read: the only files a query may touch.
VIEW_DATA = ("scores", "baseline/scores", "predictions", "real_predictions")
# The views' globs, relative to the storage root (those of defs.scores_db and ml.diagnosis.views): a query
# may name these patterns exactly; what they match lies in VIEW_DATA under the root the database is in.
VIEW_GLOBS = ("scores/*/*/*.parquet", "scores/*/*.parquet",  # a file per class x shift, or per class (the class grain)
              "baseline/scores/*/*/*.parquet", "baseline/scores/*/*.parquet", "predictions/*/*/*/*.parquet",
              "real_predictions/*/*/*.parquet")
QUERY_STATEMENTS = ("SELECT", "EXPLAIN")  # SELECT includes DESCRIBE, SUMMARIZE, SHOW, FROM ..., VALUES


def _open_scores_db(db: Path, made_by: str = "scores_db"):
    """The scores database for reading only: no file but the views' own, no network, no extension.

    One clear line when no run has made it, when its first build was cut short, or while a run writes it."""
    import duckdb

    if not db.exists():
        raise SystemExit(f"error: {db} does not exist; run `di-assets run` (or materialize {made_by}) first")
    try:
        con = duckdb.connect(str(db), read_only=True, config={
            "autoinstall_known_extensions": False, "autoload_known_extensions": False})
    except duckdb.Error as exc:
        reason = str(exc).splitlines()[0]
        if "lock" in reason.lower():
            raise SystemExit(f"error: {db} is being rebuilt by a run; retry when it ends ({reason})") from None
        raise SystemExit(f"error: cannot open {db}: {reason}") from None
    from di_assets.ml.diagnosis import use_storage_root

    # The views' relative globs resolve against the root the database is in (a copy reads its own files).
    # Allowed paths and directories must be set while external access is still on; then lock the
    # configuration so that no statement can turn any of them back. Only the exact relative globs are
    # allowed (a plain relative file name would fall back to the working directory), and the absolute
    # folders they match (and that the views of older databases name).
    try:
        root = use_storage_root(con, db.parent)
    except ValueError as exc:
        con.close()
        raise SystemExit(f"error: {exc}") from None
    con.execute("SET allowed_paths = ?", [list(VIEW_GLOBS)])
    con.execute("SET allowed_directories = ?", [[os.path.join(root, d) + os.sep for d in VIEW_DATA]])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'scores'").fetchone()[0]:
        con.close()
        raise SystemExit(f"error: {db} has no views yet: the run that builds them was stopped before it finished; "
                         f"run `di-assets run` again (or materialize {made_by})")
    return con


def _check_read_only(sql: str) -> None:
    """Only queries: COPY, ATTACH, INSTALL, SET, PRAGMA, CALL and the like get one clear line."""
    import duckdb

    try:
        kinds = [st.type.name for st in duckdb.extract_statements(sql)]
    except duckdb.Error as exc:
        raise SystemExit(f"error: {str(exc).splitlines()[0]}") from None
    wrong = [k for k in kinds if k not in QUERY_STATEMENTS]
    if wrong or not kinds:
        raise SystemExit(f"error: di-assets query runs read-only queries over the scores (SELECT, DESCRIBE, "
                         f"SUMMARIZE, EXPLAIN), not {wrong[0] if wrong else 'an empty statement'}; "
                         "to save a result, use --output FILE")


def _query(db: Path, sql: str, params=None, fmt: str = "table", output: str | None = None) -> int:
    import duckdb

    _check_read_only(sql)
    con = _open_scores_db(db)
    try:
        cur = con.execute(sql, params)
        rows = cur.fetchall()
        cols = [d[0] for d in cur.description] if cur.description else []
    except duckdb.PermissionException as exc:
        raise SystemExit(f"error: a query may read only the views' own files under {db.parent} (if this storage "
                         f"folder was copied or moved, materialize scores_db again): {str(exc).splitlines()[0]}")
    except duckdb.Error as exc:
        raise SystemExit(f"error: {exc}".splitlines()[0])
    finally:
        con.close()
    if not cols:
        return 0
    if output:
        from di_assets.ml.io import atomic_path

        with atomic_path(output) as tmp, open(tmp, "w", newline="") as out:
            _write_rows(cols, rows, fmt, out)
        print(f"{len(rows)} rows written to {output}", file=sys.stderr)
    else:
        _write_rows(cols, rows, fmt, sys.stdout)
    return 0


def _write_rows(cols, rows, fmt: str, out) -> None:
    """A query's result as an aligned table, CSV, JSON (a list of objects) or a Markdown table."""
    import csv
    import json

    if fmt == "csv":
        w = csv.writer(out)
        w.writerow(cols)
        w.writerows(rows)
    elif fmt == "json":
        def value(v):  # JSON has no NaN
            return None if isinstance(v, float) and v != v else v

        json.dump([{c: value(v) for c, v in zip(cols, r)} for r in rows], out, indent=1, default=str)
        out.write("\n")
    elif fmt == "markdown":
        def cell(v):
            return ("%.4f" % v if isinstance(v, float) else str(v)).replace("|", "\\|")

        out.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        out.writelines("| " + " | ".join(cell(v) for v in r) + " |\n" for r in rows)
    else:
        _print_table(cols, rows, out)


def cmd_query(args) -> int:
    settings = _settings(args)
    return _query(Path(settings.storage) / "scores.duckdb", args.sql, fmt=args.format, output=args.output)


def cmd_report(args) -> int:
    from di_assets.ml.report import write_report

    settings = _settings(args)
    storage = Path(settings.storage)
    db = storage / "scores.duckdb"
    con = _open_scores_db(db, made_by="diagnosis")
    try:
        if not con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'shift_failures'").fetchone()[0]:
            raise SystemExit(f"error: {db} has no diagnosis views; materialize the diagnosis asset "
                             "(di-assets run, with classifiers in the settings) first")
        out = write_report(con, storage, Path(args.out) if args.out else storage / "diagnosis" / "report.html")
    finally:
        con.close()
    print(f"report written to {out}")
    return 0


def cmd_export(args) -> int:
    from di_assets.ml.models import ModelSpec
    from di_assets.ml.paper_format import export_encoder_root

    src = Path(args.src) if args.src else Path(_settings(args).storage) / "encoder_root"
    model = ModelSpec(family=args.family, diffusion=args.diffusion) if (args.family or args.diffusion) else None
    out = export_encoder_root(src, args.out, format=args.format, model=model)
    print(f"encoder root written to {out} ({args.format} format)")
    return 0


def cmd_import(args) -> int:
    from di_assets.ml.imagenet_star import import_imagenet_star
    from di_assets.ml.models import ModelSpec

    names = None
    if args.class_names:
        names = [line.strip() for line in Path(args.class_names).read_text().splitlines() if line.strip()]
    model = ModelSpec(family=args.family, diffusion=args.diffusion)
    root = import_imagenet_star(args.tokens, args.out, class_names=names, model=model)
    print(f"encoder root written to {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="di-assets", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", help="settings YAML (default: $DI_ASSETS_CONFIG, else the bundled example)")
        sp.add_argument("--storage", help="storage root of all artifacts (default: ./.di_storage)")

    r = sub.add_parser("run", help="materialize every asset for every partition",
                       description="Materialize class tokens, the encoder root, counterfactuals, CLIP scores "
                                   "and the DuckDB views for every class and shift, then print mean scores.")
    common(r)
    r.add_argument("--dataset", help="class-image folder (ImageFolder layout)")
    r.add_argument("--family", choices=["tiny", "sd"], help="model family (default: tiny, offline)")
    r.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps")
    r.add_argument("--shifts", help="comma-separated shift keys (default: from the config)")
    r.add_argument("--num-samples", type=int, help="images per class and shift")
    r.add_argument("--verbose", action="store_true",
                   help="show every log line of the runs (Dagster's console) instead of one progress bar per stage")
    r.add_argument("--log-level", default="INFO", help="with --verbose, the console's log level (default: INFO)")
    r.set_defaults(func=cmd_run)

    u = sub.add_parser("update", help="rerun only what changed in the dataset",
                       description="Add new classes, retire removed ones, and rerun the tokens, images and scores "
                                   "of changed classes only (what the Dagster daemon does with the sensor, the "
                                   "schedule and declarative automation turned on).")
    common(u)
    u.add_argument("--dataset", help="class-image folder (ImageFolder layout)")
    u.add_argument("--verbose", action="store_true", help="show every log line of the runs on the terminal")
    u.add_argument("--log-level", default="INFO", help="with --verbose, the console's log level (default: INFO)")
    u.add_argument("--full", action="store_true",
                   help="hash every class folder again (by default only folders whose listing changed: names, "
                        "sizes, times)")
    u.set_defaults(func=cmd_update)

    q = sub.add_parser("query", help="run SQL over the scores in DuckDB",
                       description="Run read-only SQL over the DuckDB views: `scores` (one row per image), "
                                   "`mean_scores`, `dropped` (the images the CLIP filter left out, and why), and "
                                   "with a diagnosis `predictions`, `accuracy`, `shift_failures`, `class_failures`, "
                                   "`real_vs_base`. Only queries run (SELECT, DESCRIBE, SUMMARIZE, EXPLAIN), and "
                                   "only the views' own files can be read.")
    common(q)
    q.add_argument("sql", help="e.g. \"SELECT shift, avg(sim_class) FROM scores GROUP BY shift\"")
    q.add_argument("--format", choices=["table", "csv", "json", "markdown"], default="table",
                   help="output format (default: an aligned table)")
    q.add_argument("--output", help="write the result to this file instead of the terminal")
    q.set_defaults(func=cmd_query)

    rp = sub.add_parser("report", help="write the diagnosis report as one HTML page",
                        description="Write one self-contained HTML page: per classifier, accuracy per shift with "
                                    "95% intervals, a class x shift heat map, the worst shifts and misclassified "
                                    "images beside their CLIP filter status.")
    common(rp)
    rp.add_argument("--out", help="HTML file to write (default: <storage>/diagnosis/report.html)")
    rp.set_defaults(func=cmd_report)

    x = sub.add_parser("export-encoder-root", help="write an encoder root in the paper's format (or back)",
                       description="Write an encoder root that the paper's code (MadryLab/dataset-interfaces) reads: "
                                   "tokenizer/, text_encoder/ (float16) and tokens.pt; or, with --format di-assets, "
                                   "turn a paper root into a di-assets root.")
    common(x)
    x.add_argument("out", help="folder to write")
    x.add_argument("--src", help="encoder root to read (default: <storage>/encoder_root)")
    x.add_argument("--format", choices=["paper", "di-assets"], default="paper", help="format to write (default: paper)")
    x.add_argument("--family", choices=["tiny", "sd"], help="base model family, where the source does not say")
    x.add_argument("--diffusion", help="base model (Hub id or local folder), where the source does not say")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("import-imagenet-star", help="build an encoder root from published ImageNet* tokens",
                       description="Build an encoder root from a folder of {i}.bin token files (read with weights_only=True).")
    i.add_argument("tokens", help="folder holding 0.bin, 1.bin, ...")
    i.add_argument("out", help="encoder root to write")
    i.add_argument("--class-names", help="text file, one class name per line, in token order")
    i.add_argument("--family", choices=["tiny", "sd"], default="sd", help="base model family (default: sd)")
    i.add_argument("--diffusion", help="base model: Hub id or local folder (default: stabilityai/stable-diffusion-2)")
    i.set_defaults(func=cmd_import)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # We pin the Dagster APIs we use; their beta notices are for library authors, not users.
    warnings.filterwarnings("ignore", message=".*is currently in beta")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - an error a user can fix is one line; a bug keeps its traceback
        import yaml

        cause = exc
        while getattr(cause, "user_exception", None) is not None:  # a Dagster wrapper around our own error
            cause = cause.user_exception
        if not isinstance(cause, (OSError, ValueError, KeyError, yaml.YAMLError)):
            raise
        print(f"error: {_one_line(cause)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
