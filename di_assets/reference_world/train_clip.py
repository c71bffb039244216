"""Train the embedded CLIP scorer (the tiny open_clip architecture) on the reference world.

    python -m di_assets.reference_world.train_clip --out weights/clip.safetensors

Contrastive training on world images and their captions; some captions name only the shape,
the colour and shape, or the context, so that the class captions (`a photo of a star`) and the
shift captions (`a photo in the snow`) both score well zero-shot. Reports zero-shot accuracy
on held-out draws.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from di_assets.ml.shifts import class_caption

from . import optimizer_step, save_trained
from .judge import context_caption
from .world import CONTEXTS, SHAPES, Item, draw, random_item, sample


def caption_variant(item: Item, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:
        return item.caption
    if r < 0.6:
        return f"a photo of a {item.shape}"
    if r < 0.75:
        return f"a photo of a {item.colour} {item.shape}"
    return context_caption(item.context)


@torch.no_grad()
def zero_shot(model, preprocess, tokenizer, n: int = 300, seed: int = 10_000) -> dict[str, float]:
    """Accuracy of shape and context, choosing the best of the class or shift captions."""
    data = sample(n, seed)
    x = torch.stack([preprocess(im) for _, im in data])
    f = F.normalize(model.encode_image(x).float(), dim=-1)
    out = {}
    for name, labels, captions in (
        ("shape", [it.shape for it, _ in data], {s: class_caption(s) for s in SHAPES}),
        ("context", [it.context for it, _ in data], {c: context_caption(c) for c in CONTEXTS}),
    ):
        t = F.normalize(model.encode_text(tokenizer(list(captions.values()))).float(), dim=-1)
        pred = (f @ t.T).argmax(1).tolist()
        keys = list(captions)
        out[name] = sum(keys[p] == y for p, y in zip(pred, labels)) / n
    return out


def train(steps: int, batch: int = 128, lr: float = 2e-3, seed: int = 0, log_every: int = 100):
    import open_clip

    from di_assets.ml.models import TINY_CLIP_NAME, register_tiny_clip

    register_tiny_clip()
    torch.manual_seed(seed)
    model, preprocess, _ = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    losses = []
    t0 = time.time()
    for step in range(1, steps + 1):
        items = [random_item(rng) for _ in range(batch)]
        x = torch.stack([preprocess(draw(it, rng)) for it in items])
        caps = [caption_variant(it, rng) for it in items]
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(caps)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # captions can repeat within a batch: every image whose caption matches is a positive
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer_step(loss, opt, sched, losses, step, steps, log_every, t0)
    model.eval()
    return model, preprocess, tokenizer, losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="where to write the weights (.safetensors) and a .json record")
    args = ap.parse_args(argv)
    t0 = time.time()
    model, preprocess, tokenizer, losses = train(args.steps, args.batch, args.lr, args.seed)
    acc = zero_shot(model, preprocess, tokenizer)
    record = {"script": "di_assets/reference_world/train_clip.py", "steps": args.steps, "batch": args.batch,
              "lr": args.lr, "seed": args.seed, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
              "zero_shot_accuracy": acc, "seconds": round(time.time() - t0, 1)}
    save_trained(model, args.out, record)
    return record


if __name__ == "__main__":
    main()
