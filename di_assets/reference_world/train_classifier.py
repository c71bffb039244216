"""Train a small shape classifier on the reference world.

    python -m di_assets.reference_world.train_classifier --contexts all          # the judge
    python -m di_assets.reference_world.train_classifier --contexts grass,beach  # the model under diagnosis

The judge sees every context. The model under diagnosis sees only some, so it fails
elsewhere: a planted failure that a dataset interface should find. Reports accuracy per
context on held-out draws.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import optimizer_step, save_trained
from .world import CONTEXTS, SHAPES, draw, random_item, sample


def build_model() -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, len(SHAPES)))


WEIGHTS = Path(__file__).resolve().parent / "weights"


def load_classifier(name: str = "judge") -> nn.Module:
    """A shipped classifier: `judge` (trained on every context) or `diagnosed` (grass and beach only)."""
    from safetensors.torch import load_file

    path = WEIGHTS / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no classifier {name!r} in {WEIGHTS}; train it with python -m {__name__}")
    model = build_model()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
                            ).permute(0, 3, 1, 2) / 127.5 - 1


@torch.no_grad()
def predict(model: nn.Module, images) -> list[str]:
    model.eval()
    return [SHAPES[i] for i in model(to_tensor(images)).argmax(1).tolist()]


@torch.no_grad()
def accuracy_by_context(model: nn.Module, n_per_context: int = 100, seed: int = 20_000) -> dict[str, float]:
    out = {}
    for c in CONTEXTS:
        data = sample(n_per_context, seed, contexts=(c,))
        pred = predict(model, [im for _, im in data])
        out[c] = sum(p == it.shape for p, (it, _) in zip(pred, data)) / len(data)
    return out


def train(contexts, steps: int, batch: int = 64, lr: float = 3e-3, seed: int = 0, log_every: int = 100):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses, t0 = [], time.time()
    for step in range(1, steps + 1):
        model.train()
        items = [random_item(rng, contexts=contexts) for _ in range(batch)]
        x = to_tensor([draw(it, rng) for it in items])
        y = torch.tensor([SHAPES.index(it.shape) for it in items])
        loss = F.cross_entropy(model(x), y)
        optimizer_step(loss, opt, sched, losses, step, steps, log_every, t0)
    model.eval()
    return model, losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="all", help="comma-separated contexts to train on, or 'all'")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="where to write the weights (.safetensors) and a .json record")
    args = ap.parse_args(argv)
    contexts = list(CONTEXTS) if args.contexts == "all" else args.contexts.split(",")
    unknown = set(contexts) - set(CONTEXTS)
    if unknown:
        raise SystemExit(f"unknown contexts {sorted(unknown)}; known: {', '.join(CONTEXTS)}")
    t0 = time.time()
    model, losses = train(contexts, args.steps, seed=args.seed)
    acc = accuracy_by_context(model)
    record = {"script": "di_assets/reference_world/train_classifier.py", "contexts": contexts, "steps": args.steps,
              "seed": args.seed, "final_loss": float(np.mean(losses[-50:])), "accuracy_by_context": acc,
              "seconds": round(time.time() - t0, 1)}
    save_trained(model, args.out, record)
    return record


if __name__ == "__main__":
    main()
