"""The Dagster instance the command line uses: created once under a lock, and cleared of the runs that
a killed process left STARTED. Also the storage lock that makes two commands on one storage root
take turns instead of racing on the same files."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

import dagster as dg

log = logging.getLogger("di_assets")

# Every run the command line starts carries its process, so that a later command can tell a run whose
# process was killed (STARTED forever) from one that is still going.
PID_TAG = "di_assets/pid"
HOST_TAG = "di_assets/host"
STORAGE_LOCK = ".di-assets.lock"


def run_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


@contextlib.contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (released when the process ends, even if killed).

    Another holder makes this wait; with `waiting`, say so first (the holder's pid is in the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                f.seek(0)
                holder = f.read().strip() or "?"
                print(waiting.format(pid=holder), file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def storage_lock(storage: Path) -> contextlib.AbstractContextManager:
    """One `di-assets run` or `update` at a time per storage root; a second one waits its turn."""
    return file_lock(Path(storage) / STORAGE_LOCK,
                     waiting=f"waiting for the di-assets command (pid {{pid}}) that is working on {storage}")


def open_instance(storage: Path) -> dg.DagsterInstance:
    """$DAGSTER_HOME's instance if set, else one kept beside the artifacts (no telemetry banner).

    Its SQLite schema is created under a lock: two commands started together on a new storage root
    would otherwise both create the tables (`table ... already exists`)."""
    from di_assets.ml.io import atomic_path

    home = Path(os.environ["DAGSTER_HOME"]) if os.environ.get("DAGSTER_HOME") else Path(storage) / ".dagster"
    with file_lock(home / ".di-assets-instance.lock"):
        if os.environ.get("DAGSTER_HOME"):
            instance = dg.DagsterInstance.get()
        else:
            if not (home / "dagster.yaml").exists():
                with atomic_path(home / "dagster.yaml") as tmp:
                    tmp.write_text("telemetry:\n  enabled: false\n")
            instance = dg.DagsterInstance.local_temp(tempdir=str(home))
        # touch each storage now, while we hold the lock, so that every schema exists before others open it
        instance.get_runs(limit=1)
        instance.get_dynamic_partitions("classes")
        instance.get_latest_materialization_events([dg.AssetKey("class_token")])
        fail_dead_runs(instance)
    return instance


def _alive(pid: int) -> bool:
    from di_assets.ml.io import pid_alive

    if pid == os.getpid():  # nothing of ours runs yet: a run with our pid is from a dead process
        return False
    return pid_alive(pid)


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every run that a command on this host started and whose process is gone."""
    host = socket.gethostname()
    runs = instance.get_runs(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED],
        tags={HOST_TAG: host}))
    failed = []
    for run in runs:
        pid = run.tags.get(PID_TAG, "")
        if pid.isdigit() and not _alive(int(pid)):
            instance.report_run_failed(
                run, message=f"the process that ran it (pid {pid}) ended before the run did (killed?); "
                             "marked failed by the next di-assets command")
            failed.append(run.run_id)
    if failed:
        log.warning("marked %d run(s) failed whose process was killed: %s", len(failed), ", ".join(failed))
    return failed
