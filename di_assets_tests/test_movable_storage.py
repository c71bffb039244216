"""The storage root is movable: every path it holds is relative to it, so a copy of the folder reads
its own files, and never the original's, even with the original gone."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from di_assets_tests.conftest import copy_classes

SHIFTS = ["base", "at_night"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}  # the instance lives in the root
    return {**env, **extra}


def query(root: Path, sql: str, out: Path) -> list[dict]:
    """`di-assets query --format json` on the storage root `root` (in this process: the command's code)."""
    from di_assets.cli import main

    assert main(["query", "--storage", str(root), "--format", "json", "--output", str(out), sql]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """One small run (2 classes x 2 shifts, the class-name baseline, a classifier and its diagnosis) on
    `orig/store`, every view's rows read there; then the folder copied to `copy/store` and the original
    moved away, so that any path to it fails."""
    import yaml

    tmp = tmp_path_factory.mktemp("movable")
    data = copy_classes(tmp / "data", per_class=4)
    orig = tmp / "orig" / "store"
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "dataset": str(data), "storage": str(orig), "shifts": SHIFTS, "textual_inversion": {"steps": 4},
        "generation": {"num_samples": 2}, "baseline": True,
        "classifiers": [{"name": "judge", "kind": "reference", "model": "judge", "device": "cpu"}]}))
    # no DAGSTER_HOME: the Dagster instance is kept in the root (<storage>/.dagster) and moves with it
    p = subprocess.run([sys.executable, "-m", "di_assets.cli", "run", "--config", str(cfg)], capture_output=True,
                       text=True, env=_env(), cwd=tmp)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (orig / ".dagster").is_dir() and (orig / "diagnosis" / "report.html").is_file()

    views = [r["view_name"] for r in query(orig, "SELECT view_name FROM duckdb_views() WHERE NOT internal "
                                                 "ORDER BY view_name", tmp / "views.json")]
    before = {v: query(orig, f"SELECT * FROM {v} ORDER BY ALL", tmp / f"{v}.json") for v in views}

    copy = tmp / "copy" / "store"
    shutil.copytree(orig, copy, symlinks=True)
    gone = tmp / "orig-moved-away"
    (tmp / "orig").rename(gone)
    assert not orig.exists()
    yield SimpleNamespace(tmp=tmp, cfg=cfg, orig=orig, copy=copy, gone=gone / "store", views=views, before=before)


@pytest.mark.slow  # one small run of the whole flow, shared by the module
def test_the_views_read_the_same_rows_in_the_copy(roots, tmp_path):
    assert {"scores", "mean_scores", "dropped", "baseline_scores", "token_vs_name", "predictions",
            "real_predictions", "accuracy", "shift_failures", "class_failures", "real_vs_base"} <= set(roots.views)
    assert len(roots.before["scores"]) == 2 * len(SHIFTS) * 2 and len(roots.before["predictions"]) == 8
    for view in roots.views:
        assert query(roots.copy, f"SELECT * FROM {view} ORDER BY ALL", tmp_path / "out.json") == roots.before[view], view

    # the command itself, from a working directory that holds score files of its own: the copy's are read
    decoy = tmp_path / "cwd"
    shutil.copytree(roots.copy / "scores", decoy / "scores")
    shutil.rmtree(next((decoy / "scores").iterdir()))
    p = subprocess.run([sys.executable, "-m", "di_assets.cli", "query", "--storage", str(roots.copy), "--format",
                        "json", "SELECT count(*) AS n, count(DISTINCT class_key || shift) AS pairs FROM scores"],
                       capture_output=True, text=True, env=_env(), cwd=decoy)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [{"n": len(roots.before["scores"]), "pairs": 2 * len(SHIFTS)}]


@pytest.mark.slow  # one small run of the whole flow, shared by the module
def test_every_image_path_is_relative_and_resolves_inside_the_copy(roots, tmp_path):
    import pyarrow.parquet as pq

    from di_assets.ml.diagnosis import storage_file

    copy = roots.copy
    files = [f for f in sorted(copy.rglob("*.parquet")) if "image_path" in pq.read_schema(f).names]
    assert {f.relative_to(copy).parts[0] for f in files} == {"scores", "baseline", "predictions"}
    for f in files:
        for path in pq.read_table(f, columns=["image_path"]).column("image_path").to_pylist():
            assert not Path(path).is_absolute() and ".." not in Path(path).parts, (f, path)
            assert path.startswith("baseline/images/" if f.relative_to(copy).parts[0] == "baseline" else "images/")
            assert (copy / path).is_file(), (f, path)
    rows = query(copy, "SELECT image_path FROM scores UNION ALL SELECT image_path FROM baseline_scores "
                       "UNION ALL SELECT image_path FROM predictions", tmp_path / "paths.json")
    assert len(rows) == 8 + 8 + 8
    for r in rows:
        resolved = storage_file(copy, r["image_path"])
        assert resolved.is_file() and resolved.resolve().is_relative_to(copy.resolve())


@pytest.mark.slow  # one small run of the whole flow, shared by the module
def test_no_file_of_the_copy_names_the_original_root(roots):
    """Parquet columns, JSON files (manifests, tokens.json, the encoder root's tokenizer and text
    encoder, loss.json), the report and the DuckDB file's view definitions: no absolute path of the
    original root. Dagster's own records (`.dagster/`) and the run logs say where past runs ran."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    copy, needle = roots.copy, str(roots.orig)
    history = {".dagster", "logs"}
    checked = {"json": 0, "parquet": 0}
    for f in sorted(p for p in copy.rglob("*") if p.is_file()):
        rel = f.relative_to(copy)
        if rel.parts[0] in history:
            continue
        assert needle.encode() not in f.read_bytes(), rel  # the raw bytes
        if f.suffix == ".json":  # every string in it (the dataset's folders may be named: they did not move)
            checked["json"] += 1
            strings = []
            stack = [json.loads(f.read_text())]
            while stack:
                v = stack.pop()
                stack += list(v.values()) + list(v) if isinstance(v, dict) else v if isinstance(v, list) else []
                strings += [v] if isinstance(v, str) else []
            assert not [s for s in strings if needle in s], rel
        if f.suffix == ".parquet":  # the values, which compression hides from a byte search
            checked["parquet"] += 1
            table = pq.read_table(f)
            for name in table.column_names:
                if pa.types.is_string(table.schema.field(name).type):
                    assert not [v for v in table.column(name).to_pylist() if v and needle in v], (rel, name)
    assert checked["json"] >= 8 + 1 and checked["parquet"] >= 4 + 4 + 4 + 2  # manifests, tokens.json; all tables

    con = duckdb.connect(str(copy / "scores.duckdb"), read_only=True)
    sql = dict(con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall())
    con.close()
    assert set(sql) == set(roots.views)
    reads = [s for s in sql.values() if "read_parquet(" in s]
    assert len(reads) == 4  # scores, baseline_scores, predictions, real_predictions
    assert all("read_parquet('/" not in s and str(roots.tmp) not in s for s in sql.values())
    assert "storage root <code>store</code>" in (copy / "diagnosis" / "report.html").read_text()


@pytest.mark.slow  # one small run of the whole flow, shared by the module
def test_the_query_sandbox_refuses_files_outside_the_copy(roots, tmp_path, monkeypatch):
    from di_assets.cli import main

    (roots.tmp / "copy" / "secret.csv").write_text("secret\n42\n")
    monkeypatch.chdir(tmp_path)  # a working directory with score-like files of its own
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "secret.csv").write_text("secret\n42\n")
    shutil.copy(next(roots.gone.glob("scores/*/*/part.parquet")), tmp_path / "scores" / "part.parquet")
    for sql in [f"SELECT * FROM read_parquet('{roots.gone}/scores/*/*/*.parquet')",  # the original, moved
                f"SELECT * FROM read_parquet('{roots.gone}/scores/class=circle/shift=base/part.parquet')",
                f"SELECT * FROM read_csv('{roots.copy}/scores/../../secret.csv')",
                "SELECT * FROM read_csv('scores/../../secret.csv')",
                "SELECT * FROM read_csv('../secret.csv')",
                "SELECT * FROM read_csv('scores/secret.csv')",  # a relative name would fall back to the cwd
                "SELECT * FROM read_parquet('scores/part.parquet')",
                "SELECT * FROM read_parquet('scores/*.parquet')",
                "SELECT * FROM glob('scores/*')"]:
        with pytest.raises(SystemExit, match="may read only the views' own files"):
            main(["query", "--storage", str(roots.copy), sql])
    # the views' own glob, named in a query, reads the copy's files
    rows = query(roots.copy, "SELECT count(*) AS n FROM read_parquet('scores/*/*/*.parquet')", tmp_path / "n.json")
    assert rows == [{"n": len(roots.before["scores"])}]


@pytest.mark.slow  # one small run of the whole flow, shared by the module
def test_the_assets_rebuild_the_views_and_the_report_in_the_copy(roots, tmp_path, monkeypatch):
    """scores_db and diagnosis, materialized on the copy (with the instance that moved with it): the
    rows check passes, the views read the same rows, and the report shows the copy's images."""
    import dataclasses

    import dagster as dg

    from di_assets.defs import build_assets, build_resources
    from di_assets.defs.instance import open_instance
    from di_assets.settings import Settings

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    copy = roots.copy
    settings = dataclasses.replace(Settings.load(roots.cfg), storage=str(copy))
    (copy / "diagnosis" / "report.html").unlink()
    instance = open_instance(copy)
    result = dg.materialize(build_assets(settings), selection=["scores_db", "diagnosis"], instance=instance,
                            resources=build_resources(settings))
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks), [c.metadata for c in checks]
    for view in roots.views:
        assert query(copy, f"SELECT * FROM {view} ORDER BY ALL", tmp_path / "out.json") == roots.before[view], view
    page = (copy / "diagnosis" / "report.html").read_text()
    assert str(roots.orig) not in page and "image missing" not in page and "storage root <code>store</code>" in page


def test_an_older_absolute_image_path_still_resolves(tmp_path):
    """Score files written before paths were relative hold absolute ones: in their own root they are used
    as they are; in a copy they map to the copy's file, never the original's; nothing maps outside."""
    from di_assets.ml import report
    from di_assets.ml.diagnosis import storage_file

    orig, copy = tmp_path / "orig" / "store", tmp_path / "copy" / "store"
    for root in (orig, copy):
        for rel in ("images/circle/base/0.png", "baseline/images/circle/base/0.png"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"png")
    assert storage_file(copy, "images/circle/base/0.png") == copy / "images/circle/base/0.png"
    assert storage_file(orig, str(orig / "images/circle/base/0.png")) == orig / "images/circle/base/0.png"
    assert storage_file(copy, str(orig / "images/circle/base/0.png")) == copy / "images/circle/base/0.png"
    assert storage_file(copy, str(orig / "baseline/images/circle/base/0.png")) == \
        copy / "baseline/images/circle/base/0.png"
    for bad in ("", None, "../x.png", "images/../../x.png", "/etc/passwd", str(orig / "scores.duckdb"),
                str(orig / "images/circle/base/9.png")):
        assert storage_file(copy, bad) is None or not storage_file(copy, bad).exists(), bad
        assert report._safe_image_file(copy, bad) is None, bad
    assert report._safe_image_file(copy, str(orig / "images/circle/base/0.png")) == copy / "images/circle/base/0.png"


def test_the_query_sandbox_allows_exactly_the_views_globs():
    """`di-assets query` allows the views' relative globs by name (VIEW_GLOBS) and the folders they match."""
    from di_assets.cli import VIEW_DATA, VIEW_GLOBS
    from di_assets.ml.diagnosis import PREDICTIONS_GLOB, REAL_PREDICTIONS_GLOB
    from di_assets.ml.score_rows import GLOBS, score_glob

    globs = {*(score_glob(g, f) for f in ("scores", "baseline/scores") for g in GLOBS),  # both grains
             PREDICTIONS_GLOB, REAL_PREDICTIONS_GLOB}
    assert set(VIEW_GLOBS) == globs and all(not Path(g).is_absolute() for g in globs)
    assert {g.split("/*")[0] for g in globs} == set(VIEW_DATA)
