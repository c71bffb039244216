"""scores_db's gathering of the score rows (ml.score_rows.gather_score_rows) after one class changed,
at the paper's 50 images a class x shift pair, in fresh processes.

    python benchmarks/bench_score_rows.py [--classes 1000] [--shifts 24] [--images 50] [--dir /tmp/bsr]
    python benchmarks/bench_score_rows.py --code /tmp/old [...]      # A/B: also another checkout's di_assets
    python benchmarks/bench_score_rows.py --grains class_shift,class  # a file per pair against a file per class

bench_scale.py's stand-in flow writes 4 images a pair; this writes the score files alone (no images,
no Dagster), so that the rows cache holds what it holds at the paper's scale: 1,000 classes x 24
shifts x 50 images is 24,000 files and 1.2 million rows. The first run builds the tree under --dir
(about a minute at that size) and gathers it once per side, so that each side's cache exists. Each
measurement is then a fresh process (Arrow's pool of one thread; DuckDB as the flow runs it) that
rewrites every score file of one class with new scores (as clip_scores does: a temporary renamed
over the old file), waits out the racy window, and times gather_score_rows with the columns
scores_db reads, phase by phase:

    listing   the walk and os.stat of every score file
    load      reading the cache (rows and index)
    read      reading the changed class's files
    write     writing the cache again
    total     the whole call

With --code, each side has its own copy of the tree (the two versions' caches differ), and the sides
run interleaved (A, B, A, B); the table gives medians. --grains measures the layouts of the settings'
`partition_grain` side by side, each in its own tree: `class_shift` (a file per pair,
`scores/class=<c>/shift=<s>/part.parquet`) and `class` (a file per class, `scores/class=<c>/part.parquet`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["class_key", "class_name", "shift", "sim_class", "sim_shift", "kept"]  # scores_db's SUMMARY_INPUT
PHASES = {"listing": "_listed", "load": "_load", "read": "_read", "write": "_write"}


def score_table(key: str, shift: str, images: int, salt: int):
    """A score file's rows as clip_scores writes them (the columns the record reads, and the others)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(zlib.crc32(f"{key}|{shift}|{salt}".encode()))  # the same in every process
    sims = rng.uniform(-0.2, 0.5, (2, images)).astype(np.float32)
    return pa.table({
        "class_key": [key] * images, "class_name": [key.replace("_", " ")] * images, "shift": [shift] * images,
        "seed": pa.array(range(images), pa.int64()),
        "image_path": [f"counterfactuals/class={key}/shift={shift}/{i:05d}.jpg" for i in range(images)],
        "sim_class": sims[0], "sim_shift": sims[1], "kept": sims[0] > 0.0,
    })


def write_class(root: Path, key: str, shifts: list[str], images: int, salt: int, grain: str = "class_shift") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if grain == "class":  # one file of the class's shifts
        folder = root / "scores" / f"class={key}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".part.parquet.tmp"
        pq.write_table(pa.concat_tables([score_table(key, shift, images, salt) for shift in shifts]), tmp)
        os.replace(tmp, folder / "part.parquet")
        return
    for shift in shifts:
        folder = root / "scores" / f"class={key}" / f"shift={shift}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".part.parquet.tmp"
        pq.write_table(score_table(key, shift, images, salt), tmp)
        os.replace(tmp, folder / "part.parquet")


def layout(args) -> tuple[list[str], list[str]]:
    return [f"n{i:08d}" for i in range(args.classes)], [f"shift_{j:02d}" for j in range(args.shifts)]


def one(args) -> dict:
    """In this process: rewrite the middle class, time the gathering (called with --one)."""
    sys.path.insert(0, str(args.code or ROOT))
    import duckdb  # noqa: F401 - imported before the clock starts, as in a run
    import pyarrow  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from di_assets.ml import score_rows

    spent = dict.fromkeys(PHASES, 0.0)
    for phase, name in PHASES.items():
        def timed(*a, _f=getattr(score_rows, name), _p=phase, **k):
            start = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                spent[_p] += time.perf_counter() - start
        setattr(score_rows, name, timed)
    classes, shifts = layout(args)
    write_class(args.tree, classes[len(classes) // 2], shifts, args.images, time.time_ns(), args.grains)
    time.sleep(0.25)  # past the racy window (observe.RACY_NS): the rewritten files are trusted next time
    start = time.perf_counter()
    grain = {"grain": args.grains} if args.grains != "class_shift" else {}  # older versions know one layout
    rows = score_rows.gather_score_rows(args.tree, COLUMNS, **grain)
    total = time.perf_counter() - start
    if rows.table.num_rows != args.classes * args.shifts * args.images:
        raise SystemExit(f"gathered {rows.table.num_rows} rows, expected {args.classes * args.shifts * args.images}")
    return {"total": total, **spent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shifts", type=int, default=24)
    ap.add_argument("--images", type=int, default=50, help="score rows a class x shift pair (default 50)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_score_rows"), help="where the trees are kept")
    ap.add_argument("--rounds", type=int, default=5, help="measurements per side (default 5)")
    ap.add_argument("--code", type=Path, help="B: a checkout whose di_assets to measure as well")
    ap.add_argument("--grains", default="class_shift",
                    help="score file layouts to measure, comma-separated: class_shift (default), class")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    name = f"n{args.classes}_s{args.shifts}_i{args.images}"
    sides = {}  # side: (code, tree, grain)
    for grain in args.grains.split(","):
        suffix = "" if grain == "class_shift" else f"_{grain}"  # the trees of earlier runs keep their names
        sides[f"A{suffix}"] = (None, args.dir / name / f"A{suffix}", grain)
        if args.code:
            sides[f"B{suffix}"] = (args.code.resolve(), args.dir / name / f"B{suffix}", grain)
    classes, shifts = layout(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # Arrow's CPU pool takes its size from it
    for side, (code, tree, grain) in sides.items():
        if not (tree / "scores").is_dir():
            first = next(t for _, t, g in sides.values() if g == grain)
            if tree != first and (first / "scores").is_dir():
                shutil.copytree(first / "scores", tree / "scores")
            else:
                print(f"writing the score files of {len(classes)} classes under {tree} ...", file=sys.stderr)
                for key in classes:
                    write_class(tree, key, shifts, args.images, 0, grain)
        measure(args, code, tree, grain, env)  # once: this side's cache exists before the timed rounds
    got: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for side, (code, tree, grain) in sides.items():
            m = measure(args, code, tree, grain, env)
            got.setdefault(side, []).append(m)
            print(f"round {r + 1} {side}: " + ", ".join(f"{k} {v:.3f} s" for k, v in m.items()), file=sys.stderr)
    print(f"\ngather_score_rows after one class rewritten, {args.classes} classes x {args.shifts} shifts x "
          f"{args.images} images; medians of {args.rounds}, seconds\n")
    print("| side | code | layout | " + " | ".join(["total", *PHASES]) + " |")
    print("|---|---|---|" + "---|" * (1 + len(PHASES)))
    for side, ms in got.items():
        code, grain = sides[side][0] or ROOT, sides[side][2]
        print(f"| {side} | {code} | {grain} | " + " | ".join(f"{statistics.median(m[k] for m in ms):.3f}"
                                                  for k in ["total", *PHASES]) + " |")


def measure(args, code: Path | None, tree: Path, grain: str, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--one", "--tree", str(tree), "--classes", str(args.classes),
           "--shifts", str(args.shifts), "--images", str(args.images), "--grains", grain] + (
        ["--code", str(code)] if code else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the gathering in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
