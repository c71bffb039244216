"""Dagster's Postgres storage, on a real PostgreSQL server that the test starts itself.

The server is Debian's (package `postgresql`, which scripts/test_tools.sh installs): its binaries are found on
PATH or under /usr/lib/postgresql/*/bin. `initdb` makes a cluster in a temporary folder with a password
for its superuser, and `pg_ctl` starts it on a free port of 127.0.0.1 (its socket in the same folder).
initdb and postgres refuse to run as root, so as root the server runs as the `postgres` user. Each test
gets a database of its own, and the server stops at the end of the module, even when a test fails.

The instance is configured as the README says (section "Many classes: Postgres storage"): its
dagster.yaml snippet, as written there, with the credentials in DAGSTER_PG_* variables. Without a server
(or a user to run it as, or psycopg2) the tests skip, except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from di_assets_tests.conftest import copy_classes

ROOT = Path(__file__).resolve().parent.parent
SERVER_USER = "postgres"  # the system user Debian's package creates
SUPERUSER = "di_assets"


def _unavailable(why: str):
    """No server: a clear failure under CI, a skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why}; the Postgres test needs it in CI (`bash scripts/test_tools.sh` installs Debian's "
                    "`postgresql` package and the `postgres` extra)", pytrace=False)
    pytest.skip(f"{why} (`bash scripts/test_tools.sh` installs it)")


def _server_bin() -> Path:
    """The folder holding initdb, pg_ctl and postgres: from PATH (Debian links them into it, or not),
    else the newest /usr/lib/postgresql/<version>/bin."""
    candidates = []
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(os.path.realpath(found)).parent)
    candidates += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for d in candidates:
        if all(os.access(d / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return d
    _unavailable("no PostgreSQL server (initdb, pg_ctl and postgres on PATH or in /usr/lib/postgresql/*/bin; "
                 "Debian package `postgresql`)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A PostgreSQL cluster in a temporary folder, run as a non-root user."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.user = None  # run as ourselves
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                _unavailable(f"the tests run as root, and initdb and postgres refuse root, but there is no "
                             f"`{SERVER_USER}` system user to run them as (Debian's `postgresql` package makes it)")
        self.dir = Path(tempfile.mkdtemp(prefix="di-pg-"))  # short: the socket's path has a length limit
        if self.user:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data, self.log = self.dir / "data", self.dir / "server.log"
        self.password = secrets.token_hex(12)
        self.port = None

    def _run(self, *cmd, timeout=120) -> subprocess.CompletedProcess:
        kw = {}
        if self.user:
            kw = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        p = subprocess.run([str(c) for c in cmd], cwd=self.dir, capture_output=True, text=True, timeout=timeout,
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}, **kw)
        if p.returncode:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout}{p.stderr}{log}")
        return p

    def start(self) -> None:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self.user:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        self._run(self.bin / "initdb", "-D", self.data, "-U", SUPERUSER, "--pwfile", pwfile,
                  "--auth", "scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        for attempt in range(3):  # a free port can be taken between the probe and the start
            self.port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            try:
                self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options,
                          "-w", "-t", "60", "start")
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", timeout=60)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def connect(self, db: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, password=self.password, dbname=db)

    def database_size(self, db: str, compact: bool = False) -> int:
        """pg_database_size of `db`; `compact`: after VACUUM FULL, so its live rows only, without the
        space that updated rows leave until autovacuum reuses it (the benchmarks compare both)."""
        conn = self.connect(db)
        try:
            conn.autocommit = True  # VACUUM runs outside a transaction
            with conn.cursor() as cur:
                if compact:
                    cur.execute("VACUUM FULL")
                cur.execute("SELECT pg_database_size(current_database())")
                return cur.fetchone()[0]
        finally:
            conn.close()

    def create_database(self, name: str) -> None:
        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def dagster_home(self, home: Path, db: str) -> dict[str, str]:
        """A new database `db` and in `home` (made) the dagster.yaml the README's Postgres section gives:
        the project's dagster.yaml (the gpu pool) with the snippet added. The environment that opens it."""
        self.create_database(db)
        home.mkdir(parents=True)
        (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text() + "\n" + readme_snippet()
                                           + "\ntelemetry:\n  enabled: false\n")
        return {"DAGSTER_HOME": str(home), **self.env(db)}

    def env(self, db: str) -> dict[str, str]:
        """The variables the README's dagster.yaml snippet reads."""
        return {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_DB": db,
                "DAGSTER_PG_USERNAME": SUPERUSER, "DAGSTER_PG_PASSWORD": self.password}


@pytest.fixture(scope="module")
def postgres_server(request):
    for module in ("psycopg2", "dagster_postgres"):
        try:
            __import__(module)
        except ImportError:
            _unavailable(f"the Python package {module} is not installed (the `postgres` extra, in `dev`)")
    server = Server(_server_bin())
    request.addfinalizer(server.stop)  # stops the server (and removes its folder) even when a test fails
    server.start()
    return server


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Many classes: Postgres storage"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def pg_home(postgres_server, tmp_path, monkeypatch, request):
    """A DAGSTER_HOME whose instance lives in a new database of the server, set in this process too."""
    db = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    snippet = readme_snippet()
    assert "storage:\n  postgres:\n    postgres_db:" in snippet, snippet
    home = tmp_path / "home"
    env = postgres_server.dagster_home(home, db)  # as the README says
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return home, db, env


def _rows(server: Server, db: str, sql: str, params=()) -> list[tuple]:
    conn = server.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def _tables(server: Server, db: str) -> set[str]:
    return {r[0] for r in _rows(server, db, "SELECT table_name FROM information_schema.tables "
                                            "WHERE table_schema = 'public'")}


def test_the_instance_opens_on_a_real_postgres_server(postgres_server, pg_home, tmp_path):
    import dagster as dg
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    from di_assets.defs.instance import open_instance

    home, db, _ = pg_home
    instance = open_instance(tmp_path / "store")  # the command line's way in: $DAGSTER_HOME's instance
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        instance.add_dynamic_partitions("classes", ["circle", "square"])
    finally:
        instance.dispose()
    tables = _tables(postgres_server, db)
    assert {"runs", "event_logs", "dynamic_partitions", "asset_keys", "jobs", "job_ticks"} <= tables, tables
    parts = _rows(postgres_server, db, "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'classes'")
    assert sorted(p[0] for p in parts) == ["circle", "square"]
    again = dg.DagsterInstance.get()  # a second process's view: the schema exists, the partitions are there
    try:
        assert again.get_dynamic_partitions("classes") == ["circle", "square"]
    finally:
        again.dispose()
    assert not list(home.rglob("*.db")), "no SQLite file: every record is in Postgres"


def di(*args, env, check=True, timeout=600) -> subprocess.CompletedProcess:
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "di_assets.cli", *args], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=timeout)
    print(f"di-assets {args[0]}: exit {p.returncode} in {time.time() - t:.1f}s")
    if check and p.returncode:
        raise AssertionError(p.stdout + p.stderr)
    return p


@pytest.mark.slow
def test_the_flow_runs_on_postgres_storage(postgres_server, pg_home, tmp_path):
    import dagster as dg

    home, db, env = pg_home
    copy_classes(tmp_path / "data", per_class=4)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("dataset: data\nstorage: store\nshifts: [base, at_night]\n"
                   "textual_inversion: {steps: 4}\ngeneration: {num_samples: 2}\nclassifiers: []\n")
    out = di("run", "--config", str(cfg), env=env).stdout
    assert "2 classes (circle, square)" in out and "counterfactuals + clip_scores: 2 classes x 2 shifts" in out
    assert not list(home.rglob("*.db")), "no SQLite file: every record is in Postgres"

    classes, cells = {"circle", "square"}, {f"{c}|{s}" for c in ("circle", "square") for s in ("base", "at_night")}
    instance = dg.DagsterInstance.get()
    try:
        assert type(instance.run_storage).__module__.startswith("dagster_postgres")
        runs = instance.get_runs()
        statuses = [(r.job_name, r.status) for r in runs]
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), statuses
        assert instance.get_dynamic_partitions("classes") == ["circle", "square"]
        assert instance.get_materialized_partitions(dg.AssetKey("class_token")) == classes
        for asset in ("counterfactuals", "clip_scores"):
            assert instance.get_materialized_partitions(dg.AssetKey(asset)) == cells, asset
        assert instance.get_latest_materialization_event(dg.AssetKey("scores_db")) is not None
    finally:
        instance.dispose()

    # ... and the same, read from Postgres's own tables
    def materializations() -> dict[str, list]:
        rows = _rows(postgres_server, db, "SELECT asset_key, partition FROM event_logs "
                                          "WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
        got: dict[str, list] = {}
        for key, partition in rows:
            got.setdefault(json.loads(key)[-1], []).append(partition)
        return got

    def run_rows() -> list[tuple]:
        return _rows(postgres_server, db, "SELECT run_id, pipeline_name, status FROM runs ORDER BY create_timestamp")

    mats, runs_before = materializations(), run_rows()
    assert sorted(mats["class_token"]) == sorted(classes)
    assert sorted(mats["counterfactuals"]) == sorted(cells) and sorted(mats["clip_scores"]) == sorted(cells)
    assert len(mats["encoder_root"]) == 1 and len(mats["scores_db"]) == 1
    assert len(runs_before) == len(runs) and {r[2] for r in runs_before} == {"SUCCESS"}
    parts = _rows(postgres_server, db, "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'classes'")
    assert sorted(p[0] for p in parts) == ["circle", "square"]
    (events,) = _rows(postgres_server, db, "SELECT count(*) FROM event_logs")[0]
    print(f"postgres: {len(runs_before)} runs, {events} event rows")

    # nothing changed: update materializes nothing (its one run observes the class folders)
    up = di("update", "--config", str(cfg), env=env).stdout
    assert "everything is up to date" in up and "\n0 runs in" in up, up
    assert materializations() == mats
    new = [r for r in run_rows() if r not in runs_before]
    assert all(r[1] == "observe_class_images" and r[2] == "SUCCESS" for r in new), new

    q = di("query", "--config", str(cfg),
           "SELECT class_key, count(*) AS n FROM scores GROUP BY class_key ORDER BY class_key", env=env).stdout
    assert [line.split() for line in q.splitlines()[2:]] == [["circle", "4"], ["square", "4"]]
