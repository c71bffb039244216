"""The reference world (issue 5, in progress): drawing is deterministic, and the CLIP training runs."""

import random

import numpy as np

from di_assets.reference_world.world import CONTEXTS, SHAPES, Item, draw, sample


def test_drawing_is_deterministic_and_captions_follow_the_prompts():
    a = [np.asarray(im) for _, im in sample(5, seed=3)]
    b = [np.asarray(im) for _, im in sample(5, seed=3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (64, 64, 3)
    assert Item("star", "red", "snow").caption == "a photo of a red star in the snow"
    assert Item("heart", "blue", "plain").caption == "a photo of a blue heart"
    # every shape on every context draws, and the shape changes the pixels
    for c in CONTEXTS:
        ims = {s: np.asarray(draw(Item(s, "red", c), random.Random(1))) for s in SHAPES}
        assert len({im.tobytes() for im in ims.values()}) == len(SHAPES)


def test_clip_training_runs_and_reports_zero_shot_accuracy(tiny_cache):
    from di_assets.reference_world.train_clip import train, zero_shot

    model, preprocess, tokenizer, losses = train(steps=3, batch=8, log_every=10)
    assert len(losses) == 3 and all(np.isfinite(losses))
    acc = zero_shot(model, preprocess, tokenizer, n=12)
    assert set(acc) == {"shape", "context"} and all(0 <= v <= 1 for v in acc.values())


def test_shipped_clip_scorer_knows_the_world(tiny):
    """The embedded default's scorer is the one trained on the world: zero-shot works."""
    from di_assets.ml.models import SHIPPED_CLIP, load_clip, tiny_clip_checkpoint
    from di_assets.reference_world.train_clip import zero_shot

    assert tiny_clip_checkpoint() == SHIPPED_CLIP
    model, preprocess, tokenizer = load_clip(tiny)
    acc = zero_shot(model, preprocess, tokenizer, n=120, seed=40_000)
    assert acc["shape"] >= 0.9 and acc["context"] >= 0.9


def test_shipped_classifiers_plant_a_known_failure():
    from di_assets.reference_world.train_classifier import accuracy_by_context, load_classifier

    judge = accuracy_by_context(load_classifier("judge"), n_per_context=30, seed=41_000)
    diagnosed = accuracy_by_context(load_classifier("diagnosed"), n_per_context=30, seed=41_000)
    assert min(judge.values()) >= 0.9
    assert diagnosed["grass"] >= 0.9 and diagnosed["beach"] >= 0.9  # where it was trained
    assert diagnosed["night"] < judge["night"] - 0.3  # and where it fails


def test_diffusion_training_runs_and_is_judged(tiny_cache):
    from di_assets.reference_world.train_diffusion import judge_generations, train

    pipe, losses = train(vae_steps=2, steps=2, batch=4, log_every=10)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert pipe.vae.config.scaling_factor > 0
    acc, images = judge_generations(pipe, per_prompt=1, steps=2)
    assert acc["images"] == len(images) == 36 and 0 <= acc["shape"] <= 1 and 0 <= acc["context"] <= 1
