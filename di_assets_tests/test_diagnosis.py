"""Diagnosis: the CLIP filter's reasons, per-image predictions, and the DuckDB views' statistics."""

import math

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from di_assets.ml.clip_metric import BASE_CAPTION, FilterRule, drop_reasons
from di_assets.ml.diagnosis import (
    create_views,
    evaluate,
    predictions_file,
    prediction_table,
    real_predictions_file,
)
from di_assets_tests.conftest import EXAMPLE


def wilson(k, n, z=1.96):
    c = (k + z * z / 2) / (n + z * z)
    h = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return c - h, c + h


# ---------------------------------------------------------------- the CLIP filter


def test_default_filter_keeps_the_zero_shot_class_whose_shift_shows():
    keys = ["circle", "square", "star"]
    class_sims = torch.tensor([[0.6, 0.2, 0.1],   # right class, shift shown: kept
                               [0.3, 0.5, 0.1],   # CLIP picks square: dropped
                               [0.6, 0.2, 0.1],   # right class, but the base caption wins
                               [0.1, 0.1, 0.9]])  # star: wrong class and no shift
    sim_shift = torch.tensor([0.5, 0.5, 0.3, 0.2])
    sim_base = torch.tensor([0.4, 0.4, 0.4, 0.3])
    reasons = drop_reasons(class_sims, 0, keys, sim_shift, sim_base, "a photo in the snow")
    assert reasons == [None, "zero-shot: square", "shift not shown", "zero-shot: star; shift not shown"]
    # base images are not asked to show a shift
    base = drop_reasons(class_sims, 0, keys, sim_shift, sim_base, BASE_CAPTION)
    assert base == [None, "zero-shot: square", None, "zero-shot: star"]


def test_filter_thresholds_are_options_and_rules_can_be_turned_off():
    sims = torch.tensor([[0.15, 0.1], [0.6, 0.1]])
    off = FilterRule(zero_shot=False, shift_over_base=False)
    assert drop_reasons(sims, 0, ["a", "b"], torch.tensor([0.1, 0.3]), torch.tensor([0.9, 0.9]), "x", off) == [None, None]
    rule = FilterRule(zero_shot=False, shift_over_base=False, min_sim_class=0.2, min_sim_shift=0.25)
    assert drop_reasons(sims, 0, ["a", "b"], torch.tensor([0.1, 0.3]), torch.tensor([0.9, 0.9]), "x", rule) == [
        "sim_class < 0.2; sim_shift < 0.25", None]


# ---------------------------------------------------------------- evaluate (the Python API)


def example_images(cls, n=4):
    return [Image.open(p).convert("RGB") for p in sorted((EXAMPLE / cls).glob("*.png"))[:n]]


def test_evaluate_images_with_the_embedded_judge():
    t = evaluate({"name": "judge", "kind": "reference", "model": "judge", "device": "cpu"},
                 example_images("star"), class_name="star").to_pylist()
    assert len(t) == 4
    assert all(r["label"] == "star" and r["top1"] == "star" and r["correct1"] and r["correct5"] for r in t)
    assert all(len(r["top5"]) == 5 and r["top5"][0] == r["top1"] for r in t)
    assert all(abs(sum(r["top5_prob"]) - 1) < 0.05 and r["top5_prob"] == sorted(r["top5_prob"], reverse=True)
               for r in t)


@pytest.mark.parametrize("grain", ["class_shift", "class"])
def test_evaluate_a_storage_root(tmp_path, grain):
    """A storage root laid out as the flow writes it: manifests, and scores that drop one image (in a
    file of the pair, or at the class grain in the class's file of every shift)."""
    import json

    import pyarrow as pa

    root = tmp_path / "store"
    for cls in ("circle", "star"):
        folder = root / "images" / cls / "at_night"
        folder.mkdir(parents=True)
        records = []
        for seed, im in enumerate(example_images(cls, 3)):
            im.save(folder / f"{seed}.png")
            records.append({"seed": seed, "file": f"{seed}.png"})
        (folder / "manifest.json").write_text(json.dumps({"images": records}))
        table = pa.table({"shift": ["at_night"] * 3, "seed": [0, 1, 2], "kept": [True, False, True],
                          "drop_reason": [None, "zero-shot: square", None]})
        scores = root / "scores" / f"class={cls}" / ("shift=at_night/part.parquet" if grain == "class_shift"
                                                    else "part.parquet")
        scores.parent.mkdir(parents=True)
        if grain == "class":  # another shift's verdicts in the same file, of the same seeds
            table = pa.concat_tables([pa.table({"shift": ["base"] * 3, "seed": [0, 1, 2], "kept": [False] * 3,
                                                "drop_reason": ["blank"] * 3}), table])
        pq.write_table(table, scores)
    t = evaluate({"name": "judge", "kind": "reference", "model": "judge", "device": "cpu"}, root).to_pylist()
    assert [(r["class_key"], r["shift"], r["seed"]) for r in t] == [
        (c, "at_night", s) for c in ("circle", "star") for s in range(3)]
    assert [r["kept"] for r in t] == [True, False, True] * 2
    assert t[1]["drop_reason"] == "zero-shot: square" and t[0]["drop_reason"] is None
    assert t[4]["image_path"] == "images/star/at_night/1.png"
    assert all(r["correct1"] for r in t)  # real example images: the judge knows them


# ---------------------------------------------------------------- the views


def write_predictions(root, classifier, cls, shift, correct, kept=None):
    n = len(correct)
    kept = kept or [True] * n
    cols = {"label": [cls] * n, "top1": [cls if c else "other" for c in correct],
            "top5": [[cls, "other"]] * n, "top5_prob": [[0.6, 0.4]] * n, "correct1": correct,
            "correct5": [True] * n, "seed": list(range(n)),
            "image_path": [f"images/{cls}/{shift}/{i}.png" for i in range(n)],
            "kept": kept, "drop_reason": [None if k else "shift not shown" for k in kept]}
    path = predictions_file(root, classifier, cls, shift)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(prediction_table(cols, classifier=classifier, class_key=cls, class_name=cls, shift=shift), path)


@pytest.fixture
def diagnosed(tmp_path):
    """Two classes, 10 images each: night breaks `m` for both classes, snow for neither."""
    root = tmp_path / "store"
    for cls in ("cat", "dog"):
        write_predictions(root, "m", cls, "base", [True] * 10)
        write_predictions(root, "m", cls, "in_the_snow", [True] * 9 + [False])
        # 8 images, 2 more dropped by the filter: they must not count
        write_predictions(root, "m", cls, "at_night", [True, True] + [False] * 8, kept=[True] * 8 + [False] * 2)
    real = real_predictions_file(root, "m", "cat")
    real.parent.mkdir(parents=True)
    pq.write_table(prediction_table({"label": ["cat"] * 4, "top1": ["cat"] * 3 + ["dog"], "top5": [["cat"]] * 4,
                                     "top5_prob": [[1.0]] * 4, "correct1": [True] * 3 + [False],
                                     "correct5": [True] * 4, "file": ["a.png", "b.png", "c.png", "d.png"]},
                                    classifier="m", class_key="cat", class_name="cat"), real)
    con = duckdb.connect(str(tmp_path / "db.duckdb"))
    create_views(con, root)
    return con


def test_accuracy_counts_kept_images_with_wilson_intervals(diagnosed):
    row = diagnosed.execute("SELECT images, kept, correct, accuracy, accuracy_all, ci_low, ci_high FROM accuracy "
                            "WHERE classifier = 'm' AND class_key = 'cat' AND shift = 'at_night'").fetchone()
    assert row[:3] == (10, 8, 2)
    assert row[3] == pytest.approx(2 / 8) and row[4] == pytest.approx(2 / 10)
    assert row[5:] == pytest.approx(wilson(2, 8), abs=1e-9)


def test_shift_failures_find_the_broken_shift_only(diagnosed):
    rows = {r[0]: r[1:] for r in diagnosed.execute(
        "SELECT shift, accuracy, drop, drop_low, drop_high, significant, classes_dropping, classes "
        "FROM shift_failures WHERE classifier = 'm'").fetchall()}
    assert set(rows) == {"base", "in_the_snow", "at_night"}
    assert rows["base"][1:5] == (0, 0, 0, False)
    night = rows["at_night"]
    assert night[0] == pytest.approx(0.25) and night[1] == pytest.approx(0.75)
    assert night[2] > 0 and night[4] and night[5] == 2 and night[6] == 2
    # Newcombe's interval from the two Wilson intervals (20/20 kept at base, 4/16 at night)
    l1, u1 = wilson(20, 20)
    l2, u2 = wilson(4, 16)
    assert night[2] == pytest.approx(0.75 - math.sqrt((1 - l1) ** 2 + (u2 - 0.25) ** 2))
    assert night[3] == pytest.approx(0.75 + math.sqrt((u1 - 1) ** 2 + (0.25 - l2) ** 2))
    snow = rows["in_the_snow"]
    assert snow[1] == pytest.approx(0.1) and not snow[4] and snow[5] == 0


def test_class_failures_rank_and_real_vs_base(diagnosed):
    rows = diagnosed.execute("SELECT shift, class_key, rank, significant FROM class_failures "
                             "WHERE classifier = 'm' ORDER BY shift, rank").fetchall()
    assert rows == [("at_night", "cat", 1, True), ("at_night", "dog", 2, True),
                    ("in_the_snow", "cat", 1, False), ("in_the_snow", "dog", 2, False)]
    real = diagnosed.execute("SELECT class_key, real_images, real_accuracy, base_images, base_accuracy "
                             "FROM real_vs_base").fetchall()
    assert real == [("cat", 4, 0.75, 10, 1.0)]


def test_views_exist_before_any_real_images_were_evaluated(tmp_path):
    root = tmp_path / "store"
    write_predictions(root, "m", "cat", "base", [True, False])
    con = duckdb.connect()
    create_views(con, root)
    assert con.execute("SELECT count(*) FROM real_vs_base").fetchone() == (0,)
    assert con.execute("SELECT accuracy FROM accuracy").fetchone() == (0.5,)


def test_the_paper_api_exports_functions_not_submodules():
    import importlib

    importlib.import_module("di_assets.ml.generate")  # a submodule of the same name, already imported
    from di_assets import evaluate as ev
    from di_assets import generate

    assert callable(generate) and generate.__name__ == "generate"
    assert ev is evaluate
