"""The reference world (issue 5): drawing is deterministic, every training script runs, the shipped
models know the world, and textual inversion learns a shape that the base model cannot name."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from di_assets.reference_world.world import CONTEXTS, SHAPES, Item, draw, sample
from di_assets_tests.conftest import EXAMPLE

# What the shipped models reach on the small samples below (the full gates, on more images, are
# in benchmarks/reference_world_gates.py); chance is 1/6.
SHAPE_FLOOR = 0.5
INVERSION_FLOOR = 0.5


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


def test_classifier_training_writes_weights_and_their_record(tmp_path):
    from di_assets.reference_world.train_classifier import main

    record = main(["--contexts", "grass,beach", "--steps", "3", "--out", str(tmp_path / "c.safetensors")])
    assert record["steps"] == 3 and (tmp_path / "c.safetensors").stat().st_size > 0
    assert json.loads((tmp_path / "c.json").read_text())["contexts"] == ["grass", "beach"]


@pytest.mark.parametrize("module", ["di_assets.reference_world", "di_assets.reference_world.inversion_gate",
                                    "di_assets.reference_world.train_diffusion"])
def test_training_commands_have_help(module):
    p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True)
    assert p.stdout.startswith("usage:") and "--help" in p.stdout


def test_diffusion_training_runs_and_is_judged(tiny_cache):
    from di_assets.reference_world.train_diffusion import judge_generations, train

    pipe, losses = train(vae_steps=2, steps=2, batch=4, pool=8, log_every=10)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert pipe.vae.config.scaling_factor > 0
    acc, images = judge_generations(pipe, per_prompt=1, num_inference_steps=2)
    assert acc["images"] == len(images) == 30 and 0 <= acc["shape"] <= 1 and 0 <= acc["context"] <= 1


def test_the_hidden_shape_is_never_named_in_the_base_models_captions():
    from di_assets.reference_world.train_diffusion import caption
    from di_assets.reference_world.world import GENERIC_WORD, HIDDEN_SHAPE, random_item

    rng = random.Random(0)
    items = [random_item(rng) for _ in range(600)]
    captions = [caption(it, rng) for it in items]
    assert not any(HIDDEN_SHAPE in c for c in captions)
    hidden = [c for it, c in zip(items, captions) if it.shape == HIDDEN_SHAPE]
    assert hidden and all(GENERIC_WORD in c for c in hidden)
    named = [c for it, c in zip(items, captions) if it.shape == "circle"]
    assert sum("circle" in c for c in named) > 0.7 * len(named)  # the others keep their word
    assert any(c.endswith("in the snow") for c in captions) and any(not c.startswith("a photo") for c in captions)


def test_shipped_text_to_image_model_draws_the_named_shapes_in_their_contexts():
    from diffusers import StableDiffusionPipeline

    from di_assets.ml.models import tiny_diffusion_dir
    from di_assets.reference_world.train_diffusion import judge_generations

    acc, _ = judge_generations(StableDiffusionPipeline.from_pretrained(tiny_diffusion_dir(), safety_checker=None),
                               per_prompt=1, seed=60_000)
    assert acc["images"] == 30
    assert acc["shape"] >= SHAPE_FLOOR and acc["context"] >= 0.7  # random guessing: 0.17 each


def test_textual_inversion_learns_the_hidden_shape(tmp_path):
    """Issue 5's gate on a smaller sample: the learned token draws the shape no word names."""
    from di_assets.reference_world.inversion_gate import measure

    out = measure(tmp_path, per_prompt=2, seed=1)
    learned, initial = out["learned"], out["initial"]
    assert out["eval_loss"][1] < out["eval_loss"][0]
    assert learned["shape"] >= INVERSION_FLOOR > initial["shape"]
    assert learned["sim_class"] > initial["sim_class"]
    assert learned["context_of_shift_prompts"] >= 0.6


# the shifts the reference world knows how to draw (its contexts)
WORLD_SHIFTS = ["base", "in_the_grass", "in_the_beach", "in_the_snow", "in_the_water", "at_night"]


@pytest.mark.slow
def test_example_run_on_the_reference_world(tmp_path):
    """End to end, as a user runs the main command: each class's counterfactuals are closer to
    their own class caption than to any other class's, by the CLIP scorer; the picture is there."""
    import duckdb
    from PIL import Image

    from di_assets.ml.clip_metric import get_scorer
    from di_assets.ml.models import ModelSpec
    from di_assets.ml.shifts import class_caption

    store, shifts = tmp_path / "store", WORLD_SHIFTS
    (tmp_path / "home").mkdir()
    p = subprocess.run([sys.executable, "-m", "di_assets.cli", "run", "--storage", str(store),
                        "--shifts", ",".join(shifts), "--num-samples", "8"], capture_output=True, text=True,
                       env={**os.environ, "DAGSTER_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "diagnosis: the CLIP filter kept" in p.stdout and "diagnosed: base accuracy" in p.stdout
    classes = sorted(d.name for d in EXAMPLE.iterdir() if d.is_dir())
    sheet = Image.open(store / "counterfactuals.png")
    assert sheet.width >= 64 * len(shifts) and sheet.height >= 64 * len(classes)

    con = duckdb.connect(str(store / "scores.duckdb"), read_only=True, config={"file_search_path": str(store)})
    assert con.execute("SELECT count(DISTINCT class_key), count(DISTINCT shift) FROM scores").fetchone() == (
        len(classes), len(shifts))
    scorer = get_scorer(ModelSpec(device="cpu"))
    captions = [class_caption(c) for c in classes]
    for i, c in enumerate(classes):
        images = [Image.open(f) for f in sorted(store.glob(f"images/{c}/*/*.png"))]
        mean = scorer.similarity(images, captions).mean(0)  # mean sim to each class caption
        # the scores table holds the same sim_class as the right caption's column
        table = con.execute("SELECT avg(sim_class) FROM scores WHERE class_key = ?", [c]).fetchone()[0]
        assert table == pytest.approx(mean[i].item(), abs=1e-4)
        assert mean[i] == mean.max(), f"{c}: mean sim to {dict(zip(classes, mean.tolist()))}"

    # The known answer of the diagnosis: the classifier trained on grass and beach fails at night
    # and in the water, significantly; the judge, trained on every context, fails nowhere.
    failures = con.execute("SELECT classifier, shift, drop, significant FROM shift_failures "
                           "WHERE shift <> 'base' ORDER BY classifier, drop DESC").fetchall()
    diagnosed = [r for r in failures if r[0] == "diagnosed"]
    assert {r[1] for r in diagnosed[:2]} == {"at_night", "in_the_water"}, diagnosed
    assert diagnosed[0][3] and diagnosed[1][3], diagnosed
    assert not any(r[3] for r in failures if r[0] == "judge"), failures
    # the filter kept most images, and the report shows both classifiers
    kept, total = con.execute("SELECT count(*) FILTER (kept), count(*) FROM predictions").fetchone()
    assert total == 2 * len(classes) * len(shifts) * 8 and kept > 0.5 * total
    html = (store / "diagnosis" / "report.html").read_text()
    assert "diagnosed" in html and "judge" in html and "at_night" in html
