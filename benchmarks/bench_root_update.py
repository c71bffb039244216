"""The encoder root after one class's token changed, at N classes: what the `encoder_root` asset and its
check do, against an older version, in fresh processes.

    python benchmarks/bench_root_update.py                          # 1,000 and 21,000 classes, 3 rounds
    python benchmarks/bench_root_update.py --classes 1000 --rounds 5 --old-rev d699a13

Once per N (in --dir, default a temporary folder): N empty class folders (the check discovers classes by
folder), N token files of the tiny model (one random 32-dim vector each) where the `class_token` asset
writes them, and an encoder root built by the current code. A copy of that storage is the old version's.

Then, round by round, each side in a fresh process with one thread (new, old; old, new; ...):
rewrite the middle class's token file, wait past the racy window, and time

  update s   the current `refresh_root` (what the asset does: only the token files whose signature changed
             since the root read them are read, the others kept as the root holds them); on the old side,
             what the asset did in --old-rev: read every token file and pass them all to
             `update_token_dictionary`;
  check s    `root_check_result`, the asset's check, in each version.

Imports (torch, transformers' CLIP classes, di_assets) are outside the timings.

The old side imports --old-rev's `di_assets` (`git archive` into a temporary folder, byte-compiled, first
on PYTHONPATH). The table gives the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBEDS = "learned_embeds.safetensors"


def keys_of(n: int) -> list[str]:
    return [f"c{i:05d}" for i in range(n)]


def storage_of(folder: Path):
    from di_assets.defs.resources import StorageResource

    return StorageResource(root=str(folder / "store"), dataset=str(folder / "data"))


def build(folder: Path, n: int) -> None:
    """N class folders and token files, and a root built by the current code (in this process)."""
    import torch

    from di_assets.defs.encoder_root import refresh_root
    from di_assets.ml.models import ModelSpec
    from di_assets.ml.textual_inversion import save_learned_embeds

    g = torch.Generator().manual_seed(0)
    for k in keys_of(n):
        (folder / "data" / k).mkdir(parents=True, exist_ok=True)
        path = folder / "store" / "tokens" / k / EMBEDS
        path.parent.mkdir(parents=True, exist_ok=True)
        save_learned_embeds(path, f"<{k}>", torch.randn(1, 32, generator=g))
    time.sleep(0.2)  # past the racy window: the root records every file's signature
    refresh_root(storage_of(folder), {k: k for k in keys_of(n)}, ModelSpec(family="tiny", device="cpu"))


def child(folder: Path, n: int, side: str) -> dict:
    """In a fresh process: change one token, then time the asset's update and its check."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401 - lazy modules: imported here, not timed

    from di_assets.defs.encoder_root import root_check_result
    from di_assets.ml.encoder_root import update_token_dictionary
    from di_assets.ml.models import ModelSpec
    from di_assets.ml.textual_inversion import load_learned_embeds, save_learned_embeds

    storage, keys, spec = storage_of(folder), keys_of(n), ModelSpec(family="tiny", device="cpu")
    middle = keys[n // 2]
    save_learned_embeds(Path(storage.token_dir(middle)) / EMBEDS, f"<{middle}>", torch.randn(1, 32))
    time.sleep(0.2)
    t0 = time.perf_counter()
    if side == "new":
        from di_assets.defs.encoder_root import refresh_root

        read = len(refresh_root(storage, {k: k for k in keys}, spec)[0])
    else:  # the asset before refresh_root: every token file read and passed
        tokens, embeds = zip(*(load_learned_embeds(Path(storage.token_dir(k)) / EMBEDS) for k in keys))
        update_token_dictionary(storage.encoder_root, list(embeds), list(tokens), keys, class_keys=keys, model=spec)
        read = len(keys)
    t1 = time.perf_counter()
    passed, _ = root_check_result(storage, keys)
    t2 = time.perf_counter()
    if not passed:
        raise SystemExit(f"the {side} side's root check failed after its update")
    return {"update": t1 - t0, "check": t2 - t1, "read": read}


def old_code(rev: str, into: Path) -> Path:
    """--old-rev's di_assets package, extracted and byte-compiled under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "di_assets"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(into / "di_assets")], check=True,
                   stdout=subprocess.DEVNULL)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", default="1000,21000", help="comma-separated class counts (default 1000,21000)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per N and side (default 3)")
    ap.add_argument("--old-rev", default="d699a13",
                    help="the version to compare with (default d699a13: the asset read every token file)")
    ap.add_argument("--dir", type=Path, help="where the storages are built (default: a temporary folder)")
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "N", "SIDE"), help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=2, metavar=("FOLDER", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), int(args.child[1]), args.child[2])))
        return
    if args.build:
        build(Path(args.build[0]), int(args.build[1]))
        return
    sizes = [int(x) for x in args.classes.split(",")]
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_root_update-"))
    env = {**os.environ, "DI_ASSETS_THREADS": "1", "OMP_NUM_THREADS": "1"}
    old_env = {**env, "PYTHONPATH": str(old_code(args.old_rev, work / "old-code"))}
    for n in sizes:
        new = work / f"n{n}-new"
        if not (new / "store" / "encoder_root").is_dir():
            print(f"building {n} classes in {new}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, "--build", str(new), str(n)], env=env, check=True)
        shutil.rmtree(work / f"n{n}-old", ignore_errors=True)
        shutil.copytree(new, work / f"n{n}-old")
    got: dict[tuple[int, str], list[dict]] = {}
    for r in range(args.rounds):
        for n in sizes:
            order = ("new", "old") if r % 2 == 0 else ("old", "new")
            for side in order:
                out = subprocess.run([sys.executable, __file__, "--child", str(work / f"n{n}-{side}"), str(n), side],
                                     env=env if side == "new" else old_env, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"the {side} side at {n} classes failed:\n{out.stderr[-3000:]}")
                m = json.loads(out.stdout.strip().splitlines()[-1])
                got.setdefault((n, side), []).append(m)
                print(f"round {r + 1} n={n} {side}: update {m['update']:.2f} s ({m['read']} token files read), "
                      f"check {m['check']:.2f} s", file=sys.stderr, flush=True)
    print(f"\nEncoder root after one class's token changed; medians of {args.rounds}, fresh processes, one thread;"
          f" old: {args.old_rev}\n")
    print("| classes | update s | old update s | check s | old check s | token files read | old |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        med = {(side, k): statistics.median(m[k] for m in got[(n, side)]) for side in ("new", "old")
               for k in ("update", "check", "read")}
        print(f"| {n:,} | {med['new', 'update']:.2f} | {med['old', 'update']:.2f} | {med['new', 'check']:.2f} | "
              f"{med['old', 'check']:.2f} | {med['new', 'read']:.0f} | {med['old', 'read']:.0f} |")


if __name__ == "__main__":
    main()
