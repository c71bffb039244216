"""Does textual inversion work? Issue 5's gate, measured on the reference world.

    python -m di_assets.reference_world.inversion_gate [--images 16] [--per-prompt 8]

The embedded text-to-image model was trained without the word of one shape (`HIDDEN_SHAPE`:
its images were captioned `thing`), so no prompt word draws it. We learn its token from 16
images at the tiny defaults, through the same `run_textual_inversion`, `create_token_dictionary`
and `generate` that the flow uses, then generate `a photo of a <TOKEN>` and its shift prompts
(`a photo of a <TOKEN> in the snow`, ...) with the learned token and with the token's initial
embedding (the mean of the class name's embeddings). The judge classifier names the shape, the
CLIP scorer names the context and gives sim_class.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from .world import COLOURS, CONTEXTS, HIDDEN_SHAPE, Item, draw

SHIFT_CONTEXTS = ("grass", "snow", "beach", "water", "night")


def draw_class_folder(folder: Path, shape: str = HIDDEN_SHAPE, n: int = 16, seed: int = 0) -> Path:
    """`n` images of `shape` in random colours on the plain background: one class's training images."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw(Item(shape, rng.choice(list(COLOURS)), "plain"), rng).save(folder / f"{shape}_{i:02d}.png")
    return folder


def measure(workdir: Path, n_images: int = 16, per_prompt: int = 8, seed: int = 0, **ti_settings) -> dict:
    """Run the gate in `workdir`; `ti_settings` override the tiny textual-inversion defaults."""
    from di_assets.ml.clip_metric import get_scorer
    from di_assets.ml.encoder_root import create_token_dictionary
    from di_assets.ml.generate import generate
    from di_assets.ml.models import ModelSpec, load_base_text_encoder
    from di_assets.ml.shifts import class_caption
    from di_assets.ml.textual_inversion import initial_embedding, run_textual_inversion

    from .judge import judge_contexts, judge_shapes

    spec = ModelSpec(device="cpu")
    t0 = time.time()
    folder = draw_class_folder(workdir / HIDDEN_SHAPE, n=n_images, seed=seed)
    learned = run_textual_inversion(folder, f"<{HIDDEN_SHAPE}>", HIDDEN_SHAPE, model=spec, seed=seed, **ti_settings)
    t_inversion = time.time() - t0
    initial = initial_embedding(*load_base_text_encoder(spec), HIDDEN_SHAPE)
    root = create_token_dictionary([learned, initial], [f"<{HIDDEN_SHAPE}>", f"<{HIDDEN_SHAPE}-initial>"],
                                   [HIDDEN_SHAPE, HIDDEN_SHAPE], workdir / "encoder_root", model=spec,
                                   class_keys=["learned", "initial"])
    contexts = ("plain",) + SHIFT_CONTEXTS
    prompts = [f"a photo of a <TOKEN> {CONTEXTS[c]}".strip() for c in contexts]
    wanted = [c for c in contexts for _ in range(per_prompt)]  # the context each image was asked for
    shift = [i for i, c in enumerate(wanted) if c != "plain"]
    out = {"hidden_shape": HIDDEN_SHAPE, "images_per_prompt": per_prompt, "train_images": n_images,
           "steps": learned.steps, "eval_loss": [learned.initial_eval_loss, learned.final_eval_loss],
           "inversion_seconds": round(t_inversion, 1)}
    for key in ("learned", "initial"):
        # a list of prompts gives one list of images per prompt, as in the paper
        images = [im for row in generate(root, key, prompts, num_samples=per_prompt, random_seed=seed + 1000,
                                         model=spec) for im in row]
        shapes, seen = judge_shapes(images), judge_contexts(images)
        out[key] = {
            "shape": sum(s == HIDDEN_SHAPE for s in shapes) / len(images),
            "shape_by_context": {c: sum(shapes[i] == HIDDEN_SHAPE for i, w in enumerate(wanted) if w == c) / per_prompt
                                 for c in contexts},
            "context_of_shift_prompts": sum(seen[i] == wanted[i] for i in shift) / len(shift),
            "sim_class": get_scorer(spec).similarity(images, [class_caption(HIDDEN_SHAPE)])[:, 0].mean().item(),
        }
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="training images of the hidden class")
    ap.add_argument("--per-prompt", type=int, default=8, help="generated images per prompt and token")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = measure(Path(tmp), args.images, args.per_prompt, args.seed)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
