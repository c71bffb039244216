"""The `di-assets` command, run as a user runs it: in a subprocess, with a temporary DAGSTER_HOME."""

import os
import subprocess
import sys

import pytest

from di_assets_tests.conftest import copy_classes


def di(*args, env=None, check=True):
    p = subprocess.run([sys.executable, "-m", "di_assets.cli", *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if check and p.returncode:
        raise AssertionError(p.stdout + p.stderr)
    return p


@pytest.mark.parametrize("cmd", [[], ["run"], ["query"], ["report"], ["import-imagenet-star"],
                                 ["export-encoder-root"]])
def test_every_command_has_help(cmd):
    out = di(*cmd, "--help").stdout
    assert out.startswith("usage: di-assets") and "--help" in out


@pytest.mark.slow
def test_a_run_over_many_partitions_is_split_into_small_runs(tmp_path):
    """3 classes x 24 shifts: counterfactuals and scores in runs of at most 48 partitions (two classes'
    rows, then one), each partition once, and Dagster's records of a run stay small."""
    import dagster as dg

    from di_assets.defs.driver import RUN_PARTITIONS

    data = copy_classes(tmp_path / "data", classes=("circle", "square", "star"), per_class=2)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("dataset: data\nstorage: store\nclassifiers: []\n"
                   "textual_inversion: {steps: 2}\ngeneration: {num_samples: 1, num_inference_steps: 2}\n")
    (tmp_path / "home").mkdir()
    out = di("run", "--config", str(cfg), env={"DAGSTER_HOME": str(tmp_path / "home")}).stdout
    assert "counterfactuals + clip_scores: 3 classes x 24 shifts" in out and ", 2 runs)" in out
    instance = dg.DagsterInstance.local_temp(tempdir=str(tmp_path / "home"))
    for asset in ("counterfactuals", "clip_scores"):
        records = instance.fetch_materializations(dg.AssetKey(asset), limit=1000).records
        assert sorted(r.asset_materialization.partition for r in records) == sorted(
            f"{c}|{s}" for c in ("circle", "square", "star") for s in _catalog_keys())
        sizes = {}
        for r in records:
            sizes[r.run_id] = sizes.get(r.run_id, 0) + 1
        assert sorted(sizes.values()) == [24, RUN_PARTITIONS]
    q = di("query", "--config", str(cfg), "SELECT count(*) AS n FROM scores").stdout
    assert q.splitlines()[2].split() == ["72"]


def _catalog_keys() -> list[str]:
    from di_assets.ml.shifts import select_shifts

    return [s.key for s in select_shifts(None)]


@pytest.mark.slow
def test_run_then_query(tmp_path):
    data = copy_classes(tmp_path / "data", per_class=4)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("dataset: data\nstorage: store\nshifts: [base, at_night]\n"
                   "textual_inversion: {steps: 4}\ngeneration: {num_samples: 2}\n")
    env = {"DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    run = di("run", "--config", str(cfg), env=env)
    out = run.stdout
    assert "2 classes (circle, square)" in out and "counterfactuals + clip_scores: 2 classes x 2 shifts" in out
    # the terminal: a bar per stage, none of Dagster's per-step lines; those are all in the log file
    assert "STEP_SUCCESS" not in run.stderr and "<square>: step" not in run.stderr
    log = next(line.split()[1] for line in out.splitlines() if line.startswith("log "))
    text = open(log).read()
    assert "<square>: step 4/4" in text and "STEP_SUCCESS" in text and "RUN_SUCCESS" in text
    import json

    import dagster as dg

    runs = dg.DagsterInstance.local_temp(tempdir=str(tmp_path / "home")).get_runs()
    recorded = [json.loads(r.tags["di_assets/settings"]) for r in runs if "di_assets/settings" in r.tags]
    assert recorded and all(r == recorded[0] for r in recorded)  # every run records the resolved settings
    assert recorded[0]["textual_inversion"]["steps"] == 4 and recorded[0]["generation"]["num_inference_steps"] == 10
    assert str(tmp_path / "store") in out
    table = out.split("mean CLIP similarity per shift and class")[1].splitlines()
    assert table[1].split() == ["shift", "circle", "square"]
    assert table[3].startswith("base") and table[4].startswith("at_night")

    q = di("query", "--config", str(cfg),
           "SELECT class_key, count(*) AS n FROM scores GROUP BY class_key ORDER BY class_key").stdout
    assert [line.split() for line in q.splitlines()[2:]] == [["circle", "4"], ["square", "4"]]
    bad = di("query", "--config", str(cfg), "SELECT nope FROM scores", check=False)
    assert bad.returncode != 0 and "nope" in bad.stderr and "Traceback" not in bad.stderr

    assert "everything is up to date" in di("update", "--config", str(cfg), env=env).stdout
    (data / "circle" / next(iter(sorted((data / "circle").iterdir()))).name).unlink()  # circle changes
    up = di("update", "--config", str(cfg), env=env).stdout
    assert "  class_token: circle\n" in up and "  counterfactuals: circle|at_night, circle|base\n" in up
    assert "square" not in up


def test_verbose_runs_log_to_the_terminal_and_quiet_ones_to_a_bar():
    from di_assets.defs.progress import run_loggers

    quiet, verbose = run_loggers("x.log", False), run_loggers("x.log", True, log_level="DEBUG")
    assert quiet["loggers"]["console"]["config"]["log_level"] == "CRITICAL"
    assert quiet["loggers"]["di_assets_cli"]["config"]["bar"] is True
    assert verbose["loggers"]["console"]["config"]["log_level"] == "DEBUG"
    assert verbose["loggers"]["di_assets_cli"]["config"]["bar"] is False


def test_the_bar_follows_textual_inversion_steps_and_partitions():
    import io
    import logging

    from di_assets.defs.progress import _Bar

    class Terminal(io.StringIO):
        def isatty(self):  # a bar is drawn on a terminal only
            return True

    out = Terminal()
    bar = _Bar("run-1", "class_token", 2, out)

    def say(msg):
        bar.emit(logging.LogRecord("x", logging.INFO, "", 0, msg, None, None))

    say("<circle>: step 5/10, loss 0.1")
    say("<square>: step 5/10, loss 0.1")
    tqdm_bar = _Bar._bars["run-1"][0]
    assert (tqdm_bar.n, tqdm_bar.total, tqdm_bar.unit) == (15, 20, "step")
    say("circle / base: 4 images (3/8 partitions)")
    assert (tqdm_bar.n, tqdm_bar.total) == (3, 8)
    assert "class_token" in out.getvalue() and "<square>" in out.getvalue()


def test_query_before_any_run_says_what_to_do(tmp_path):
    p = di("query", "--storage", str(tmp_path), "SELECT 1", check=False)
    assert p.returncode != 0 and "run `di-assets run`" in p.stderr


def test_missing_config_file_is_one_clear_line(tmp_path):
    p = di("run", "--config", str(tmp_path / "nope.yaml"), check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr


def test_a_missing_classifier_file_stops_before_any_work(tmp_path):
    data = copy_classes(tmp_path / "data", per_class=2)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"dataset: {data}\nstorage: store\nclassifiers:\n"
                   "  - {name: r18, kind: torchvision, model: resnet18, weights: models/r18.safetensors}\n")
    p = di("run", "--config", str(cfg), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: classifiers[r18].weights: {tmp_path / 'models' / 'r18.safetensors'} does not exist")
    assert not (tmp_path / "store" / "tokens").exists()  # no stage ran


def test_report_before_any_diagnosis_says_what_to_do(tmp_path):
    p = di("report", "--storage", str(tmp_path), check=False)
    assert p.returncode != 0 and "di-assets run" in p.stderr and "Traceback" not in p.stderr


def test_export_encoder_root_in_the_papers_format(tmp_path, tiny):
    import torch

    from di_assets.cli import main
    from di_assets.ml.encoder_root import create_token_dictionary

    root = create_token_dictionary([torch.randn(32) * 0.1, torch.randn(32) * 0.1], ["<circle>", "<star>"],
                                   ["circle", "star"], tmp_path / "root", model=tiny)
    assert main(["export-encoder-root", "--src", str(root), str(tmp_path / "paper")]) == 0
    tokens = torch.load(tmp_path / "paper" / "tokens.pt", weights_only=True)
    assert tokens == {"initializer_words": ["circle", "star"], "tokens": ["<circle>", "<star>"]}
    assert (tmp_path / "paper" / "text_encoder").is_dir() and not (tmp_path / "paper" / "tokens.json").exists()


def test_query_formats_and_output_file(tmp_path):
    import csv
    import json

    import duckdb

    con = duckdb.connect(str(tmp_path / "scores.duckdb"))
    con.execute("CREATE TABLE scores AS SELECT * FROM (VALUES ('circle', 'at_night', 0.5), "
                "('a|b', 'base', 'nan'::DOUBLE)) t(class_key, shift, sim_class)")
    con.close()
    sql = "SELECT * FROM scores ORDER BY shift"
    out = di("query", "--storage", str(tmp_path), "--format", "json", sql).stdout
    assert json.loads(out) == [{"class_key": "circle", "shift": "at_night", "sim_class": 0.5},
                               {"class_key": "a|b", "shift": "base", "sim_class": None}]
    md = di("query", "--storage", str(tmp_path), "--format", "markdown", sql).stdout.splitlines()
    assert md[0] == "| class_key | shift | sim_class |" and md[2] == "| circle | at_night | 0.5000 |"
    assert md[3].startswith("| a\\|b | base |")  # a pipe in a value does not break the table
    p = di("query", "--storage", str(tmp_path), "--format", "csv", "--output", str(tmp_path / "o.csv"), sql)
    assert p.stdout == "" and "2 rows written" in p.stderr
    assert list(csv.reader(open(tmp_path / "o.csv")))[:2] == [["class_key", "shift", "sim_class"],
                                                              ["circle", "at_night", "0.5"]]
