"""`di-assets update` after one class changed, on storages that bench_scale.py kept, in fresh processes.

    python benchmarks/bench_scale.py --classes 10 --grain class --keep /tmp/bs10       # once each
    python benchmarks/bench_scale.py --classes 1000 --grain class --keep /tmp/bs1000
    python benchmarks/bench_update.py /tmp/bs10/n10_s24_class /tmp/bs1000/n1000_s24_class \
        [--rounds 3] [--ab DI_ASSETS_GC_THRESHOLD=700,10,10]

Each measurement is a fresh process (one torch thread) that loads the flow with bench_scale's stand-in
models, runs one `di-assets update` to settle (and to import what an update imports), rewrites one image
of the middle class, and times the next `di-assets update`, with the time Python's garbage collector
spent in it (gc.callbacks). Storages and, with --ab, the two sides (A: the environment as it is; B: with
VAR=VALUE) are interleaved round by round (A, B, A, B), and the table gives the medians. The middle
class's image is inverted on every change, so each update reruns that class.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(kept: Path) -> dict:
    """In this process: settle, change one class, time the update (called with --one)."""
    import contextlib
    import gc
    import io
    import logging
    import warnings

    sys.path.insert(0, str(HERE))
    for var in ("DAGSTER_HOME", "DI_ASSETS_CONFIG", "DI_ASSETS_STORAGE", "DI_ASSETS_EXECUTOR"):
        os.environ.pop(var, None)
    warnings.filterwarnings("ignore", message=".*is currently in beta")
    logging.getLogger("dagster").setLevel(logging.WARNING)
    import bench_scale

    bench_scale.install_stand_ins()
    config = str(kept / "settings.yaml")
    echoed = io.StringIO()  # bench_scale.cli echoes the command's output to stderr: shown only on a failure
    spent, counts, started = [0.0], [0, 0, 0], [0.0]

    def watch(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - started[0]
            counts[info["generation"]] += 1

    try:
        with contextlib.redirect_stderr(echoed):
            bench_scale.cli("update", "--config", config)
            changed = bench_scale.change_one_class(kept / "data")
            gc.callbacks.append(watch)
            elapsed, text = bench_scale.cli("update", "--config", config)
            gc.callbacks.remove(watch)
    except BaseException:
        sys.stderr.write(echoed.getvalue())
        raise
    reran = bench_scale.describe_reruns(bench_scale.parse_update(text), changed)
    return {"seconds": elapsed, "gc_seconds": spent[0], "collections": counts, "changed": changed, "reran": reran}


def measure(kept: Path, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", str(kept)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the update on {kept} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kept", nargs="+", type=Path,
                    help="storages kept by bench_scale.py --keep DIR (DIR/n<classes>_s<shifts>_<grain>)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per storage and side (default 3)")
    ap.add_argument("--ab", metavar="VAR=VALUE", help="also measure with VAR=VALUE in the environment (side B)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.kept[0])))
        return
    for kept in args.kept:
        if not (kept / "settings.yaml").is_file():
            ap.error(f"{kept} is not a storage kept by bench_scale.py (no settings.yaml in it)")
    base = {**os.environ, "DI_ASSETS_THREADS": "1", "OMP_NUM_THREADS": "1"}
    sides = {"A": base}
    if args.ab:
        var, _, value = args.ab.partition("=")
        sides["B"] = {**base, var: value}
    got: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for kept in args.kept:
            for side, env in sides.items():
                m = measure(kept, env)
                got.setdefault((kept.name, side), []).append(m)
                print(f"round {r + 1} {kept.name} {side}: {m['seconds']:.2f} s, gc {m['gc_seconds']:.2f} s "
                      f"{m['collections']}, reran {m['reran']}", file=sys.stderr, flush=True)
    print(f"\n`di-assets update` after one class changed; medians of {args.rounds}"
          + (f"; B: {args.ab}" if args.ab else "") + "\n")
    print("| storage | side | update s | of it, garbage collection s | full collections |")
    print("|---|---|---|---|---|")
    for (name, side), ms in got.items():
        print(f"| {name} | {side} | {statistics.median(m['seconds'] for m in ms):.2f} | "
              f"{statistics.median(m['gc_seconds'] for m in ms):.2f} | "
              f"{statistics.median(m['collections'][2] for m in ms):.0f} |")


if __name__ == "__main__":
    main()
