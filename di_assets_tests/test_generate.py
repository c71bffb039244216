import numpy as np
import pytest
import torch

from di_assets.ml.encoder_root import create_token_dictionary
from di_assets.ml.generate import GenerationConfig, generate, generate_samples


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny):
    g = torch.Generator().manual_seed(0)
    return create_token_dictionary([torch.randn(32, generator=g), torch.randn(32, generator=g)],
                                   ["<circle-0>", "<square-1>"], ["circle", "square"],
                                   tmp_path_factory.mktemp("gen") / "root", model=tiny)


def _px(im):
    return np.asarray(im).astype(np.int16)


def test_generate_is_deterministic_per_seed(root):
    a = generate(root, 0, "a photo of a <TOKEN> in the grass", num_samples=3, random_seed=5)
    b = generate(root, 0, "a photo of a <TOKEN> in the grass", num_samples=3, random_seed=5)
    assert len(a) == 3 and a[0].size == (64, 64)
    for x, y in zip(a, b):
        assert np.array_equal(_px(x), _px(y))
    assert np.abs(_px(a[0]) - _px(a[1])).max() > 10  # other seeds, other images


def test_any_image_can_be_regenerated_alone(root):
    batch = generate(root, "square", "a photo of a <TOKEN>", num_samples=4, random_seed=10, batch_size=4)
    alone = generate(root, "square", "a photo of a <TOKEN>", num_samples=1, random_seed=12, batch_size=1)
    assert np.abs(_px(batch[2]) - _px(alone[0])).max() <= 2  # batched vs alone: float noise only


def test_prompts_use_the_token_or_the_class_name(root):
    cfg = GenerationConfig.for_family("tiny", num_inference_steps=2)
    s = generate_samples(root, 1, ["a photo of a <TOKEN>", "a <TOKEN> at night"], seeds=[0, 1], config=cfg)
    assert [x.text for x in s] == ["a photo of a <square-1>"] * 2 + ["a <square-1> at night"] * 2
    assert [x.seed for x in s] == [0, 1, 0, 1]
    base = generate_samples(root, 1, "a photo of a <TOKEN>", seeds=[0], use_token=False, config=cfg)
    assert base[0].text == "a photo of a square"
    assert np.abs(_px(base[0].image) - _px(s[0].image)).max() > 0


def test_prompt_without_placeholder_is_refused(root):
    with pytest.raises(ValueError, match="no <TOKEN> placeholder"):
        generate(root, 0, "a photo of a dog", num_samples=1, random_seed=0)


def test_multi_vector_tokens_reach_the_text_encoder_once_each(tiny, tmp_path):
    """`<TOKEN>` of a 3-vector class: the text encoder sees its 3 placeholder ids, once each, in order."""
    from di_assets.ml.encoder_root import load_encoder_root, resolve_class

    g = torch.Generator().manual_seed(1)
    root = create_token_dictionary([torch.randn(3, 32, generator=g), torch.randn(2, 32, generator=g)],
                                   ["<star>", "<dot>"], ["star", "dot"], tmp_path / "root", model=tiny)
    star = resolve_class(root, "star")
    _, text_encoder = load_encoder_root(root, "cpu", torch.float32)  # the pipeline's (cached) text encoder
    first_new = min(star.token_ids + resolve_class(root, "dot").token_ids)
    seen = []
    hook = text_encoder.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        samples = generate_samples(root, "star", ["a photo of a <TOKEN> in the snow", "a <TOKEN>"], seeds=[0],
                                   model=tiny, config=GenerationConfig.for_family("tiny", num_inference_steps=1))
    finally:
        hook.remove()
    assert samples[0].text == "a photo of a <star> <star>_1 <star>_2 in the snow"
    prompt_rows = torch.cat(seen)
    placeholder = [[i for i in row.tolist() if i >= first_new] for row in prompt_rows]
    # two prompts and their two unconditional (empty) prompts
    assert sorted(placeholder) == [[], [], list(star.token_ids), list(star.token_ids)]
