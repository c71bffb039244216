"""The cost of a rerun after one class changes, against a full materialization.

    python benchmarks/bench_rerun.py [--classes 10] [--shifts base,in_the_grass,in_the_snow,at_night]

Builds N classes from the bundled example (each rotated differently, so each is its own
class), materializes everything through the sensor and declarative automation, then changes
one file of one class and lets automation rerun what it affects. Expect about 1/N of the
work, plus the encoder root and the DuckDB views.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from di_assets.defs import build_defs  # noqa: E402
from di_assets.defs.driver import LocalDriver  # noqa: E402
from di_assets.settings import EXAMPLE_DATASET, Settings  # noqa: E402


def make_classes(dest: Path, n: int) -> None:
    images = sorted(EXAMPLE_DATASET.glob("*/*.png"))
    for i in range(n):
        folder = dest / f"class_{i:02d}"
        folder.mkdir(parents=True)
        for j, src in enumerate(images[i % 3 * 8:(i % 3 + 1) * 8]):
            Image.open(src).rotate(15 * i).save(folder / f"{j}.png")


def count(requested: dict) -> str:
    return ", ".join(f"{k} {len(v)}" for k, v in requested.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--shifts", default="base,in_the_grass,in_the_snow,at_night")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_classes(tmp / "data", args.classes)
        settings = Settings.load(dataset=str(tmp / "data"), storage=str(tmp / "store"),
                                 shifts=args.shifts.split(","), generation={"num_samples": 4})
        (tmp / "home").mkdir()
        with dg.instance_for_test(temp_dir=str(tmp / "home")) as instance:
            quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
            driver = LocalDriver(build_defs(settings), instance, quiet)
            driver.tick()
            # Warm-up: build the tiny models once, so that neither measurement pays for it.
            from di_assets.ml.models import ModelSpec, load_clip, load_diffusion_components

            load_diffusion_components(ModelSpec()), load_clip(ModelSpec())

            t = time.perf_counter()
            driver.sensor()
            full = driver.settle()
            t_full, runs_full = time.perf_counter() - t, driver.runs

            shutil.copy(tmp / "data" / "class_00" / "0.png", tmp / "data" / "class_03" / "extra.png")
            t = time.perf_counter()
            driver.observe()
            rerun = driver.settle()
            t_rerun, runs_rerun = time.perf_counter() - t, driver.runs - runs_full

    n = args.classes
    print(f"\n{n} classes x {len(args.shifts.split(','))} shifts, tiny models on CPU")
    print(f"  full materialization   {t_full:7.1f} s  {runs_full:3d} runs  ({count(full)})")
    print(f"  one class changed      {t_rerun:7.1f} s  {runs_rerun:3d} runs  ({count(rerun)})")
    print(f"  ratio                  {t_rerun / t_full:7.3f}     (1/N = {1 / n:.3f})")


if __name__ == "__main__":
    main()
