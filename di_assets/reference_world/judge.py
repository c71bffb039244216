"""How held-out judges see images of the world: the shape by the judge classifier (trained on
every context), the context by the world's CLIP scorer, zero-shot over the shift captions."""

from __future__ import annotations

from .world import CONTEXTS, Item


def context_caption(context: str) -> str:
    """The shift caption of a context: `a photo in the snow`; `a photo` for the plain one."""
    tail = CONTEXTS[context]
    return f"a photo {tail}" if tail else "a photo"


def judge_shapes(images) -> list[str]:
    from .train_classifier import load_classifier, predict

    return predict(load_classifier("judge"), images)


def judge_contexts(images) -> list[str]:
    from di_assets.ml.clip_metric import get_scorer
    from di_assets.ml.models import ModelSpec

    sims = get_scorer(ModelSpec(device="cpu")).similarity(images, [context_caption(c) for c in CONTEXTS])
    return [list(CONTEXTS)[i] for i in sims.argmax(1).tolist()]


def accuracy(images, items: list[Item]) -> dict[str, float]:
    """Share of images judged as the shape, and as the context, of the item they were made for."""
    n = len(items)
    shapes, contexts = judge_shapes(images), judge_contexts(images)
    return {"shape": sum(s == it.shape for s, it in zip(shapes, items)) / n,
            "context": sum(c == it.context for c, it in zip(contexts, items)) / n, "images": n}
