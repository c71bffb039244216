"""Incremental observation of class_images: a second observation against a full first one.

    python benchmarks/bench_observe.py [--classes 100,1000] [--images 5]

For each N, builds N class folders of tiny PNGs (8x8 noise) in a temporary folder, adds their
partitions to a temporary Dagster instance, and runs the observation job (observe_class_images,
as the schedule and `di-assets update` run it) four times:

    first        no memo yet: every folder hashed, every class observed
    unchanged    nothing changed: every folder listed, none hashed, nothing observed
    one changed  one file of one class rewritten: that folder hashed and observed
    full         DI_ASSETS_OBSERVE_FULL=1 on an unchanged dataset: every folder hashed again
                 (what each observation cost before the memo, less its N observations)

and prints one row per N: seconds per run, with the folders hashed and the observations logged.
Each time includes Dagster's own cost of a run in process (a second or so); the column "memo
only" times the memo's part of an unchanged observation alone (memo read, N listings). The last two
add what `di-assets run` and `update` do first, the preflight's check of the class folders
(cli._check_class_folders): "before", it walked every folder (every file's permissions, an image
opened per class) and the observation then listed each folder again; now it walks only the folders
the memo does not vouch for and hands its listings to the observation (observe.shared_listings);
three runs of each, interleaved, the median.
The old observation hashed every folder and logged every class's observation and check each
time: about the cost of "first".
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from di_assets.defs import CLASSES, build_defs  # noqa: E402
from di_assets.ml import observe  # noqa: E402
from di_assets.settings import Settings  # noqa: E402

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def make_classes(data: Path, n: int, per_class: int) -> list[str]:
    rng = np.random.default_rng(0)
    keys = [f"class_{i:04d}" for i in range(n)]
    for key in keys:
        (data / key).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(data / key / f"{j}.png")
    return keys


def run(defs, instance, store: Path) -> tuple[float, int, int]:
    """(seconds, folders hashed, observations logged) of one observation job."""
    memo = store / observe.MEMO
    before = json.loads(memo.read_text())["classes"] if memo.exists() else {}
    t = time.perf_counter()
    res = defs.resolve_job_def("observe_class_images").execute_in_process(instance=instance, run_config=QUIET)
    seconds = time.perf_counter() - t
    assert res.success
    after = json.loads(memo.read_text())["classes"]
    hashed = sum(1 for k, e in after.items() if before.get(k, {}).get("described_at") != e["described_at"])
    return seconds, hashed, len(res.get_asset_observation_events())


def bench(n: int, per_class: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        keys = make_classes(tmp / "data", n, per_class)
        settings = Settings.load(dataset=str(tmp / "data"), storage=str(tmp / "store"), shifts=["base"],
                                 classifiers=[])
        defs = build_defs(settings)
        (tmp / "home").mkdir()
        time.sleep(2 * observe.RACY_NS / 1e9)  # the files are older than a racy listing, as a dataset is
        with dg.instance_for_test(temp_dir=str(tmp / "home")) as instance:
            instance.add_dynamic_partitions(CLASSES.name, keys)
            rows = {"first": run(defs, instance, tmp / "store"),
                    "unchanged": run(defs, instance, tmp / "store")}
            changed = tmp / "data" / keys[n // 2] / "0.png"
            Image.new("RGB", (8, 8), "red").save(changed)
            time.sleep(2 * observe.RACY_NS / 1e9)
            rows["one changed"] = run(defs, instance, tmp / "store")
            os.environ[observe.FULL_ENV] = "1"
            try:
                rows["full"] = run(defs, instance, tmp / "store")
            finally:
                del os.environ[observe.FULL_ENV]
            rows["unchanged again"] = run(defs, instance, tmp / "store")
            folders = {k: tmp / "data" / k for k in keys}
            t = time.perf_counter()
            memo = observe.ObservationMemo(tmp / "store")
            hashed = sum(memo.describe(k, f)[1] for k, f in folders.items())
            rows["memo only"] = (time.perf_counter() - t, len(memo.described), hashed)
            runs = {"preflight + memo, before": [], "preflight + memo": []}
            for _ in range(3):  # interleaved, the median of each
                for label, got in runs.items():
                    got.append(preflight_then_memo(tmp / "data", tmp / "store", folders, label == "preflight + memo"))
            rows.update({label: sorted(got)[1] for label, got in runs.items()})
        return rows


def preflight_then_memo(data: Path, store: Path, folders: dict, shared: bool) -> tuple[float, int, int]:
    """What `di-assets run` and `update` do with the class folders before their stages: the preflight
    (cli._check_class_folders), then the memo's part of the observation. `shared`: as they do now (the
    preflight walks only folders the memo does not vouch for, and hands its listings on); else as
    before (the preflight walks every folder and the observation lists each again)."""
    from di_assets.cli import _check_class_folders

    t = time.perf_counter()
    with observe.shared_listings():
        _check_class_folders(str(data), str(store) if shared else None)
        memo = observe.ObservationMemo(store)
        hashed = sum(memo.describe(k, f)[1] for k, f in folders.items())
    return time.perf_counter() - t, len(memo.described), hashed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", default="100,1000", help="comma-separated numbers of classes (default 100,1000)")
    ap.add_argument("--images", type=int, default=5, help="images per class (default 5)")
    args = ap.parse_args()
    results = {int(n): bench(int(n), args.images) for n in args.classes.split(",")}
    cols = list(next(iter(results.values())))
    print(f"\nobserve_class_images, {args.images} images per class: seconds (folders hashed / observations logged)")
    print("(memo only: seconds (folders hashed / listings changed))")
    widths = [max(22, len(c) + 2) for c in cols]
    print(f"{'classes':>8}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths)))
    for n, rows in results.items():
        print(f"{n:>8}" + "".join(f"{f'{s:.2f} ({h} / {o})':>{w}}" for (s, h, o), w in zip(rows.values(), widths)))


if __name__ == "__main__":
    main()
