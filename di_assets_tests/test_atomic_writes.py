"""A killed writer leaves only temporaries, and the next write of the same path removes them."""

import os
import signal
import subprocess
import sys
import time

from di_assets.ml.io import atomic_dir, atomic_path

WRITER = """
import sys, time
from pathlib import Path
from di_assets.ml.io import atomic_dir, atomic_path
target, kind = Path(sys.argv[1]), sys.argv[2]
with (atomic_path if kind == "file" else atomic_dir)(target) as tmp:
    (tmp / "half" if kind == "dir" else tmp).write_text("half")
    print("inside", flush=True)
    time.sleep(60)
"""


def _writer(target, kind):
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(target), kind], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "inside"
    return p


def _temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "loss.png"
    p = _writer(target, "file")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert _temporaries(tmp_path) and _temporaries(tmp_path)[0].startswith(f".loss.png.tmp-{p.pid}-")
    assert not target.exists()  # nothing half-written in its place
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and _temporaries(tmp_path) == []


def test_a_killed_writers_temporary_folder_is_removed_and_a_live_writers_is_kept(tmp_path):
    target = tmp_path / "base"
    dead, live = _writer(target, "dir"), _writer(target, "dir")
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    try:
        with atomic_dir(target) as tmp:
            (tmp / "0.png").write_text("image")
        assert (target / "0.png").read_text() == "image"
        left = _temporaries(tmp_path)
        assert len(left) == 1 and left[0].startswith(f".base.tmp-{live.pid}-")  # still being written
    finally:
        live.kill()
        live.wait()
    time.sleep(0.1)
    with atomic_dir(target) as tmp:
        (tmp / "1.png").write_text("image")
    assert _temporaries(tmp_path) == [] and sorted(p.name for p in target.iterdir()) == ["1.png"]
