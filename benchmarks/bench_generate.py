"""Time counterfactual generation over many (class, shift) pairs: one pair at a time vs batches
filled across pairs (`generate_many`, as the counterfactuals asset runs it), on the tiny model.

    python benchmarks/bench_generate.py                 # 3 classes x 4 shifts x 4 samples, batch 8
    python benchmarks/bench_generate.py --classes 5 --shifts 6 --samples 3 --batch-size 16 --runs 5

Every measurement is a fresh Python process (DI_ASSETS_THREADS=1 unless set otherwise), the two
ways interleaved (one, many, one, many, ...), the median of --runs each. A process loads the
pipeline and makes one 1-step image first (not timed), then times the generation of every pair's
--samples images (seeds 0..samples-1, the shifts' prompts of the ImageNet* catalog):

  one pair at a time   `generate_samples` per pair, as the counterfactuals asset did: a pair of 4
                       images fills half a batch of 8;
  across pairs         `generate_many` over all pairs: every batch full but the last.

It also prints how far the two ways' images are apart (each image has its own seed's generator
either way; another batch composition changes float rounding only). Nothing is downloaded: the
tiny models ship with the package (or are built into a temporary $DI_ASSETS_CACHE on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def jobs_of(args):
    from di_assets.ml.shifts import IMAGENET_STAR

    return [(c, s.prompt, range(args.samples)) for c in range(args.classes) for s in IMAGENET_STAR[:args.shifts]]


def make_root(args) -> None:
    import torch

    from di_assets.ml.encoder_root import create_token_dictionary
    from di_assets.ml.models import ModelSpec

    g = torch.Generator().manual_seed(0)
    create_token_dictionary([torch.randn(32, generator=g) for _ in range(args.classes)],
                            [f"<bench-{i}>" for i in range(args.classes)], [f"class {i}" for i in range(args.classes)],
                            args.root, model=ModelSpec(family="tiny", device="cpu"))


def child(args) -> None:
    import numpy as np
    import torch

    from di_assets.ml.generate import GenerationConfig, generate_many, generate_samples
    from di_assets.ml.models import ModelSpec

    spec = ModelSpec(family="tiny", device="cpu")
    cfg = GenerationConfig.for_family("tiny", batch_size=args.batch_size, num_inference_steps=args.steps)
    warm = GenerationConfig.for_family("tiny", num_inference_steps=1)
    generate_samples(args.root, 0, "a photo of a <TOKEN>", seeds=[0], model=spec, config=warm)  # pipeline loaded
    jobs = jobs_of(args)
    t = time.perf_counter()
    if args.mode == "one":
        out = [generate_samples(args.root, c, p, seeds=seeds, model=spec, config=cfg) for c, p, seeds in jobs]
    else:
        out = list(generate_many(args.root, jobs, model=spec, config=cfg))
    took = time.perf_counter() - t
    if args.save:
        np.save(args.save, np.stack([np.asarray(s.image) for samples in out for s in samples]))
    print(json.dumps({"seconds": took, "images": sum(len(x) for x in out), "threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--shifts", type=int, default=4, help="the first K shifts of the ImageNet* catalog (default 4)")
    ap.add_argument("--samples", type=int, default=4, help="images per (class, shift) pair (default 4)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    ap.add_argument("--steps", type=int, default=10, help="inference steps (default 10, the tiny default)")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per way; the median is reported (default 3)")
    ap.add_argument("--mode", choices=("one", "many"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--make-root", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_root:
        return make_root(args)
    if args.mode:
        return child(args)
    import numpy as np

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("DI_ASSETS_THREADS", "1")
    shape = ["--classes", str(args.classes), "--shifts", str(args.shifts), "--samples", str(args.samples),
             "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env.setdefault("DI_ASSETS_CACHE", str(tmp / "cache"))

        def call(*extra) -> dict | None:
            p = subprocess.run([sys.executable, __file__, *shape, "--root", str(tmp / "root"), *extra],
                               env=env, capture_output=True, text=True)
            if p.returncode:
                sys.exit(p.stdout + p.stderr)
            lines = p.stdout.strip().splitlines()
            return json.loads(lines[-1]) if lines else None

        call("--make-root")
        times: dict[str, list[float]] = {"one": [], "many": []}
        threads = images = None
        for i in range(args.runs):
            for mode in ("one", "many"):
                r = call("--mode", mode, "--save", str(tmp / f"{mode}.npy"))
                times[mode].append(r["seconds"])
                threads, images = r["threads"], r["images"]
                print(f"  run {i + 1} {mode:4}: {r['seconds']:.2f} s", flush=True)
        one, many = np.load(tmp / "one.npy").astype(np.int16), np.load(tmp / "many.npy").astype(np.int16)
    diff = np.abs(one - many)
    t1, t2 = statistics.median(times["one"]), statistics.median(times["many"])
    print(f"{args.classes} classes x {args.shifts} shifts x {args.samples} samples = {images} images, "
          f"batch size {args.batch_size}, {args.steps} steps, tiny model, {threads} thread(s), "
          f"median of {args.runs} fresh processes:")
    print(f"  one pair at a time  {t1:.2f} s  ({images / t1:.1f} images/s)")
    print(f"  across pairs        {t2:.2f} s  ({images / t2:.1f} images/s)   {t1 / t2:.2f}x")
    print(f"  images: max |difference| {int(diff.max())}/255, {int((diff > 0).sum())} of {diff.size} channel values "
          f"differ, in {int((diff.reshape(len(diff), -1).max(1) > 0).sum())} of {len(diff)} images")


if __name__ == "__main__":
    main()
