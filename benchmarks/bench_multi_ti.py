"""Multi-class textual inversion: K classes trained together in one loop vs one after another.

    python benchmarks/bench_multi_ti.py                       # tiny model, CPU, K = 1 and 3, one thread
    python benchmarks/bench_multi_ti.py --ks 1,8,32 --device cuda --threads 0   # on a GPU

Each measurement runs in a fresh process (`DI_ASSETS_THREADS` threads, 1 by default), which loads
the models and warms up on a one-step run, then trains K classes (the bundled example's circle,
square and star, cycled for K > 3, each with its own token) for `--steps` steps:
- together: one `run_textual_inversion_many` call (one UNet pass over all K classes' images per step);
- separate: K `run_textual_inversion` calls, one after another.
The configurations are interleaved (K=1 separate, K=1 together, K=3 separate, ..., then again with
together first) and repeated `--reps` times; the table shows the median class-steps per second (at
K=1 both are the same code: their difference is the noise of the machine):
- run: K x steps over the whole call (per-class setup, latents, eval losses before and after);
- loop: K x (steps - 1) over the training steps only (from each class's first step to its last).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "di_assets" / "example_data"
SHAPES = ("circle", "square", "star")


def classes(k: int) -> list[tuple]:
    """K classes of the bundled example (cycled), each with its own token."""
    return [(EXAMPLE / SHAPES[i % 3], f"<bench-{i}>", SHAPES[i % 3], None) for i in range(k)]


def measure(mode: str, k: int, steps: int, device: str, family: str = "tiny", diffusion: str | None = None,
            dtype: str = "auto", **settings) -> dict:
    """Time K classes trained `mode` ("together" or "separate") in this process: class-steps per second
    over the whole run and over the training steps only. Loads and warms the models first.

    `diffusion`: a local diffusers folder (e.g. gpu_check's random-weight SD2, with family "sd",
    resolution 768, batch_size 1); `dtype`: ModelSpec.dtype; `settings`: TextualInversionConfig fields."""
    from di_assets.ml.models import ModelSpec
    from di_assets.ml.textual_inversion import (
        TextualInversionConfig, run_textual_inversion, run_textual_inversion_many,
    )

    spec = ModelSpec(family=family, device=device, diffusion=diffusion, dtype=dtype)
    cfg = TextualInversionConfig.for_family(family, steps=steps, **settings)
    run_textual_inversion(*classes(1)[0][:3], model=spec, config=TextualInversionConfig.for_family(
        family, steps=1, **settings))  # loads the models; warms the kernels
    first, last = {}, {}

    def tick(index, step, total, loss):
        now = time.perf_counter()
        if step == 1:
            first[index] = now
        if step == total:
            last[index] = now

    sync = _sync(device)
    sync()
    t0 = time.perf_counter()
    if mode == "together":
        results = run_textual_inversion_many(classes(k), model=spec, config=cfg, progress=tick)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        loop = max(last.values()) - min(first.values())
    else:
        loop = 0.0
        for i, c in enumerate(classes(k)):
            run_textual_inversion(*c[:3], model=spec, config=cfg,
                                  progress=lambda step, total, loss, i=i: tick(i, step, total, loss))
            loop += last[i] - first[i]
    sync()
    seconds = time.perf_counter() - t0
    return {"run": k * steps / seconds, "loop": k * (steps - 1) / loop if loop > 0 else float("nan"),
            "seconds": seconds}


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _worker(args) -> None:
    settings = {"batch_size": args.batch_size, "resolution": args.resolution}
    out = measure(args.mode, args.k, args.steps, args.device, args.family,
                  **{k: v for k, v in settings.items() if v is not None})
    print("RESULT " + json.dumps(out))


def _spawn(args, mode: str, k: int) -> dict:
    env = {**os.environ}
    if args.threads:
        env["DI_ASSETS_THREADS"] = str(args.threads)
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--k", str(k), "--steps", str(args.steps),
           "--device", args.device, "--family", args.family]
    for flag, value in (("--batch-size", args.batch_size), ("--resolution", args.resolution)):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{mode} K={k} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ks", default="1,3", help="class counts K, comma-separated (default 1,3)")
    ap.add_argument("--steps", type=int, default=30, help="steps per class (default 30)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the table shows the median (default 3)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    ap.add_argument("--family", default="tiny", choices=("tiny", "sd"), help="model family (default tiny)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per class and step (family default)")
    ap.add_argument("--resolution", type=int, default=64, help="training image size (default 64)")
    ap.add_argument("--threads", type=int, default=1,
                    help="DI_ASSETS_THREADS of each process (default 1; 0: leave the environment's)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("together", "separate"), help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        return _worker(args)

    ks = [int(k) for k in args.ks.split(",")]
    runs = {(mode, k): [] for k in ks for mode in ("separate", "together")}
    print(f"{args.family} on {args.device}, {args.steps} steps per class, {args.resolution} px, "
          f"DI_ASSETS_THREADS={args.threads or os.environ.get('DI_ASSETS_THREADS', 'unset')}, "
          f"{args.reps} interleaved repetitions in fresh processes", flush=True)
    for rep in range(args.reps):
        for k in ks:
            for mode in ("separate", "together")[::1 if rep % 2 == 0 else -1]:  # each goes first in turn
                r = _spawn(args, mode, k)
                runs[(mode, k)].append(r)
                print(f"  rep {rep + 1} K={k} {mode}: {r['seconds']:.1f} s, {r['run']:.2f} class-steps/s "
                      f"(loop {r['loop']:.2f})", flush=True)
    print()
    print("| K | separate: class-steps/s run (loop) | together: class-steps/s run (loop) | speed-up run (loop) |")
    print("|---|---|---|---|")
    for k in ks:
        med = {m: {q: statistics.median(r[q] for r in runs[(m, k)]) for q in ("run", "loop")}
               for m in ("separate", "together")}
        s, t = med["separate"], med["together"]
        print(f"| {k} | {s['run']:.2f} ({s['loop']:.2f}) | {t['run']:.2f} ({t['loop']:.2f}) | "
              f"{t['run'] / s['run']:.2f}x ({t['loop'] / s['loop']:.2f}x) |")


if __name__ == "__main__":
    main()
