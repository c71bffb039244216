"""Textual-inversion step time: an old version of `di_assets/ml/textual_inversion.py` against the current one.

    python benchmarks/bench_ti_step.py --old /tmp/ti_old.py       # tiny model, 64 px, batch 8, CPU, one thread
    python benchmarks/bench_ti_step.py --old-rev b9a8088          # the old one from a commit (git show)
    python benchmarks/bench_ti_step.py --old /tmp/ti_old.py --profile   # and where a step's time goes
    python benchmarks/bench_ti_step.py --device cuda --threads 0 --classes 8   # on a GPU

Each measurement runs in a fresh process (`DI_ASSETS_THREADS` threads, 1 by default) that imports
one version of the module by its path (as `di_assets.ml._bench_ti`, so its relative imports resolve
to the installed package), loads the models and warms up on a one-step run, then trains `--classes`
classes of the bundled example (circle, square, star, cycled) for `--steps` steps with
`run_textual_inversion_many`. A step's time is the median interval between consecutive progress
calls of the first class (the eval passes before the first step and after the last are outside
it). The versions are interleaved (old, new; then new, old; ...) `--reps` times; the table shows
the median over the repetitions and the ratio old/new (above 1: the new code is faster).

`--profile` adds, per version, one more process that times the phases of each step (text-encoder
forward, UNet forward, backward, optimizer, and the rest of the step; the medians over the steps,
so they need not add up to the step's median) and prints torch.profiler's top operators by self
time over `--profile-steps` steps (eager only: the phase timers would break a compiled UNet).
"""

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
EXAMPLE = ROOT / "di_assets" / "example_data"
SHAPES = ("circle", "square", "star")
MODULE = ROOT / "di_assets" / "ml" / "textual_inversion.py"


def load_module(path: str):
    """The textual-inversion module at `path`, imported as a submodule of the installed `di_assets.ml`."""
    import importlib.util

    name = "di_assets.ml._bench_ti"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def classes(k: int) -> list[tuple]:
    return [(EXAMPLE / SHAPES[i % 3], f"<bench-{i}>", SHAPES[i % 3], None) for i in range(k)]


def _setup(args):
    ti = load_module(args.path)
    from di_assets.ml.models import ModelSpec

    spec = ModelSpec(family="tiny", device=args.device, compile=args.compile, channels_last=args.channels_last)
    settings = {"batch_size": args.batch_size, "resolution": args.resolution}
    ti.run_textual_inversion(*classes(1)[0][:3], model=spec, steps=1, **settings)  # load, warm up (and compile)
    return ti, spec, settings


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _worker(args) -> dict:
    ti, spec, settings = _setup(args)
    sync, ticks = _sync(args.device), []

    def tick(index, step, total, loss):
        if index == 0:
            sync()
            ticks.append(time.perf_counter())

    t0 = time.perf_counter()
    for r in ti.run_textual_inversion_many(classes(args.classes), model=spec, steps=args.steps, progress=tick,
                                           **settings):
        if isinstance(r, BaseException):
            raise r
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    return {"step": statistics.median(gaps), "run": time.perf_counter() - t0}


def _profile(args) -> dict:
    """Phase times of a step (median ms) and torch.profiler's top operators by self time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    ti, spec, settings = _setup(args)
    from di_assets.ml.models import load_base_text_encoder, load_diffusion_components

    _, text_encoder = load_base_text_encoder(spec)
    unet, _ = load_diffusion_components(spec)
    sync, events = _sync(args.device), []  # (start, seconds, phase)

    def timed(name, fn):
        def wrapper(*a, **kw):
            if not torch.is_grad_enabled():  # the eval passes are not a step's
                return fn(*a, **kw)
            sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            events.append((t, time.perf_counter() - t, name))
            return out
        return wrapper

    patches = [(text_encoder, "forward", "text encoder forward"), (unet, "forward", "UNet forward"),
               (torch.Tensor, "backward", "backward"), (torch.optim.AdamW, "step", "optimizer step")]
    originals = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, name in patches:
        setattr(obj, attr, timed(name, getattr(obj, attr)))
    ticks = []

    def tick(index, step, total, loss):
        if index == 0:
            sync()
            ticks.append(time.perf_counter())
    try:
        ti.run_textual_inversion_many(classes(args.classes), model=spec, steps=args.steps, progress=tick, **settings)
    finally:
        for obj, attr, fn in originals:
            setattr(obj, attr, fn)
    # per step (between two progress calls of the first class): each phase's time, and the rest
    rest = "rest (draws, noise, loss, hooks, reads, Python)"
    names = [name for _, _, name in patches] + [rest, "step"]
    per_step = {name: [] for name in names}
    for a, b in zip(ticks, ticks[1:]):
        inside = {name: sum(d for t, d, n in events if a <= t < b and n == name) for _, _, name in patches}
        for name, d in inside.items():
            per_step[name].append(d)
        per_step[rest].append(b - a - sum(inside.values()))
        per_step["step"].append(b - a)
    ms = {name: 1e3 * statistics.median(v) for name, v in per_step.items()}

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        ti.run_textual_inversion_many(classes(args.classes), model=spec, steps=args.profile_steps, **settings)
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60)
    return {"phases_ms": ms, "table": table}


def _spawn(args, path: str, mode: str) -> dict:
    env = {**os.environ}
    if args.threads:
        env["DI_ASSETS_THREADS"] = str(args.threads)
    cmd = [sys.executable, __file__, "--worker", mode, "--path", path, "--steps", str(args.steps),
           "--classes", str(args.classes), "--device", args.device, "--batch-size", str(args.batch_size),
           "--resolution", str(args.resolution), "--profile-steps", str(args.profile_steps), "--top", str(args.top)]
    cmd += ["--compile"] * args.compile + ["--channels-last"] * args.channels_last
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{path} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _committed_version(rev: str) -> str:
    """textual_inversion.py as commit `rev` has it, written to a temporary file (the baseline without --old)."""
    text = subprocess.run(["git", "show", f"{rev}:di_assets/ml/textual_inversion.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench_ti_")) / f"textual_inversion_{rev.replace('/', '_')}.py"
    path.write_text(text)
    return str(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--old", default=None, help="the old textual_inversion.py (default: --old-rev's)")
    ap.add_argument("--old-rev", default="HEAD", help="without --old: the commit whose version is the old one "
                    "(default HEAD)")
    ap.add_argument("--new", default=str(MODULE), help="the new one (default: the working tree's)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per measurement (default 30)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; the median is shown (default 3)")
    ap.add_argument("--classes", type=int, default=1, help="classes trained in one loop (default 1)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per class and step (default 8)")
    ap.add_argument("--resolution", type=int, default=64, help="training image size (default 64)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    ap.add_argument("--threads", type=int, default=1,
                    help="DI_ASSETS_THREADS of each process (default 1; 0: leave the environment's)")
    ap.add_argument("--compile", action="store_true", help="ModelSpec.compile (torch.compile the UNet)")
    ap.add_argument("--channels-last", action="store_true", help="ModelSpec.channels_last")
    ap.add_argument("--profile", action="store_true", help="also print each version's step phases and top operators")
    ap.add_argument("--profile-steps", type=int, default=10, help="steps under torch.profiler (default 10)")
    ap.add_argument("--top", type=int, default=20, help="operators in each profile table (default 20)")
    ap.add_argument("--worker", choices=("time", "profile"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.profile and args.compile:
        ap.error("--profile times the eager step; run it without --compile")
    if args.worker:
        sys.path.insert(0, str(ROOT))
        out = _worker(args) if args.worker == "time" else _profile(args)
        print("RESULT " + json.dumps(out))
        return

    versions = {"old": args.old or _committed_version(args.old_rev), "new": args.new}
    flags = " ".join(f for f, on in (("compile", args.compile), ("channels_last", args.channels_last)) if on)
    print(f"tiny model on {args.device}, {args.resolution} px, batch {args.batch_size}, {args.classes} class(es), "
          f"{args.steps} steps, DI_ASSETS_THREADS={args.threads or os.environ.get('DI_ASSETS_THREADS', 'unset')}"
          f"{', ' + flags if flags else ''}; old: {versions['old']}; new: {versions['new']}", flush=True)
    times = {v: [] for v in versions}
    for rep in range(args.reps):
        for v in ("old", "new")[::1 if rep % 2 == 0 else -1]:  # each goes first in turn
            r = _spawn(args, versions[v], "time")
            times[v].append(r["step"])
            print(f"  rep {rep + 1} {v}: {1e3 * r['step']:.1f} ms/step (whole run {r['run']:.1f} s)", flush=True)
    old, new = (statistics.median(times[v]) for v in ("old", "new"))
    print()
    print("| version | ms/step (median of %d) | runs |" % args.reps)
    print("|---|---|---|")
    for v, m in (("old", old), ("new", new)):
        print(f"| {v} | {1e3 * m:.1f} | {', '.join(f'{1e3 * t:.1f}' for t in times[v])} |")
    print(f"\nold/new: {old / new:.3f}x (above 1: the new code is faster)")
    if args.profile:
        for v in ("old", "new"):
            r = _spawn(args, versions[v], "profile")
            print(f"\n## {v}: median ms per step phase")
            for name, ms in r["phases_ms"].items():
                print(f"  {name:50s} {ms:8.2f}")
            print(f"\n## {v}: top operators over {args.profile_steps} steps (and the run's eval passes)")
            print(r["table"])


if __name__ == "__main__":
    main()
