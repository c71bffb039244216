"""Print the reference world's quality gates (issue 5) for the shipped weights.

    python benchmarks/reference_world_gates.py [--per-prompt 8]

- CLIP zero-shot accuracy on held-out draws (gate >= 90% for shape and for context);
- the classifiers' accuracy per context: the judge everywhere, and the model under diagnosis
  (trained on grass and beach only) failing elsewhere;
- the text-to-image model's generations at the tiny defaults, as the judges see them
  (gate >= 80% for shape and for context);
- textual inversion of the hidden shape from 16 images at the tiny defaults: its images are
  that shape (gate >= 70% over >= 4 contexts), their sim_class beats the initial token's, and
  the shift prompts show the right context (gate >= 70%).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-prompt", type=int, default=8, help="generated images per prompt")
    args = ap.parse_args()
    from diffusers import StableDiffusionPipeline

    from di_assets.ml.models import ModelSpec, load_clip, tiny_diffusion_dir
    from di_assets.reference_world import inversion_gate
    from di_assets.reference_world.train_classifier import accuracy_by_context, load_classifier
    from di_assets.reference_world.train_clip import zero_shot
    from di_assets.reference_world.train_diffusion import judge_generations

    t = time.time()
    model, preprocess, tokenizer = load_clip(ModelSpec(device="cpu"))
    clip = zero_shot(model, preprocess, tokenizer, n=600, seed=30_000)
    rows = [("CLIP zero-shot, shape (gate >= 0.90)", clip["shape"], clip["shape"] >= 0.9),
            ("CLIP zero-shot, context (gate >= 0.90)", clip["context"], clip["context"] >= 0.9)]
    for name in ("judge", "diagnosed"):
        acc = accuracy_by_context(load_classifier(name), n_per_context=150, seed=31_000)
        rows += [(f"{name} classifier, shape accuracy {ctx}", a, None) for ctx, a in acc.items()]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusion_dir(), safety_checker=None)
    gen, _ = judge_generations(pipe, per_prompt=args.per_prompt, seed=50_000)
    rows += [("generations: shape by the judge (gate >= 0.80)", gen["shape"], gen["shape"] >= 0.8),
             ("generations: context by CLIP (gate >= 0.80)", gen["context"], gen["context"] >= 0.8)]
    with tempfile.TemporaryDirectory() as tmp:
        inv = inversion_gate.measure(Path(tmp), per_prompt=args.per_prompt)
    learned, initial = inv["learned"], inv["initial"]
    shape = inversion_gate.HIDDEN_SHAPE
    rows += [(f"inversion: <{shape}> images are {shape}s (gate >= 0.70)", learned["shape"], learned["shape"] >= 0.7)]
    rows += [(f"  ... {ctx}", a, None) for ctx, a in learned["shape_by_context"].items()]
    rows += [(f"  initial token's images are {shape}s", initial["shape"], None),
             ("inversion: sim_class, learned token", learned["sim_class"], learned["sim_class"] > initial["sim_class"]),
             ("inversion: sim_class, initial token", initial["sim_class"], None),
             ("inversion: shift prompts' context (gate >= 0.70)", learned["context_of_shift_prompts"],
              learned["context_of_shift_prompts"] >= 0.7)]
    print(f"\nreference world gates (held-out draws, {args.per_prompt} images a prompt), {time.time() - t:.0f} s")
    for label, value, ok in rows:
        print(f"  {label:<52} {value:.3f}  {'' if ok is None else 'pass' if ok else 'FAIL'}")
    print(f"  textual inversion: {inv['steps']} steps, eval loss {inv['eval_loss'][0]:.4f} -> "
          f"{inv['eval_loss'][1]:.4f}, {inv['inversion_seconds']} s")
    weights = ROOT / "di_assets" / "reference_world" / "weights"
    for rec in sorted(weights.glob("*.json")):
        r = json.loads(rec.read_text())
        if "steps" in r:
            print(f"  trained: {rec.stem}: {r['steps']} steps, seed {r['seed']}, {r['seconds']} s")
    if (weights / "training.json").exists():
        print(f"  all models trained in one run: {json.loads((weights / 'training.json').read_text())['total_seconds']} s")
    return 0 if all(ok is not False for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
