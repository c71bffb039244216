"""Draw the bundled example dataset (di_assets/example_data) from the reference world.

Three shape classes, 8 images each, on the plain background; each class has its own look (its
colour). One of them is the shape whose word the embedded text-to-image model never saw, so
only textual inversion can draw it. Deterministic: the same seed draws the same PNG files.
Run `python scripts/make_example_data.py`.
"""

import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from di_assets.reference_world.world import HIDDEN_SHAPE, Item, draw  # noqa: E402

OUT = ROOT / "di_assets" / "example_data"
CLASSES = {"circle": "red", "square": "blue", HIDDEN_SHAPE: "yellow"}  # class -> its colour
PER_CLASS, SEED = 8, 0


def main():
    rng = random.Random(SEED)
    if OUT.exists():
        shutil.rmtree(OUT)
    for shape, colour in CLASSES.items():
        (OUT / shape).mkdir(parents=True)
        for i in range(PER_CLASS):
            item = Item(shape, colour, "plain")
            draw(item, rng).save(OUT / shape / f"{shape}_{i:02d}.png", optimize=True)
    print(f"wrote {len(CLASSES) * PER_CLASS} images to {OUT}")


if __name__ == "__main__":
    main()
