"""Fault injection: `di-assets run` killed (SIGKILL) in the middle of every stage, one kill after the
other, then a run that completes; and two runs started together on one storage root.

After each, nothing is half-written (no temporary file left, every artifact reads back), nothing is
written outside the storage root, no run is left STARTED, and the results equal an undisturbed run's."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from di_assets_tests.conftest import copy_classes

CONFIG = """\
dataset: data
storage: {storage}
shifts: [base, at_night]
textual_inversion: {{steps: 6, checkpoint_every: 2}}
generation: {{num_samples: 2}}
"""

# Kill points, in the order the stages run: the moment a file of the stage appears (new since the
# process started), plus a random delay of up to 0.2 s, so that the kill lands inside the stage.
KILL_POINTS = [
    ("textual inversion, first checkpoint", "tokens/*/checkpoints/*"),
    ("textual inversion, between classes", "tokens/*/learned_embeds.safetensors"),
    ("encoder root", "encoder_root/*"),
    ("counterfactuals", "images/*/*/*.png"),
    ("clip scores", "scores/*/*/part.parquet"),
    ("scores_db", "scores.duckdb*"),
    ("real predictions", "real_predictions/*/*/part.parquet"),
    ("predictions", "predictions/*/*/*/part.parquet"),
    ("diagnosis", "diagnosis/*"),
]


def start(world: Path, storage: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "di_assets.cli", "run", "--config", str(world / f"{storage}.yaml")],
                            cwd=world, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"})


def new_files(root: Path, pattern: str, since: float) -> list[Path]:
    found = []
    try:
        paths = list(root.glob(pattern))
    except FileNotFoundError:  # a folder renamed away while the glob walked it (a live run's atomic_dir): poll again
        return found
    for p in paths:
        try:
            if p.stat().st_mtime >= since:
                found.append(p)
        except FileNotFoundError:  # renamed away between glob and stat
            pass
    return found


def outside(world: Path, storages: list[str]) -> dict[str, tuple]:
    """Every file of the test's world outside the storage roots: path -> (size, mtime)."""
    return {str(p.relative_to(world)): (p.stat().st_size, p.stat().st_mtime_ns) for p in world.rglob("*")
            if p.is_file() and p.relative_to(world).parts[0] not in storages}


def check_storage(root: Path) -> dict:
    """Nothing half-written, every artifact reads back; returns the results to compare."""
    import duckdb
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    leftovers = [str(p.relative_to(root)) for p in root.rglob("*")
                 if (".tmp-" in p.name or ".old-" in p.name) and ".dagster" not in p.parts]
    assert leftovers == []
    tokens = {}
    for f in sorted(root.glob("tokens/*/learned_embeds.safetensors")):
        (t,) = load_file(str(f)).values()
        assert torch.isfinite(t).all()
        tokens[f.parent.name] = t
    for png in root.rglob("*.png"):
        with Image.open(png) as im:
            im.load()
    scores = {}
    for f in sorted(root.rglob("*.parquet")):
        table = pq.read_table(f)
        assert table.num_rows > 0
        if f.parts[-4] == "scores":
            scores[str(f.relative_to(root))] = table.select(["seed", "sim_class", "sim_shift", "kept"]).to_pylist()
    con = duckdb.connect(str(root / "scores.duckdb"), read_only=True, config={"file_search_path": str(root)})
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert {"scores", "mean_scores", "predictions", "shift_failures"} <= views
    rows = con.execute("SELECT count(*) FROM scores").fetchone()[0]
    con.close()
    assert rows == 3 * 2 * 2
    return {"tokens": tokens, "scores": scores}


def no_run_left_started(root: Path) -> None:
    import dagster as dg

    instance = dg.DagsterInstance.local_temp(tempdir=str(root / ".dagster"))  # as the command opens it, minus
    # its clean-up of runs whose process died: this asks whether any was left behind
    running = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED,
                                                                dg.DagsterRunStatus.STARTING]))
    assert running == []


@pytest.fixture
def world(tmp_path) -> Path:
    copy_classes(tmp_path / "data", classes=("circle", "square", "star"), per_class=4)
    for storage in ("killed", "calm", "together"):
        (tmp_path / f"{storage}.yaml").write_text(CONFIG.format(storage=storage))
    return tmp_path


@pytest.mark.slow
def test_killed_in_every_stage_then_a_rerun_completes_with_nothing_lost(world):
    rng = random.Random(12)
    before = outside(world, ["killed", "calm"])
    calm = start(world, "calm")
    assert calm.wait(timeout=600) == 0, calm.stdout.read()
    root = world / "killed"
    fired = []
    for what, pattern in KILL_POINTS:
        t0 = time.time()
        p = start(world, "killed")
        while p.poll() is None and not new_files(root, pattern, t0):
            time.sleep(0.005)
        if p.poll() is None:
            time.sleep(rng.uniform(0, 0.2))
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            fired.append(what)
        else:
            assert p.returncode == 0, p.stdout.read()
    # nearly every stage writes a new file on a rerun, so nearly every kill lands
    assert len(fired) >= len(KILL_POINTS) - 2, fired
    print(f"killed in: {', '.join(fired)}")
    last = start(world, "killed")
    out = last.communicate(timeout=600)[0]
    assert last.returncode == 0, out

    killed, undisturbed = check_storage(root), check_storage(world / "calm")
    no_run_left_started(root)
    # resumed textual inversion and regenerated images give what an undisturbed run gives
    assert killed["tokens"].keys() == undisturbed["tokens"].keys() == {"circle", "square", "star"}
    for key, token in killed["tokens"].items():
        assert (token - undisturbed["tokens"][key]).abs().max() < 1e-5, key
    assert killed["scores"].keys() == undisturbed["scores"].keys()
    for part, rows in killed["scores"].items():
        assert [r["seed"] for r in rows] == [r["seed"] for r in undisturbed["scores"][part]]
        assert all(abs(a["sim_class"] - b["sim_class"]) < 1e-4 for a, b in zip(rows, undisturbed["scores"][part]))
    assert outside(world, ["killed", "calm"]) == before  # nothing written outside the storage roots


@pytest.mark.slow
def test_two_runs_started_together_on_one_storage_root_both_complete(world):
    before = outside(world, ["together"])
    procs = [start(world, "together") for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert any("waiting for the di-assets command" in o for o in outs)  # one waited for the other
    check_storage(world / "together")
    no_run_left_started(world / "together")
    assert outside(world, ["together"]) == before
