"""How good is the CLIP filter? Judge every counterfactual of the bundled example with the
reference world's judge (a shape classifier trained on every context), and compare with what
the filter kept.

    python benchmarks/bench_filter.py                      # runs `di-assets run` on the example first
    python benchmarks/bench_filter.py --storage /tmp/ex    # an existing storage root of the example

precision: among kept images, the share the judge calls the right shape (failed generations
dropped); recall: among images the judge calls right, the share kept (good images not lost).
Each rule is computed from the same scores (`zero_shot_class`, `sim_class_floor` and `sim_base`
are stored), so the default rule is shown beside its parts and the old rule (keep everything).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

WORLD_SHIFTS = ["base", "in_the_grass", "in_the_beach", "in_the_snow", "in_the_water", "at_night"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", help="storage root of a finished example run (default: run one in a temp folder)")
    args = ap.parse_args(argv)
    if args.storage:
        storage = Path(args.storage)
    else:
        storage = Path(tempfile.mkdtemp(prefix="di-filter-")) / "store"
        print(f"running the example into {storage} ...", flush=True)
        subprocess.run([sys.executable, "-m", "di_assets.cli", "run", "--storage", str(storage)], check=True,
                       stdout=subprocess.DEVNULL, env={**__import__("os").environ,
                                                        "DAGSTER_HOME": str(storage.parent)})

    import duckdb
    from PIL import Image

    from di_assets.reference_world.judge import judge_shapes

    con = duckdb.connect(str(storage / "scores.duckdb"), read_only=True,
                          config={"file_search_path": str(storage.resolve())})
    rows = con.execute("SELECT class_key, shift, image_path, kept, zero_shot_class = class_key AS zs, "
                       "shift = 'base' OR sim_shift > sim_base AS sb, "
                       "sim_class_floor IS NULL OR sim_class >= sim_class_floor AS fl FROM scores ORDER BY ALL").fetchall()
    images = []
    for r in rows:
        with Image.open(storage / r[2]) as im:  # image_path is relative to the storage root
            images.append(im.convert("RGB"))
    right = [j == r[0] for j, r in zip(judge_shapes(images), rows)]
    rules = {
        "keep all (old default)": [True] * len(rows),
        "zero-shot class only": [r[4] for r in rows],
        "calibrated class floor only": [r[6] for r in rows],
        "zero-shot and floor": [r[4] and r[6] for r in rows],
        "shift beats base only": [r[5] for r in rows],
        "default: all three (as stored in `kept`)": [r[3] for r in rows],
    }
    print(f"\n{len(rows)} images, {sum(right)} of them the right shape by the judge ({sum(right) / len(rows):.1%})\n")
    print(f"| rule | shifts | kept | precision (judge right among kept) | recall (kept among judge right) |")
    print("|---|---|---|---|---|")
    for label, keep in rules.items():
        for scope, sel in (("all 24", lambda r: True), ("the world's 6", lambda r: r[1] in WORLD_SHIFTS)):
            idx = [i for i, r in enumerate(rows) if sel(r)]
            kept = [i for i in idx if keep[i]]
            good = [i for i in idx if right[i]]
            precision = sum(right[i] for i in kept) / len(kept) if kept else float("nan")
            recall = sum(keep[i] for i in good) / len(good) if good else float("nan")
            print(f"| {label} | {scope} | {len(kept)}/{len(idx)} | {precision:.1%} | {recall:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
