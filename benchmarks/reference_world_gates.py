"""Print the reference world's quality gates for the shipped weights.

    python benchmarks/reference_world_gates.py

Issue 5's gates, as far as they exist yet: CLIP zero-shot accuracy on held-out draws (gate
>= 90% for shape and for context), the classifiers' accuracy per context (the judge
everywhere; the model under diagnosis, trained on grass and beach only, failing elsewhere),
and the shipped text-to-image model's generations as the judge and the scorer see them
(gate >= 80% for shape and for context). The textual-inversion gates are not measured yet.
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    from di_assets.ml.models import ModelSpec, load_clip
    from di_assets.reference_world.train_classifier import accuracy_by_context, load_classifier
    from di_assets.reference_world.train_clip import zero_shot

    t = time.time()
    model, preprocess, tokenizer = load_clip(ModelSpec(device="cpu"))
    clip = zero_shot(model, preprocess, tokenizer, n=600, seed=30_000)
    rows = [("CLIP zero-shot, shape (gate >= 0.90)", clip["shape"]),
            ("CLIP zero-shot, context (gate >= 0.90)", clip["context"])]
    for name in ("judge", "diagnosed"):
        acc = accuracy_by_context(load_classifier(name), n_per_context=150, seed=31_000)
        rows += [(f"{name} classifier, shape accuracy {ctx}", a) for ctx, a in acc.items()]
    from diffusers import StableDiffusionPipeline

    from di_assets.ml.models import tiny_diffusion_dir
    from di_assets.reference_world.train_diffusion import judge_generations

    gen, _ = judge_generations(StableDiffusionPipeline.from_pretrained(tiny_diffusion_dir(), safety_checker=None))
    rows += [("generations: shape by the judge (gate >= 0.80)", gen["shape"]),
             ("generations: context by CLIP (gate >= 0.80)", gen["context"])]
    print(f"\nreference world gates (held-out draws), {time.time() - t:.0f} s")
    for label, value in rows:
        print(f"  {label:<45} {value:.3f}")
    for rec in sorted((ROOT / "di_assets" / "reference_world" / "weights").glob("*.json")):
        r = json.loads(rec.read_text())
        print(f"  trained: {rec.stem}: {r['steps']} steps, seed {r['seed']}, {r['seconds']} s")


if __name__ == "__main__":
    main()
