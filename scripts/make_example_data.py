"""Draw the bundled example dataset (di_assets/example_data): 3 shape classes, 8 images each.

Deterministic: the same seed draws the same PNG files. Run `python scripts/make_example_data.py`.
"""

import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "di_assets" / "example_data"
SIZE, PER_CLASS, SEED = 64, 8, 0


def draw(shape: str, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(90, 230) for _ in range(3))
    fg = tuple(rng.randint(0, 80) if i != rng.randint(0, 2) else rng.randint(150, 255) for i in range(3))
    im = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(12, 22)
    cx, cy = rng.randint(r + 2, SIZE - r - 2), rng.randint(r + 2, SIZE - r - 2)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return im


def main():
    rng = random.Random(SEED)
    if OUT.exists():
        shutil.rmtree(OUT)
    for shape in ("circle", "square", "triangle"):
        (OUT / shape).mkdir(parents=True)
        for i in range(PER_CLASS):
            draw(shape, rng).save(OUT / shape / f"{shape}_{i:02d}.png", optimize=True)
    print(f"wrote {3 * PER_CLASS} images to {OUT}")


if __name__ == "__main__":
    main()
