"""diagnosis: which shifts break which classifier, for which classes (DuckDB views + a report)."""


import dagster as dg
from dagster_duckdb import DuckDBResource

from .metadata import captioned_strip_markdown, png_markdown, table_schema
from .partitions import OWNERS
from .predictions import prediction_key, real_prediction_key
from .resources import StorageResource

REPORT = "diagnosis/report.html"
UI_HEATMAP_CLASSES = 60  # above this, the heat map is in the report only
WORST_SHIFT_COLUMNS = [
    ("classifier", "string", "Classifier under diagnosis"),
    ("shift", "string", "Shift key"),
    ("accuracy", "float", "Accuracy on the kept images, averaged over classes"),
    ("base_accuracy", "float", "The same classes' accuracy on their base images"),
    ("drop", "float", "base_accuracy - accuracy"),
    ("drop_low", "float", "Lower bound of the drop's 95% interval"),
    ("drop_high", "float", "Upper bound of the drop's 95% interval"),
    ("significant", "bool", "The interval excludes 0"),
    ("classes_dropping", "int", "Classes whose own drop is significant"),
]


def build_diagnosis(classifier_names: list, code_version: str) -> dg.AssetsDefinition:
    deps = [dg.AssetKey("scores_db")] + [prediction_key(n) for n in classifier_names] + [
        real_prediction_key(n) for n in classifier_names]

    @dg.asset(
        deps=deps,
        group_name="diagnosis",
        owners=OWNERS,
        code_version=code_version,
        kinds={"duckdb", "html"},
        automation_condition=dg.AutomationCondition.eager(),
        metadata={"dagster/column_schema": table_schema(WORST_SHIFT_COLUMNS)},
        description="DuckDB views `predictions`, `accuracy`, `shift_failures`, `class_failures`, `real_vs_base` "
                    "and the report `diagnosis/report.html`",
    )
    def diagnosis(context: dg.AssetExecutionContext, storage: StorageResource,
                  duckdb: DuckDBResource) -> dg.MaterializeResult:
        from pathlib import Path

        from di_assets.ml.diagnosis import PREDICTIONS_DIR, create_views, storage_file
        from di_assets.ml.io import atomic_path, open_rgb

        from di_assets.ml.report import accuracy_chart, heatmap_chart, misclassified, worst_shifts, write_report

        root = Path(storage.root)
        if not any(root.glob(f"{PREDICTIONS_DIR}/*/*/*/*.parquet")):
            raise FileNotFoundError(f"no prediction files under {root / PREDICTIONS_DIR}; "
                                    "materialize the predictions assets first")
        with duckdb.get_connection() as con:
            create_views(con, root)
            report = write_report(con, root, root / REPORT)
            rows, charts, wrong = [], {}, {}
            n_classes = con.execute("SELECT count(DISTINCT class_key) FROM predictions").fetchone()[0]
            for name in classifier_names:
                worst = worst_shifts(con, name, n=5)
                rows += [{"classifier": name, **r} for r in worst]
                if worst:  # the worst shift's misclassified images, with the CLIP filter's verdict
                    shift = worst[0]["shift"]
                    found = [(storage_file(root, m["image_path"]), m) for m in misclassified(con, name, shift, n=6)]
                    wrong[name] = (shift, [
                        (open_rgb(path), f"{m['label']} → {m['top1']} ({'kept' if m['kept'] else 'dropped'})")
                        for path, m in found if path is not None and path.is_file()])
                png = accuracy_chart(con, name)
                with atomic_path(root / "diagnosis" / f"accuracy-{name}.png") as tmp:
                    tmp.write_bytes(png)
                # the heat map grows with the classes: the UI's record keeps it small, the report has it all
                charts[name] = (png, heatmap_chart(con, name) if n_classes <= UI_HEATMAP_CLASSES else None)
            images = con.execute("SELECT count(*) FROM predictions").fetchone()[0]
        for r in rows:
            context.log.info(f"{r['classifier']}: {r['shift']} accuracy {r['accuracy']:.3f} "
                             f"(base {r['base_accuracy']:.3f}, drop {r['drop']:+.3f}"
                             f"{', significant' if r['significant'] else ''})")
        table = dg.MetadataValue.table(
            [dg.TableRecord({c: (None if r.get(c) is None else (round(r[c], 4) if t == "float" else r[c]))
                             for c, t, _ in WORST_SHIFT_COLUMNS}) for r in rows],
            schema=table_schema(WORST_SHIFT_COLUMNS))
        return dg.MaterializeResult(metadata={
            "report": dg.MetadataValue.path(str(report)),
            "worst_shifts": table,
            "predictions": images,
            # one chart per classifier, in this one run-wide record
            **{f"accuracy_per_shift_{n}": dg.MetadataValue.md(
                png_markdown(chart, f"{n}: accuracy per shift")
                + ("\n\n" + png_markdown(heat, f"{n}: class x shift") if heat else
                   f"\n\n{n_classes} classes: the class x shift heat map is in the report"))
               for n, (chart, heat) in charts.items()},
            **{f"misclassified_{n}": dg.MetadataValue.md(
                f"**{n}**, worst shift `{shift}`: misclassified images (true → predicted)\n\n"
                + captioned_strip_markdown(items)) for n, (shift, items) in wrong.items()},
        })

    return diagnosis
