"""Batching for throughput changes nothing but speed; textual inversion reuses loaded models."""

import numpy as np
import pytest
import torch
from PIL import Image

from di_assets.ml import models, textual_inversion
from di_assets.ml.clip_metric import ClipScorer
from di_assets.ml.encoder_root import create_token_dictionary
from di_assets.ml.generate import GenerationConfig, generate_samples


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny):
    g = torch.Generator().manual_seed(1)
    return create_token_dictionary([torch.randn(32, generator=g)], ["<circle-b>"], ["circle"],
                                   tmp_path_factory.mktemp("batch") / "root", model=tiny)


def test_batched_generation_gives_the_same_images_as_one_at_a_time(root, tiny):
    prompts = ["a photo of a <TOKEN>", "a <TOKEN> in the snow"]
    seeds = [3, 4, 5]

    def run(batch_size):
        cfg = GenerationConfig.for_family("tiny", num_inference_steps=3, batch_size=batch_size)
        return generate_samples(root, 0, prompts, seeds=seeds, model=tiny, config=cfg)

    alone, batched = run(1), run(4)  # 6 images: batches of 4 and 2, which mixes prompts in a batch
    assert [(s.text, s.seed) for s in alone] == [(s.text, s.seed) for s in batched]
    diffs = [np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() for a, b in zip(alone, batched)]
    assert max(diffs) <= 2  # float noise only: every image keeps its own seed's noise
    # and the seeds do matter, so the comparison above can fail
    assert np.abs(np.asarray(alone[0].image, np.int16) - np.asarray(alone[1].image, np.int16)).max() > 10


def test_batched_clip_scores_equal_one_at_a_time(tiny):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(7)]
    captions = ["a photo of a circle", "a photo in the snow"]
    one = ClipScorer(tiny, batch_size=1).similarity(images, captions)
    many = ClipScorer(tiny, batch_size=4).similarity(images, captions)  # batches of 4 and 3
    assert one.shape == (7, 2) and torch.allclose(one, many, atol=1e-5)
    assert (one[:, 0].max() - one[:, 0].min()) > 1e-4  # distinct images, distinct scores


def test_textual_inversion_of_several_classes_loads_the_models_once(dataset, tiny, monkeypatch):
    loaded = []

    def spy(spec):
        loaded.append(models.load_diffusion_components(spec))
        return loaded[-1]

    monkeypatch.setattr(textual_inversion, "load_diffusion_components", spy)
    textual_inversion.run_textual_inversion(dataset / "circle", "<reuse-circle>", "circle", model=tiny, steps=1)
    before = models._load_diffusion_components.cache_info()
    textual_inversion.run_textual_inversion(dataset / "square", "<reuse-square>", "square", model=tiny, steps=1)
    after = models._load_diffusion_components.cache_info()
    (unet1, vae1), (unet2, vae2) = loaded
    assert unet2 is unet1 and vae2 is vae1  # the second class trains on the same UNet/VAE objects
    assert after.misses == before.misses and after.hits == before.hits + 1
