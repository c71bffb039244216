"""Print the reference world's quality gates for the shipped weights.

    python benchmarks/reference_world_gates.py

Issue 5's gates, as far as they exist yet: CLIP zero-shot accuracy on held-out draws (gate
>= 90% for shape and for context), and the classifiers' accuracy per context (the judge
everywhere; the model under diagnosis, trained on grass and beach only, failing elsewhere).
The base text-to-image model and the textual-inversion gates need the trained diffusion
model, which is not built yet.
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
    print(f"\nreference world gates (held-out draws), {time.time() - t:.0f} s")
    for label, value in rows:
        print(f"  {label:<45} {value:.3f}")
    for rec in sorted((ROOT / "di_assets" / "reference_world" / "weights").glob("*.json")):
        r = json.loads(rec.read_text())
        print(f"  trained: {rec.stem}: {r['steps']} steps, seed {r['seed']}, {r['seconds']} s")


if __name__ == "__main__":
    main()
