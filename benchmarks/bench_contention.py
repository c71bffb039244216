"""Fair under contention: torch threads sized to the process's CPUs, and idle OpenMP threads asleep.

    python benchmarks/bench_contention.py                 # textual-inversion steps, alone and beside a busy process
    python benchmarks/bench_contention.py --example       # also: two `di-assets run`s of the example started together
    python benchmarks/bench_contention.py --only-example --example-shifts all --example-steps 0   # the README's run

Steps: a fresh process times textual-inversion steps of the tiny model (64 px, batch 8), alone and
while a second process trains too, in two configurations, interleaved (A, B, A, B) and repeated:
- before: OpenMP's default wait policy (idle threads spin) with torch's own thread count;
- now: what di-assets sets (OMP_WAIT_POLICY=PASSIVE, threads = the CPUs the process may use).
It prints the median seconds per step and the slowdown beside the other process.

--example: `di-assets run` of the bundled example (3 classes; --shifts and --steps make it shorter)
alone, then two started together on separate storage roots; the target (issue 15) is that each of
the two finishes within 2.5x of the one alone.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEP = """
import sys, time
from pathlib import Path
from di_assets.ml.models import ModelSpec
from di_assets.ml.textual_inversion import TextualInversionConfig, run_textual_inversion
spec = ModelSpec(device="cpu")
data = Path(sys.argv[1])
run_textual_inversion(data, "<w>", "circle", model=spec, config=TextualInversionConfig.for_family("tiny", steps=2))
t = time.perf_counter()
run_textual_inversion(data, "<w>", "circle", model=spec,
                      config=TextualInversionConfig.for_family("tiny", steps=int(sys.argv[2])))
print((time.perf_counter() - t) / int(sys.argv[2]))
"""

CONFIGS = {
    # the empty value leaves libgomp at its default (spin, then sleep); torch's default threads are every core
    "before": {"OMP_WAIT_POLICY": "", "DI_ASSETS_THREADS": str(os.cpu_count() or 1)},
    "now": {},
}


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "DI_ASSETS_THREADS")}
    env.update({k: v for k, v in extra.items()})
    return env


def step_time(config: str, steps: int, beside: bool) -> float:
    data = ROOT / "di_assets" / "example_data" / "circle"
    cmd = [sys.executable, "-c", STEP, str(data), str(steps)]
    other = None
    if beside:  # a second process training the same way (it keeps going until this one ends)
        other = subprocess.Popen([sys.executable, "-c", STEP, str(data), str(steps * 20)], env=_env(CONFIGS[config]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(8)  # until it trains
    try:
        out = subprocess.run(cmd, env=_env(CONFIGS[config]), capture_output=True, text=True, check=True)
    finally:
        if other is not None:
            other.kill()
            other.wait()
    return float(out.stdout.strip().splitlines()[-1])


def example_run(store: Path, shifts: str, steps: int) -> subprocess.Popen:
    cfg = store.with_suffix(".yaml")
    text = f"storage: {store}\n"
    if shifts != "all":  # all: the example's own 24 shifts
        text += f"shifts: [{shifts}]\n"
    if steps:  # 0: the family's own steps (500 for the tiny model)
        text += f"textual_inversion: {{steps: {steps}}}\n"
    cfg.write_text(text)
    return subprocess.Popen([sys.executable, "-m", "di_assets.cli", "run", "--config", str(cfg)],
                            env=_env({}), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def timed(procs: list[subprocess.Popen]) -> list[float]:
    t0, ends = time.perf_counter(), {}
    while len(ends) < len(procs):
        for i, p in enumerate(procs):
            if i not in ends and p.poll() is not None:
                if p.returncode:
                    raise SystemExit(f"di-assets run failed: {p.stderr.read()[-2000:]}")
                ends[i] = time.perf_counter() - t0
        time.sleep(0.2)
    return [ends[i] for i in range(len(procs))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed textual-inversion steps per process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--example", action="store_true", help="also time two example runs started together")
    ap.add_argument("--example-shifts", default="base,in_the_snow,at_night", help="or all: the example's 24")
    ap.add_argument("--example-steps", type=int, default=100,
                    help="textual-inversion steps in the example runs (0: the model's default, as the README's run)")
    ap.add_argument("--only-example", action="store_true", help="skip the step table (implies --example)")
    args = ap.parse_args()

    times = {(c, b): [] for c in CONFIGS for b in (False, True)}
    for r in range(0 if args.only_example else args.repeats):
        for beside in (False, True):
            for config in CONFIGS:  # interleaved
                t = step_time(config, args.steps, beside)
                times[(config, beside)].append(t)
                print(f"[{r + 1}/{args.repeats}] {config:6s} {'beside another' if beside else 'alone':14s} "
                      f"{t:.3f} s/step", file=sys.stderr, flush=True)
    if not args.only_example:
        print("\n| configuration | alone, s/step | beside another training process, s/step | slowdown |")
        print("|---|---|---|---|")
    for config in CONFIGS if not args.only_example else ():
        alone, beside = statistics.median(times[(config, False)]), statistics.median(times[(config, True)])
        print(f"| {config} | {alone:.3f} | {beside:.3f} | {beside / alone:.1f}x |")

    if args.example or args.only_example:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            (alone,) = timed([example_run(tmp / "alone", args.example_shifts, args.example_steps)])
            both = timed([example_run(tmp / f"together{i}", args.example_shifts, args.example_steps) for i in (1, 2)])
        print(f"\n| example run ({args.example_shifts}; {args.example_steps} steps) | seconds | vs alone |")
        print("|---|---|---|")
        print(f"| alone | {alone:.1f} | 1.0x |")
        for i, t in enumerate(both, 1):
            print(f"| together, run {i} | {t:.1f} | {t / alone:.2f}x |")


if __name__ == "__main__":
    main()
