"""Diagnosis: run classifiers on the counterfactuals, and find where their accuracy drops.

`predict_images` turns a classifier's logits into one row per image (top-5 labels and
probabilities, correct@1, correct@5); `evaluate` is the notebook entry point (images, or a
storage root written by the flow); `create_views` builds the DuckDB views that say which
shifts break which classifier, with 95% intervals, over the Parquet files the flow writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .io import read_counterfactuals

PREDICTIONS_DIR = "predictions"  # predictions/classifier=<m>/class=<c>/shift=<s>/part.parquet
REAL_PREDICTIONS_DIR = "real_predictions"  # real_predictions/classifier=<m>/class=<c>/part.parquet
# What the views read, relative to the storage root (see use_storage_root): a copied root reads its own files.
PREDICTIONS_GLOB = f"{PREDICTIONS_DIR}/*/*/*/*.parquet"
REAL_PREDICTIONS_GLOB = f"{REAL_PREDICTIONS_DIR}/*/*/*.parquet"
BASELINE_DIR = "baseline"  # the class-name baseline's images and scores (as defs.resources.BASELINE_DIR)
TOP_K = 5
Z = 1.96  # 95% intervals


def use_storage_root(con, root: str | Path) -> str:
    """Resolve `con`'s relative file paths (those in the views of scores.duckdb) against the storage
    root `root`, so that a copied or moved root reads its own Parquet files; return the root's
    absolute path. DuckDB's `file_search_path` is a comma-separated list, so a root whose path holds
    a comma is one clear error."""
    path = os.path.abspath(root)
    if "," in path:
        raise ValueError(f"the storage root {path} has a comma in its path, which DuckDB cannot search for the "
                         "views' files; move it (or link it) to a path without one")
    con.execute("SET file_search_path = ?", [path])
    return path


def storage_file(root: str | Path, path) -> Path | None:
    """A file path stored in a table (image_path: relative to the storage root) as a path under `root`.

    An absolute path, as older score files hold, is used as it is when it lies in `root`; one from
    another root (the original of a copied folder) maps to the same file in `root`
    (`[baseline/]images/<class>/<shift>/<file>`), so a copy never reads the original's files.
    None for an empty path, a `..` component, or an absolute path that maps to no file in `root`."""
    if not path:
        return None
    root, p = Path(root), Path(str(path))
    if ".." in p.parts:
        return None
    if not p.is_absolute():
        return root / p
    base = os.path.abspath(root)
    if os.path.commonpath([base, os.path.abspath(p)]) == base:
        return p
    parts, i = p.parts, len(p.parts) - 4  # ends in images/<class>/<shift>/<file>
    if i < 1 or parts[i] != "images":
        return None
    tails = ([parts[i - 1:]] if parts[i - 1] == BASELINE_DIR else []) + [parts[i:]]
    return next((root.joinpath(*t) for t in tails if root.joinpath(*t).is_file()), None)


def predictions_file(root: str | Path, classifier: str, class_key: str, shift: str) -> Path:
    return Path(root) / PREDICTIONS_DIR / f"classifier={classifier}" / f"class={class_key}" / f"shift={shift}" / "part.parquet"


def real_predictions_file(root: str | Path, classifier: str, class_key: str) -> Path:
    return Path(root) / REAL_PREDICTIONS_DIR / f"classifier={classifier}" / f"class={class_key}" / "part.parquet"


def predict_images(clf, images: Sequence, target: int | None, k: int = TOP_K) -> dict[str, list]:
    """Columns for a batch of images of one class: label, top1, top5, top5_prob, correct1, correct5."""
    from .classifiers import top_k

    if not images:
        return {c: [] for c in ("label", "top1", "top5", "top5_prob", "correct1", "correct5")}
    idx, prob = top_k(clf.logits(list(images)), k)
    idx, prob = idx.tolist(), prob.tolist()
    n = len(idx)
    return {
        "label": [clf.labels[target] if target is not None else None] * n,
        "top1": [clf.labels[row[0]] for row in idx],
        "top5": [[clf.labels[j] for j in row] for row in idx],
        "top5_prob": prob,
        "correct1": [target is not None and row[0] == target for row in idx],
        "correct5": [target is not None and target in row for row in idx],
    }


def prediction_table(columns: dict[str, list], **constants):
    """A pyarrow table of per-image predictions, with typed list columns."""
    import pyarrow as pa

    n = len(columns["top1"])
    data = {k: [v] * n for k, v in constants.items()}
    data.update(columns)
    data["top5"] = pa.array(columns["top5"], pa.list_(pa.string()))
    data["top5_prob"] = pa.array(columns["top5_prob"], pa.list_(pa.float32()))
    if "seed" in data:
        data["seed"] = pa.array(data["seed"], pa.int64())
    return pa.table(data)


def read_partition(root: str | Path, class_key: str, shift: str):
    """A counterfactual partition: its manifest's image records, the images, and the CLIP filter's
    (kept, drop_reason) per seed (every image kept when the partition has no scores yet)."""
    import pyarrow.parquet as pq

    root = Path(root)
    manifest, images = read_counterfactuals(root / "images" / class_key / shift)
    records = manifest["images"]
    folder = root / "scores" / f"class={class_key}"
    scores, filters = folder / f"shift={shift}" / "part.parquet", None
    if not scores.exists():  # the class grain's file of every shift
        scores, filters = folder / "part.parquet", [("shift", "==", shift)]
    verdict = {}
    if scores.exists():
        t = pq.read_table(scores, filters=filters).to_pydict()
        verdict = {s: (k, r) for s, k, r in zip(t["seed"], t["kept"], t.get("drop_reason", [None] * len(t["seed"])))}
    kept = [verdict.get(r["seed"], (True, None)) for r in records]
    return records, images, kept


def predict_partition(clf, root: str | Path, class_key: str, class_name: str, shift: str, target: int,
                      k: int = TOP_K):
    """The classifier on one counterfactual partition of a storage root: one row per image, with
    its seed, its path relative to the root and the CLIP filter's verdict."""
    import pyarrow as pa

    records, images, verdicts = read_partition(root, class_key, shift)
    cols = predict_images(clf, images, target, k)
    cols.update(seed=[r["seed"] for r in records],
                image_path=[f"images/{class_key}/{shift}/{r['file']}" for r in records],
                kept=[kept for kept, _ in verdicts], drop_reason=pa.array([r for _, r in verdicts], pa.string()))
    return prediction_table(cols, classifier=clf.name, class_key=class_key, class_name=class_name, shift=shift)


def evaluate(classifier, source, *, class_name: str | None = None, shifts: Sequence[str] | None = None,
             mapping: str | None = None, top_k: int = TOP_K):
    """The classifier's top-k predictions, one row per image, as a pyarrow table (`.to_pylist()`,
    or `.to_pandas()` where pandas is installed).

    `classifier`: a ClassifierSpec, a settings-style dict, or a loaded Classifier.
    `source`: a list of PIL images of the class `class_name` (or of unknown class: then correct@k
    is false), or a storage root written by the flow (every class and shift found there, or
    `shifts`; with the CLIP filter's `kept` and `drop_reason` columns).
    """
    from .classifiers import Classifier, ClassifierSpec, load_classifier, map_classes

    if isinstance(source, (str, Path)):
        root = Path(source)
        if not (root / "images").is_dir():
            raise FileNotFoundError(f"{root} holds no images/ folder; run the flow (di-assets run) first")
        pairs = [(p.parent.parent.name, p.parent.name) for p in sorted(root.glob("images/*/*/manifest.json"))
                 if shifts is None or p.parent.name in shifts]
        names = _class_names(root, sorted({c for c, _ in pairs}))
    else:
        names = {class_name: class_name} if class_name else {}
    clf = classifier
    if not isinstance(clf, Classifier):
        spec = clf if isinstance(clf, ClassifierSpec) else ClassifierSpec.from_dict(dict(clf))
        clf = load_classifier(spec, class_names=list(names.values()))
    targets = map_classes(list(names.items()), clf, mapping) if names else {}

    import pyarrow as pa

    if not isinstance(source, (str, Path)):
        cols = predict_images(clf, list(source), targets.get(class_name), top_k)
        return prediction_table(cols, classifier=clf.name, class_name=class_name)
    tables = [predict_partition(clf, root, key, names[key], shift, targets[key], top_k) for key, shift in pairs]
    return pa.concat_tables(tables) if tables else pa.table({})


def _class_names(root: Path, keys: list[str]) -> dict[str, str]:
    """Display names of class keys, from the encoder root's index when there is one."""
    names = {k: k for k in keys}
    index = root / "encoder_root" / "tokens.json"
    if index.exists():
        for c in json.loads(index.read_text()).get("classes", []):
            if c.get("key") in names:
                names[c["key"]] = c.get("name", c["key"])
    return names


# ---------------------------------------------------------------- the DuckDB views


def _wilson(k: str, n: str, side: str) -> str:
    """SQL for one bound of the 95% Wilson score interval of k successes in n trials."""
    sign = "-" if side == "low" else "+"
    return (f"CASE WHEN ({n}) > 0 THEN (({k}) + {Z * Z / 2}) / (({n}) + {Z * Z}) {sign} "
            f"{Z} * sqrt(greatest(({k}) * (({n}) - ({k})) / ({n}), 0) + {Z * Z / 4}) / (({n}) + {Z * Z}) END")


def _newcombe(p1: str, l1: str, u1: str, p2: str, l2: str, u2: str) -> tuple[str, str]:
    """SQL for Newcombe's 95% interval of p1 - p2 from the two Wilson intervals."""
    low = f"({p1}) - ({p2}) - sqrt(power(({p1}) - ({l1}), 2) + power(({u2}) - ({p2}), 2))"
    high = f"({p1}) - ({p2}) + sqrt(power(({u1}) - ({p1}), 2) + power(({p2}) - ({l2}), 2))"
    return low, high


# The real_predictions view before any class's real images were evaluated: empty, same columns.
NO_REAL_PREDICTIONS = """
    SELECT NULL::VARCHAR AS classifier, NULL::VARCHAR AS class_key, NULL::VARCHAR AS class_name, NULL::VARCHAR AS file,
           NULL::VARCHAR AS label, NULL::VARCHAR AS top1, NULL::VARCHAR[] AS top5, NULL::FLOAT[] AS top5_prob,
           NULL::BOOLEAN AS correct1, NULL::BOOLEAN AS correct5
    WHERE false"""


def views(root: str | Path) -> dict[str, str]:
    """name -> SELECT of each diagnosis view, in creation order. Their files are relative to the
    storage root `root` (a connection resolves them with use_storage_root)."""
    root = Path(root)
    glob, real_glob = PREDICTIONS_GLOB, REAL_PREDICTIONS_GLOB  # relative: see use_storage_root
    cd_low, cd_high = _newcombe("b.accuracy", "b.ci_low", "b.ci_high", "s.accuracy", "s.ci_low", "s.ci_high")
    sf_low, sf_high = _newcombe("base_accuracy", "base_low", "base_high", "accuracy", "acc_low", "acc_high")
    return {
        # one row per classifier and generated image
        "predictions": f"SELECT * EXCLUDE (class) FROM read_parquet('{glob}', hive_partitioning = true, union_by_name = true)",
        # one row per classifier and real image of a class folder
        "real_predictions": (
            f"SELECT * EXCLUDE (class) FROM read_parquet('{real_glob}', hive_partitioning = true, union_by_name = true)"
            if any(root.glob(f"{REAL_PREDICTIONS_DIR}/*/*/*.parquet")) else NO_REAL_PREDICTIONS),
        "accuracy": f"""
            SELECT *, {_wilson('correct', 'kept', 'low')} AS ci_low, {_wilson('correct', 'kept', 'high')} AS ci_high
            FROM (SELECT classifier, class_key, any_value(class_name) AS class_name, shift, count(*) AS images,
                         count(*) FILTER (kept) AS kept, count(*) FILTER (kept AND correct1) AS correct,
                         CASE WHEN count(*) FILTER (kept) > 0
                              THEN count(*) FILTER (kept AND correct1) / count(*) FILTER (kept) END AS accuracy,
                         avg(correct1::INTEGER) AS accuracy_all
                  FROM predictions GROUP BY classifier, class_key, shift)""",
        # each class's drop from its own base images, in every shift (classes with kept images in both)
        "class_drops": f"""
            SELECT s.classifier, s.shift, s.class_key, s.class_name, b.accuracy AS base_accuracy, s.accuracy,
                   b.accuracy - s.accuracy AS drop, {cd_low} AS drop_low, {cd_high} AS drop_high,
                   ({cd_low}) > 0 AS significant, b.kept AS base_kept, s.kept
            FROM accuracy s JOIN accuracy b
              ON b.classifier = s.classifier AND b.class_key = s.class_key AND b.shift = 'base'
            WHERE s.kept > 0 AND b.kept > 0""",
        # per classifier and shift: accuracy averaged over the classes, its drop from base on the
        # same classes, and the drop's interval (Wilson at the pooled number of kept images)
        "shift_failures": f"""
            WITH per_shift AS (
                SELECT classifier, shift, count(*) AS classes, sum(kept) AS kept, avg(accuracy) AS accuracy,
                       sum(base_kept) AS base_kept, avg(base_accuracy) AS base_accuracy,
                       count(*) FILTER (significant AND shift <> 'base') AS classes_dropping
                FROM class_drops GROUP BY classifier, shift),
            bounds AS (
                SELECT *, {_wilson('accuracy * kept', 'kept', 'low')} AS acc_low,
                          {_wilson('accuracy * kept', 'kept', 'high')} AS acc_high,
                          {_wilson('base_accuracy * base_kept', 'base_kept', 'low')} AS base_low,
                          {_wilson('base_accuracy * base_kept', 'base_kept', 'high')} AS base_high
                FROM per_shift)
            SELECT classifier, shift, classes, kept, accuracy, acc_low, acc_high, base_accuracy,
                   base_accuracy - accuracy AS drop,
                   CASE WHEN shift = 'base' THEN 0 ELSE {sf_low} END AS drop_low,
                   CASE WHEN shift = 'base' THEN 0 ELSE {sf_high} END AS drop_high,
                   shift <> 'base' AND ({sf_low}) > 0 AS significant, classes_dropping
            FROM bounds""",
        # per classifier and shift, its classes ranked by their drop (rank 1: the largest)
        "class_failures": """
            SELECT classifier, shift, class_key, class_name, base_accuracy, accuracy, drop, drop_low, drop_high,
                   significant, row_number() OVER (PARTITION BY classifier, shift ORDER BY drop DESC, class_key) AS rank
            FROM class_drops WHERE shift <> 'base'""",
        # each class's accuracy on its real images beside its generated base images: a low base with a
        # high real accuracy means failures on generated images, not in the shift
        "real_vs_base": f"""
            WITH r AS (SELECT classifier, class_key, any_value(class_name) AS class_name, count(*) AS real_images,
                              count(*) FILTER (correct1) AS real_correct
                       FROM real_predictions GROUP BY classifier, class_key)
            SELECT r.classifier, r.class_key, r.class_name, r.real_images,
                   r.real_correct / r.real_images AS real_accuracy,
                   {_wilson('r.real_correct', 'r.real_images', 'low')} AS real_low,
                   {_wilson('r.real_correct', 'r.real_images', 'high')} AS real_high,
                   b.kept AS base_images, b.accuracy AS base_accuracy, b.ci_low AS base_low, b.ci_high AS base_high
            FROM r LEFT JOIN accuracy b ON b.classifier = r.classifier AND b.class_key = r.class_key AND b.shift = 'base'""",
    }


def create_views(con, root: str | Path) -> None:
    """Create (or replace) the diagnosis views in one transaction: readers see all or none.

    The views read their files relative to `root`; this sets `con`'s file_search_path to it
    (use_storage_root), as every later connection that queries them must."""
    use_storage_root(con, root)
    con.execute("BEGIN TRANSACTION")
    for name, sql in views(root).items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
    con.execute("COMMIT")
