"""Hostile keys, untrusted SQL, killed runs and concurrent commands: each gets one clear line or a safe
result, and nothing is written outside the storage root."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from di_assets_tests.test_cli import di


# --- keys that become paths and partitions -------------------------------------------------------

@pytest.mark.parametrize("key", ["../../../escaped", "it's", "a/b", "..", "a|b", "In_Grass", "", " x", "x" * 101,
                                 "a\nb", "-x", ".hidden"])
def test_a_hostile_shift_key_is_refused_before_any_work(tmp_path, key):
    import yaml

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"storage": "store", "shifts": [
        {"key": key, "prompt": "a photo of a <TOKEN>", "caption": "a photo"}]}))
    p = di("run", "--config", str(cfg), check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.count("\n") == 1 and "shift key" in p.stderr and "not a valid key" in p.stderr
    assert "Traceback" not in p.stderr
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # nothing written anywhere, in or out of the root


@pytest.mark.parametrize("name", ["../up", "A B", "x'y", "a/b", "-lead"])
def test_a_hostile_classifier_name_is_refused(name):
    from di_assets.ml.classifiers import ClassifierSpec

    with pytest.raises(ValueError, match="classifier name .* is not a valid key"):
        ClassifierSpec(name=name, kind="reference", model="judge")


@pytest.mark.parametrize("folder, key", [("Hot Dog, frank|2", "hot_dog_frank_2"), ("it's", "it_s"),
                                         ("-lead-", "lead"), ("a..b", "a..b"), ("n01440764", "n01440764")])
def test_class_folder_names_become_safe_keys(folder, key):
    from di_assets.ml.classes import check_key, class_key

    assert class_key(folder) == key == check_key("class key", key)


def test_a_class_folder_name_with_no_usable_letter_is_one_clear_error():
    from di_assets.ml.classes import class_key

    with pytest.raises(ValueError, match="gives an empty key; rename the folder"):
        class_key("日本")


def test_the_mean_scores_table_takes_keys_as_parameters(tmp_path, capsys):
    """A quote in a key (as in a database made by older versions) cannot break or change the query."""
    import duckdb

    from di_assets.cli import _print_mean_scores

    con = duckdb.connect(str(tmp_path / "scores.duckdb"))
    con.execute("CREATE TABLE scores AS SELECT 1")
    con.execute("CREATE TABLE mean_scores AS SELECT * FROM (VALUES ('it''s', 'base', 0.5, 0.25), "
                "('x\"); DROP TABLE scores; --', 'base', 0.1, 0.2)) t(class_key, shift, mean_sim_class, mean_sim_shift)")
    con.close()
    _print_mean_scores(tmp_path / "scores.duckdb", ["it's", 'x"); DROP TABLE scores; --'], ["base"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["shift", "it's"] and lines[2].split() == ["base", "0.500", "/", "0.250",
                                                                             "0.100", "/", "0.200"]


# --- di-assets query: SQL over the scores, and nothing else ---------------------------------------

@pytest.fixture
def scores_root(tmp_path) -> Path:
    """A storage root with one score file and the real `scores` views over it."""
    import duckdb

    from di_assets.defs.scores_db import HIVE, VIEWS

    root = tmp_path / "store"
    part = root / "scores" / "class=circle" / "shift=base"
    part.mkdir(parents=True)
    con = duckdb.connect(str(root / "scores.duckdb"))
    con.execute(f"COPY (SELECT 'circle' AS class_key, 'circle' AS class_name, 0 AS seed, 'x.png' AS image_path, "
                f"0.5 AS sim_class, 0.25 AS sim_shift, 0.4 AS sim_class_floor, 'circle' AS zero_shot_class, true AS kept, "
                f"NULL::VARCHAR AS drop_reason) TO '{part / 'part.parquet'}' (FORMAT parquet)")
    glob = str(root / "scores" / "*" / "*" / "*.parquet")
    for name, sql in VIEWS.items():
        con.execute(f"CREATE VIEW {name} AS {sql.format(glob=glob, hive=HIVE['class_shift'], unify='')}")
    con.close()
    (tmp_path / "secret.csv").write_text("secret\nSECRET-VALUE-7f1c\n")  # a value no temporary path can contain
    import shutil
    shutil.copy(root / "scores.duckdb", tmp_path / "other.duckdb")
    return root


def test_query_reads_the_views(scores_root):
    out = di("query", "--storage", str(scores_root), "--format", "csv",
             "SELECT class_key, shift, sim_class FROM scores").stdout
    assert out.splitlines() == ["class_key,shift,sim_class", "circle,base,0.5"]


@pytest.mark.parametrize("sql, says", [
    ("COPY (SELECT 1) TO '{out}/x.csv'", "not COPY"),
    ("COPY scores TO '{root}/scores/x.parquet'", "not COPY"),  # not even beside the scores
    ("SELECT * FROM read_csv('{out}/secret.csv')", "may read only the views' own files"),
    ("SELECT * FROM read_text('/etc/passwd')", "may read only the views' own files"),
    ("SELECT * FROM read_csv('{root}/scores/../../secret.csv')", "may read only the views' own files"),
    ("ATTACH '{out}/other.duckdb' AS o", "not ATTACH"),
    ("SELECT 1; ATTACH '{out}/other.duckdb' AS o", "not ATTACH"),
    ("INSTALL httpfs", "not LOAD"),
    ("LOAD httpfs", "not LOAD"),
    ("SET enable_external_access = true", "not SET"),
    ("PRAGMA enable_external_access", "not PRAGMA"),
    ("CREATE TABLE t AS SELECT 1", "not CREATE"),
    ("EXPORT DATABASE '{out}/dump'", "not EXPORT"),
    ("SELECT * FROM glob('/etc/*')", "may read only the views' own files"),
])
def test_query_cannot_touch_files_network_or_settings(scores_root, sql, says):
    out = scores_root.parent
    before = sorted(str(p) for p in out.rglob("*"))
    p = di("query", "--storage", str(scores_root), sql.format(out=out, root=scores_root), check=False)
    assert p.returncode != 0 and p.stderr.startswith("error:") and says in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and "SECRET-VALUE-7f1c" not in p.stdout + p.stderr and "root:" not in p.stdout
    assert sorted(str(p) for p in out.rglob("*")) == before  # no file written anywhere


def test_query_after_a_first_scores_db_was_killed_says_what_to_do(tmp_path):
    import duckdb

    duckdb.connect(str(tmp_path / "scores.duckdb")).close()  # the file exists, its views were never committed
    p = di("query", "--storage", str(tmp_path), "SELECT * FROM scores", check=False)
    assert p.returncode != 0 and "has no views yet" in p.stderr and "di-assets run" in p.stderr
    assert "does not exist!" not in p.stderr and p.stderr.count("\n") == 1


# --- the Dagster instance: created once, and no run left STARTED by a killed process ---------------

def test_commands_started_together_on_a_new_storage_root_share_one_instance(tmp_path):
    code = "import sys; from pathlib import Path; from di_assets.defs.instance import open_instance; " \
           "open_instance(Path(sys.argv[1])); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "store")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outs]
    assert all(o[0].strip() == "ok" for o in outs)


def test_a_run_whose_process_was_killed_is_marked_failed_on_the_next_start(tmp_path):
    import dagster as dg

    from di_assets.defs.instance import HOST_TAG, PID_TAG, open_instance, run_tags

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    instance = open_instance(tmp_path)

    @dg.op
    def noop():
        pass

    @dg.job
    def work():
        noop()

    def started(tags):  # what a killed process leaves behind: a run STARTED that never ends
        run = instance.create_run_for_job(work, tags=tags)
        instance.report_dagster_event(dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_START.value,
                                                      job_name=run.job_name), run_id=run.run_id)
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        return run.run_id

    killed = started({PID_TAG: str(dead.pid), HOST_TAG: run_tags()[HOST_TAG]})
    alive = started({PID_TAG: str(os.getppid()), HOST_TAG: run_tags()[HOST_TAG]})  # pytest's parent: alive
    elsewhere = started({PID_TAG: str(dead.pid), HOST_TAG: "another-host"})  # not ours to judge
    again = open_instance(tmp_path)
    status = {r: again.get_run_by_id(r).status.value for r in (killed, alive, elsewhere)}
    assert status == {killed: "FAILURE", alive: "STARTED", elsewhere: "STARTED"}
    failure = [e for e in again.all_logs(killed) if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE]
    assert failure and "ended before the run did" in failure[0].message


def test_a_second_command_on_one_storage_root_waits_its_turn(tmp_path):
    from di_assets.defs.instance import STORAGE_LOCK, storage_lock

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time; from pathlib import Path; from di_assets.defs.instance import storage_lock
        with storage_lock(Path({str(tmp_path)!r})):
            print('holding', flush=True); time.sleep(3)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    t = time.time()
    import io
    from contextlib import redirect_stderr
    err = io.StringIO()
    with redirect_stderr(err), storage_lock(tmp_path):
        waited = time.time() - t
    holder.wait()
    assert waited > 1.0 and f"(pid {holder.pid})" in err.getvalue() and "waiting for" in err.getvalue()
    assert (tmp_path / STORAGE_LOCK).exists()


# --- a diverging token stops the command, in one line ---------------------------------------------

def test_a_diverging_token_stops_the_run_with_one_line_and_no_images(tmp_path):
    from di_assets_tests.conftest import copy_classes

    copy_classes(tmp_path / "data", per_class=2)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("dataset: data\nstorage: store\nshifts: [base]\ntextual_inversion: {steps: 12, learning_rate: 1.0e+6}\n"
                   "generation: {num_samples: 1}\nclassifiers: []\n")
    p = di("run", "--config", str(cfg), check=False)
    assert p.returncode != 0, p.stdout
    error = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "class_token failed" in error[0] and "diverged at step" in error[0], p.stderr
    assert "learning_rate" in error[0] and "Traceback" not in p.stderr
    assert not list((tmp_path / "store").glob("tokens/*/learned_embeds.safetensors"))  # no token shipped
    assert not (tmp_path / "store" / "images").exists() and not (tmp_path / "store" / "encoder_root").exists()
