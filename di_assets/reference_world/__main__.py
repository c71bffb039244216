"""Retrain every model of the reference world from scratch, in one run, into the package's weights.

    python -m di_assets.reference_world [--out di_assets/reference_world/weights]

In order: the CLIP scorer, the judge classifier (every context), the classifier under
diagnosis (grass and beach only), then the text-to-image model, which the first two judge.
Each writes its weights and a .json record beside them; `training.json` records the whole run.
Takes about 50 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import train_classifier, train_clip, train_diffusion

WEIGHTS = Path(__file__).resolve().parent / "weights"

# The settings the shipped weights were made with (each script's defaults say the same).
STAGES = (
    ("clip", train_clip.main, []),
    ("judge", train_classifier.main, ["--contexts", "all"]),
    ("diagnosed", train_classifier.main, ["--contexts", "grass,beach"]),
    ("diffusion", train_diffusion.main, []),
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=WEIGHTS,
                    help="weights folder; the judges of the text-to-image model are read from the package's")
    args = ap.parse_args(argv)
    from di_assets.ml.io import write_json

    t0 = time.time()
    seconds = {}
    for name, run, stage_args in STAGES:
        print(f"== {name} ({time.time() - t0:.0f}s)", flush=True)
        out = args.out / (name if name == "diffusion" else f"{name}.safetensors")
        seconds[name] = run(stage_args + ["--out", str(out)])["seconds"]
    total = round(time.time() - t0, 1)
    write_json(args.out / "training.json", {"command": "python -m di_assets.reference_world",
                                            "seconds": seconds, "total_seconds": total})
    print(f"trained every model in {total:.0f}s: {seconds}")


if __name__ == "__main__":
    main()
