"""The diagnosis report (di_assets.ml.report) on a small synthetic diagnosis database."""

import base64
import re
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

duckdb = pytest.importorskip("duckdb")
pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from di_assets.ml import report  # noqa: E402

HOSTILE = "<script>alert(1)</script>"
CLASSES = {"star": "star", "evil": HOSTILE, "cash": "cost $5 & $10"}  # `$` would start mathtext
SHIFTS = ["base", "in_the_grass", "in_the_snow", "at_night"]
SEEDS = range(4)
# shift_failures per classifier: shift -> (accuracy, drop, drop_low, drop_high, significant, classes_dropping)
SUMMARY = {
    "resnet_a": {
        "base": (0.90, 0.0, 0.0, 0.0, False, 0),
        "in_the_grass": (0.85, 0.05, -0.10, 0.20, False, 0),
        "in_the_snow": (0.50, 0.40, 0.20, 0.60, True, 2),
        "at_night": (0.20, 0.70, 0.55, 0.85, True, 3),
    },
    "vit_b": {
        "base": (0.80, 0.0, 0.0, 0.0, False, 0),
        "in_the_grass": (0.30, 0.50, 0.30, 0.70, True, 2),
        "in_the_snow": (0.75, 0.05, -0.15, 0.25, False, 0),
        "at_night": (0.70, 0.10, -0.05, 0.25, False, 1),
    },
}


def _prediction(clf, key, shift, seed):
    """Deterministic synthetic prediction: (correct1, kept, drop_reason)."""
    acc = SUMMARY[clf][shift][0]
    correct = seed < round(acc * 4) and not (key == "evil" and shift == "at_night")
    kept = seed != 3
    if clf == "resnet_a" and key == "evil" and shift == "in_the_snow":
        kept = False  # no kept image: a NaN cell in the heat map
    reason = None if kept else ("low_class_similarity" if seed % 2 else "low_shift_similarity")
    return correct, kept, reason


@pytest.fixture
def diagnosis(tmp_path):
    root = tmp_path / "storage"
    db = tmp_path / "diagnosis.duckdb"
    colours = {"star": (250, 200, 0), "evil": (120, 0, 160), "cash": (0, 140, 60)}
    preds = []
    for clf in SUMMARY:
        for key, name in CLASSES.items():
            for shift in SHIFTS:
                for seed in SEEDS:
                    rel = f"images/{key}/{shift}/{seed}.png"
                    path = root / rel
                    if not path.exists():
                        path.parent.mkdir(parents=True, exist_ok=True)
                        Image.new("RGB", (8, 8), colours[key]).save(path)
                    correct, kept, reason = _prediction(clf, key, shift, seed)
                    top1 = name if correct else ("star" if key != "star" else "cost $5 & $10")
                    preds.append((clf, key, name, shift, seed, rel, name, top1, [top1, name],
                                  [0.6, 0.3], correct, True, kept, reason))
    con = duckdb.connect(str(db))
    con.execute("""CREATE TABLE predictions (classifier VARCHAR, class_key VARCHAR, class_name VARCHAR,
        shift VARCHAR, seed BIGINT, image_path VARCHAR, label VARCHAR, top1 VARCHAR, top5 VARCHAR[],
        top5_prob FLOAT[], correct1 BOOLEAN, correct5 BOOLEAN, kept BOOLEAN, drop_reason VARCHAR)""")
    con.executemany("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", preds)
    con.execute("""CREATE TABLE accuracy AS
        SELECT classifier, class_key, any_value(class_name) AS class_name, shift,
               count(*) AS images, count(*) FILTER (kept) AS kept,
               count(*) FILTER (kept AND correct1) AS correct,
               CASE WHEN count(*) FILTER (kept) = 0 THEN NULL
                    ELSE (count(*) FILTER (kept AND correct1))::DOUBLE / count(*) FILTER (kept) END AS accuracy,
               avg(correct1::INT)::DOUBLE AS accuracy_all, 0.0::DOUBLE AS ci_low, 1.0::DOUBLE AS ci_high
        FROM predictions GROUP BY classifier, class_key, shift""")
    con.execute("""CREATE TABLE shift_failures (classifier VARCHAR, shift VARCHAR, classes BIGINT,
        kept BIGINT, accuracy DOUBLE, acc_low DOUBLE, acc_high DOUBLE, base_accuracy DOUBLE,
        "drop" DOUBLE, drop_low DOUBLE, drop_high DOUBLE, significant BOOLEAN, classes_dropping BIGINT)""")
    for clf, shifts in SUMMARY.items():
        base = shifts["base"][0]
        for shift, (acc, drop, lo, hi, sig, ndrop) in shifts.items():
            con.execute("INSERT INTO shift_failures VALUES (?, ?, 3, 9, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [clf, shift, acc, max(0.0, acc - 0.15), min(1.0, acc + 0.1), base, drop, lo, hi,
                         sig, ndrop])
    con.execute("""CREATE TABLE class_failures AS
        SELECT a.classifier, a.shift, a.class_key, a.class_name, b.accuracy AS base_accuracy, a.accuracy,
               b.accuracy - a.accuracy AS "drop", 0.0::DOUBLE AS drop_low, 0.0::DOUBLE AS drop_high,
               false AS significant, 1::BIGINT AS rank
        FROM accuracy a JOIN accuracy b USING (classifier, class_key)
        WHERE b.shift = 'base' AND a.shift <> 'base'""")
    con.execute("""CREATE TABLE real_vs_base (classifier VARCHAR, class_key VARCHAR, class_name VARCHAR,
        real_images BIGINT, real_accuracy DOUBLE, real_low DOUBLE, real_high DOUBLE, base_images BIGINT,
        base_accuracy DOUBLE, base_low DOUBLE, base_high DOUBLE)""")
    for clf in SUMMARY:
        for key, name in CLASSES.items():
            con.execute("INSERT INTO real_vs_base VALUES (?, ?, ?, 8, 0.95, 0.7, 0.99, 4, 0.5, 0.2, 0.8)",
                        [clf, key, name])
    con.close()
    ro = duckdb.connect(str(db), read_only=True)
    yield ro, root, preds
    ro.close()


def _png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(BytesIO(data))
    im.load()
    return im


def test_worst_shifts_order_and_fields(diagnosis):
    con, _, _ = diagnosis
    ws = report.worst_shifts(con, "resnet_a")
    assert [w["shift"] for w in ws] == ["at_night", "in_the_snow", "in_the_grass"]  # base excluded
    first = ws[0]
    assert set(first) == {"shift", "accuracy", "base_accuracy", "drop", "drop_low", "drop_high",
                          "significant", "classes_dropping"}
    assert first["drop"] == pytest.approx(0.7) and first["significant"] is True
    assert first["drop_low"] == pytest.approx(0.55) and first["classes_dropping"] == 3
    assert [w["shift"] for w in report.worst_shifts(con, "vit_b", n=2)] == ["in_the_grass", "at_night"]
    assert report.worst_shifts(con, "no_such_classifier") == []


def test_misclassified_kept_first_and_only_wrong(diagnosis):
    con, _, preds = diagnosis
    rows = report.misclassified(con, "resnet_a", "at_night", n=50)
    expected = sorted(
        ((p[1], p[4], p[12]) for p in preds if p[0] == "resnet_a" and p[3] == "at_night" and not p[10]),
        key=lambda t: (not t[2], t[0], t[1]))
    assert [(r["class_key"], r["seed"], r["kept"]) for r in rows] == expected
    kept_flags = [r["kept"] for r in rows]
    assert True in kept_flags and False in kept_flags
    assert kept_flags == sorted(kept_flags, reverse=True)  # every kept row before every dropped row
    assert all(r["top1"] != r["label"] for r in rows)
    assert all((r["drop_reason"] is None) == r["kept"] for r in rows)
    assert set(rows[0]) == {"class_key", "class_name", "seed", "image_path", "label", "top1", "kept",
                            "drop_reason"}
    assert len(report.misclassified(con, "resnet_a", "at_night", n=2)) == 2


def test_charts_are_pngs_that_depend_on_the_classifier(diagnosis):
    con, _, _ = diagnosis
    charts = {}
    for clf in SUMMARY:
        acc = report.accuracy_chart(con, clf)
        heat = report.heatmap_chart(con, clf)
        a, h = _png(acc), _png(heat)
        assert 400 <= a.width <= 3000 and 250 <= a.height <= 1500
        assert 300 <= h.width <= 3000 and 200 <= h.height <= 2000
        charts[clf] = (acc, heat)
    assert charts["resnet_a"][0] != charts["vit_b"][0]
    assert charts["resnet_a"][1] != charts["vit_b"][1]
    # an explicit order changes the chart; an unknown classifier gives a placeholder, not an error
    assert report.accuracy_chart(con, "resnet_a", shifts_order=SHIFTS[::-1]) != charts["resnet_a"][0]
    _png(report.accuracy_chart(con, "nobody"))
    _png(report.heatmap_chart(con, "nobody"))


def test_significant_drops_are_red_in_the_accuracy_chart(diagnosis):
    con, _, _ = diagnosis

    def red_pixels(png):
        px = np.asarray(_png(png).convert("RGB")).reshape(-1, 3).astype(int)
        return int(((px[:, 0] > 180) & (px[:, 1] < 80) & (px[:, 2] < 80)).sum())

    # resnet_a has 2 significant shifts, vit_b 1: more red marker pixels for resnet_a
    assert red_pixels(report.accuracy_chart(con, "resnet_a")) > red_pixels(report.accuracy_chart(con, "vit_b")) > 0


def test_a_chart_in_a_record_is_smaller_and_looks_the_same(diagnosis):
    from di_assets.defs.metadata import png_markdown

    con, _, _ = diagnosis
    png = report.accuracy_chart(con, "resnet_a")
    md = png_markdown(png, "accuracy")
    assert md.startswith("![accuracy](data:image/png;base64,")
    inline = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)\)", md).group(1))
    assert len(inline) < 0.7 * len(png)  # 256 colours
    before = np.asarray(_png(png).convert("RGB")).astype(int)
    after = np.asarray(_png(inline).convert("RGB")).astype(int)
    assert before.shape == after.shape
    assert np.abs(before - after).mean() < 1.0  # on 0-255: no visible change


def test_shift_order():
    acc = {"base": 0.9, "a": 0.5, "b": 0.8, "c": float("nan")}
    assert report._order_shifts(list(acc), acc, None) == ["base", "b", "a", "c"]
    assert report._order_shifts(list(acc), acc, ["a", "c"]) == ["base", "a", "c", "b"]
    assert report._order_shifts(list(acc), acc, ["a", "base", "x"]) == ["a", "base", "b", "c"]


def test_render_html_is_self_contained_and_escaped(diagnosis):
    con, root, preds = diagnosis
    page = report.render_html(con, root, title="diag <&>")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "diag &lt;&amp;&gt;" in page
    assert str(root) in page
    for clf in SUMMARY:
        assert f"Classifier {clf}" in page
    assert "at_night" in page and "0.700" in page and "[0.550, 0.850]" in page  # worst shift of resnet_a
    assert "in_the_grass" in page and "0.500" in page  # worst shift of vit_b
    # the hostile class name never appears raw
    assert HOSTILE not in page and "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "cost $5 &amp; $10" in page
    # charts (2 per classifier) + one thumbnail per misclassified image of the 3 worst shifts
    n_thumbs = 0
    for clf in SUMMARY:
        for w in report.worst_shifts(con, clf, n=3):
            wrong = [p for p in preds if p[0] == clf and p[3] == w["shift"] and not p[10]]
            n_thumbs += min(6, len(wrong))
    assert n_thumbs == 30  # resnet_a: night 6, snow 6 (both capped), grass 3; vit_b: grass 6, night 6, snow 3
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert len(imgs) == 2 * len(SUMMARY) + n_thumbs
    assert all('src="data:image/png;base64,' in tag for tag in imgs)
    assert 'src="http' not in page and 'src="/' not in page and "href=\"http" not in page
    assert "<link" not in page and "<script" not in page
    # thumbnails are enlarged (nearest neighbour keeps the flat colour) and captions carry the badges
    for uri in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        im = _png(base64.b64decode(uri))
        assert min(im.size) >= 96
    thumbs = [t for t in imgs if "seed" in t]
    im = _png(base64.b64decode(re.search(r'base64,([^"]+)"', thumbs[0]).group(1))).convert("RGB")
    assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) == 1  # one flat colour
    assert "kept</span>" in page and "dropped: low_" in page
    assert "star → cost $5 &amp; $10" in page or "&lt;script&gt;alert(1)&lt;/script&gt; → star" in page
    assert "rather than because of the shift" in page


def test_render_html_survives_missing_images_and_paths_outside_the_root(diagnosis, tmp_path):
    con, root, _ = diagnosis
    for p in (root / "images" / "star" / "at_night").iterdir():
        p.unlink()
    page = report.render_html(con, root)
    assert "image missing" in page
    assert report._safe_image_file(root, "../diagnosis.duckdb") is None
    assert report._safe_image_file(root, "/etc/passwd") is None


def test_write_report_is_atomic(diagnosis, tmp_path):
    con, root, _ = diagnosis
    out = tmp_path / "out" / "report.html"
    got = report.write_report(con, root, out)
    assert got == out and out.is_file()
    text = out.read_text(encoding="utf-8")
    assert "resnet_a" in text and "vit_b" in text
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no .tmp- leftovers


def test_module_import_is_light():
    import subprocess
    import sys

    code = ("import sys, di_assets.ml.report; "
            "bad = [m for m in ('matplotlib', 'duckdb', 'PIL', 'dagster', 'torch') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_score_chart_boxes_are_the_ones_matplotlib_would_compute_from_every_score():
    """The box plots of the score chart come from quartiles and whiskers computed in SQL (BOX_SQL), not
    from every score handed to Python: they equal matplotlib's boxplot_stats of the same scores, with
    outliers past the whiskers, and a side with no value within reach (its whisker at the quartile)."""
    import pyarrow as pa
    from matplotlib import cbook

    rng = np.random.default_rng(3)
    spread = rng.normal(0.2, 0.1, 501).astype(np.float32)
    spread[:4] = [3.0, -3.0, 0.9, -0.7]  # outliers on both sides
    lopsided = np.array([0.0, 0.0, 0.0, 10.0], np.float32)  # q3 = 2.5: 10 is out of reach, 0 is below q3
    scores = {"in_the_snow": (spread, rng.uniform(-1, 1, 501).astype(np.float32)),
              "at_night": (lopsided, -lopsided)}
    table = pa.concat_tables(pa.table({"shift": [k] * len(c), "sim_class": c, "sim_shift": s, "kept": c > 0.1})
                             for k, (c, s) in scores.items())
    con = duckdb.connect()
    con.register("scores", table)
    rows = {r["shift"]: r for r in report._rows(con, report.BOX_SQL)}
    assert rows.keys() == scores.keys()
    for shift, (c, s) in scores.items():
        assert rows[shift]["kept"] == pytest.approx(float(np.mean(c > 0.1)))
        for name, values in (("c", c), ("s", s)):
            expected = cbook.boxplot_stats(values.astype(np.float64))[0]
            got = report.box_stats(rows[shift], name)
            assert got == pytest.approx({k: float(expected[k]) for k in got}, abs=1e-12), (shift, name)
    assert report.box_stats(rows["at_night"], "c")["whishi"] == pytest.approx(2.5)  # at q3, not at 10 or 0
    png = report.score_chart(con, ["in_the_snow", "at_night"])
    assert Image.open(BytesIO(png)).size[0] > 600
