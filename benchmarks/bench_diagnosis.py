"""What the diagnosis costs: classifier throughput, and the example run with and without it.

    python benchmarks/bench_diagnosis.py throughput          # images/s, one thread, models loaded once
    python benchmarks/bench_diagnosis.py example --pairs 2   # `di-assets run` with vs without diagnosis

`throughput` times the embedded classifier (the reference world's `diagnosed`, 64 px) and a
ResNet-18 at 224 px (torchvision architecture, random weights from a local file: speed does not
depend on the weights), each loaded once, on the bundled example's images repeated.
`example` runs the main command in fresh processes, one thread each, interleaving the two sides
(with, without, with, without), and prints the median wall time of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def throughput(n: int) -> None:
    import torch
    from PIL import Image

    from di_assets.ml.classifiers import ClassifierSpec, load_classifier
    from di_assets.ml.diagnosis import predict_images

    torch.set_num_threads(1)
    example = sorted((ROOT / "di_assets" / "example_data").glob("*/*.png"))
    images = [Image.open(p).convert("RGB") for p in example] * (n // len(example) + 1)
    images = images[:n]
    tmp = Path(tempfile.mkdtemp())
    import torchvision
    from safetensors.torch import save_file

    save_file(torchvision.models.resnet18(num_classes=1000).state_dict(), str(tmp / "resnet18.safetensors"))
    specs = [ClassifierSpec(name="diagnosed", kind="reference", model="diagnosed", device="cpu"),
             ClassifierSpec(name="resnet18", kind="torchvision", model="resnet18",
                            weights=str(tmp / "resnet18.safetensors"), device="cpu")]
    print("| classifier | input | load (s, once per run) | images | images/s (1 thread) |")
    print("|---|---|---|---|---|")
    for spec in specs:
        t = time.perf_counter()
        clf = load_classifier(spec, class_names=["circle", "square", "star"])
        load = time.perf_counter() - t
        count = n if spec.kind == "reference" else min(n, 128)
        predict_images(clf, images[:8], 0)  # warm-up
        t = time.perf_counter()
        predict_images(clf, images[:count], 0)
        rate = count / (time.perf_counter() - t)
        size = "64 px" if spec.kind == "reference" else "224 px"
        print(f"| {spec.name} | {size} | {load:.2f} | {count} | {rate:.0f} |")


def example(pairs: int, shifts: str | None) -> None:
    def run(with_diagnosis: bool) -> float:
        tmp = Path(tempfile.mkdtemp(prefix="di-bench-"))
        (tmp / "home").mkdir()
        cfg = tmp / "config.yaml"
        cfg.write_text("" if with_diagnosis else "classifiers: []\n")
        cmd = [sys.executable, "-m", "di_assets.cli", "run", "--config", str(cfg), "--storage", str(tmp / "store"),
               "--dataset", str(ROOT / "di_assets" / "example_data")]
        if shifts:
            cmd += ["--shifts", shifts]
        env = {**os.environ, "DAGSTER_HOME": str(tmp / "home"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t

    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(pairs):
        for side in (True, False):
            times[side].append(run(side))
            print(f"pair {i + 1}: {'with' if side else 'without'} diagnosis {times[side][-1]:.1f} s", flush=True)
    a, b = statistics.median(times[True]), statistics.median(times[False])
    print("\n| run | median wall time (s) |\n|---|---|")
    print(f"| `di-assets run`, with diagnosis (2 classifiers) | {a:.1f} |")
    print(f"| `di-assets run`, `classifiers: []` | {b:.1f} |")
    print(f"| ratio | {a / b:.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput", help="classifier images/s, models loaded once")
    t.add_argument("--images", type=int, default=1024)
    e = sub.add_parser("example", help="the main command with vs without diagnosis, interleaved")
    e.add_argument("--pairs", type=int, default=2)
    e.add_argument("--shifts", help="comma-separated shift keys (default: all 24)")
    args = ap.parse_args(argv)
    if args.what == "throughput":
        throughput(args.images)
    else:
        example(args.pairs, args.shifts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
