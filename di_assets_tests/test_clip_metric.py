import torch
from PIL import Image

from di_assets.ml.clip_metric import clip_similarity, get_scorer


def test_clip_similarity_shape_range_and_caching(tiny):
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "white", "black")]
    sims = clip_similarity(images, "a photo of a dog", model=tiny)
    assert sims.shape == (5,) and sims.dtype == torch.float32
    assert bool(((sims >= -1) & (sims <= 1)).all())
    assert len(set(sims.tolist())) > 1  # different images, different scores

    scorer = get_scorer(tiny)
    assert scorer is get_scorer(tiny)  # loaded once
    both = scorer.similarity(images, ["a photo of a dog", "a photo in the snow"])
    assert both.shape == (5, 2)
    assert torch.allclose(both[:, 0], sims, atol=1e-6)
    assert "a photo in the snow" in scorer._text_cache
    # batching does not change the scores
    scorer.batch_size = 2
    assert torch.allclose(scorer.similarity(images, ["a photo of a dog"])[:, 0], sims, atol=1e-5)
    scorer.batch_size = 64
