"""A textual-inversion step as by default (eager, float32 on CPU) against `torch.compile`d
(ModelSpec.compile) or in bf16 weights (ModelSpec.dtype), in fresh processes.

    python benchmarks/bench_compile.py                    # the mid-size model, 25 steps, 2 rounds
    python benchmarks/bench_compile.py --size tiny --resolution 64 --rounds 3
    python benchmarks/bench_compile.py --against bfloat16 --rounds 3   # float32 against bf16 weights

Each side is a fresh process with one thread that trains `bench_peers.py`'s class (the bundled circle
images) with `run_textual_inversion` at batch 8 (`--size mid`: bench_peers' mid-size SD2 architecture,
random weights, built once in its --models-dir; `tiny`: the embedded default). Sides are interleaved
(eager, compiled; compiled, eager; ...). Per run: the time to the first step (loading, and compiling for
the compiled side; inductor keeps a cache between processes, so the first compiled run pays the most)
and the median step time after the first two steps. The table gives the medians over the rounds. bf16
weights change the results (the token trains in float32 either way): they are a setting, not a default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(size: str, side: str, steps: int, resolution: int, models_dir: Path) -> dict:
    sys.path.insert(0, str(HERE))
    import bench_peers

    from di_assets.ml.models import ModelSpec
    from di_assets.ml.textual_inversion import run_textual_inversion

    flags = {"compile": side == "compiled", "dtype": "bfloat16" if side == "bfloat16" else "auto"}
    if size == "tiny":
        spec = ModelSpec(family="tiny", device="cpu", **flags)
    else:
        m = bench_peers.models_of("mid", models_dir)
        spec = ModelSpec(family="sd", diffusion=m["diffusion"], clip_model=m["clip_model"],
                         clip_pretrained=m["clip_pretrained"], device="cpu", **flags)
    stamps, start = [], time.perf_counter()
    run_textual_inversion(bench_peers.CLASS_IMAGES, "<circle>", bench_peers.CLASS_NAME, model=spec, steps=steps,
                          batch_size=8, learning_rate=5e-2, resolution=resolution, pin_norm=False, seed=0,
                          progress=lambda step, total, loss: stamps.append(time.perf_counter()))
    steps_s = [b - a for a, b in zip(stamps, stamps[1:])][2:]
    return {"first": stamps[0] - start, "step": statistics.median(steps_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "mid"), default="mid", help="model size (default mid)")
    ap.add_argument("--steps", type=int, default=25, help="training steps per run (default 25; at least 5)")
    ap.add_argument("--resolution", type=int, default=128, help="training image size (default 128)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side, interleaved (default 2)")
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/di_assets_bench_peers"),
                    help="where bench_peers builds the mid-size model (default /tmp/di_assets_bench_peers)")
    ap.add_argument("--against", choices=("compiled", "bfloat16"), default="compiled",
                    help="the other side: compiled (default) or bfloat16 weights")
    ap.add_argument("--child", choices=("eager", "compiled", "bfloat16"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 5:
        ap.error("--steps must be at least 5 (the first two steps are left out of the step time)")
    if args.child:
        print(json.dumps(child(args.size, args.child, args.steps, args.resolution, args.models_dir)))
        return
    env = {**os.environ, "DI_ASSETS_THREADS": "1", "OMP_NUM_THREADS": "1"}
    got: dict[str, list[dict]] = {"eager": [], args.against: []}
    for r in range(args.rounds):
        for side in (list(got) if r % 2 == 0 else list(got)[::-1]):
            cmd = [sys.executable, __file__, "--child", side, "--size", args.size, "--steps", str(args.steps),
                   "--resolution", str(args.resolution), "--models-dir", str(args.models_dir)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"the {side} run failed:\n{out.stderr[-3000:]}")
            m = json.loads(out.stdout.strip().splitlines()[-1])
            got[side].append(m)
            print(f"round {r + 1} {side}: first step after {m['first']:.1f} s, then {m['step']:.3f} s/step",
                  file=sys.stderr, flush=True)
    print(f"\nTextual inversion, {args.size} model, {args.resolution} px, batch 8, one thread; medians of {args.rounds}\n")
    print("| side | first step after s | s/step |")
    print("|---|---|---|")
    for side, ms in got.items():
        print(f"| {side} | {statistics.median(m['first'] for m in ms):.1f} | "
              f"{statistics.median(m['step'] for m in ms):.3f} |")


if __name__ == "__main__":
    main()
