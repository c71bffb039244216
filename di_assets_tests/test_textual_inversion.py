import logging

import pytest
import torch

from di_assets.ml.models import load_base_text_encoder
from di_assets.ml.textual_inversion import (
    EMBEDS_FILE, LOSS_FILE, load_learned_embeds, run_textual_inversion,
)


def test_loss_falls_and_only_the_new_vector_trains(dataset, tiny):
    _, text_encoder = load_base_text_encoder(tiny)
    before = text_encoder.get_input_embeddings().weight.detach().clone()
    result = run_textual_inversion(dataset / "circle", "<circle-0>", "circle", model=tiny, steps=30, seed=0,
                                   pin_norm=True)
    # Same images, captions, noise and timesteps before and after: the loss fell.
    assert result.final_eval_loss < result.initial_eval_loss
    assert len(result.losses) == 30
    # The learned vector moved away from its initialiser but kept its norm (pinned).
    from di_assets.ml.textual_inversion import initial_embedding

    tokenizer, _ = load_base_text_encoder(tiny)
    init = initial_embedding(tokenizer, text_encoder, "circle")
    assert not torch.allclose(result.embeds[0], init)
    assert result.embeds[0].norm().item() == pytest.approx(init.norm().item(), rel=1e-4)
    # Every row of the (shared) text encoder is unchanged.
    assert torch.equal(text_encoder.get_input_embeddings().weight, before)
    assert text_encoder.get_input_embeddings().num_embeddings == before.shape[0]


def test_writes_diffusers_file_that_loads_into_a_fresh_pipeline(dataset, tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "tok"
    result = run_textual_inversion(dataset / "square", "<square-1>", "square", model=tiny, steps=3, output_dir=out)
    assert (out / EMBEDS_FILE).exists() and (out / LOSS_FILE).exists()
    token, embeds = load_learned_embeds(out / EMBEDS_FILE)
    assert token == "<square-1>" and torch.equal(embeds, result.embeds)

    pipe = StableDiffusionPipeline.from_pretrained(tiny.resolved().diffusion, safety_checker=None)
    n = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(out / EMBEDS_FILE))
    assert len(pipe.tokenizer) == n + 1
    token_id = pipe.tokenizer.convert_tokens_to_ids("<square-1>")
    assert token_id == n
    assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[token_id], result.embeds[0])


def test_multi_vector_token(dataset, tiny, tmp_path):
    result = run_textual_inversion(dataset / "circle", "<c2>", "circle", model=tiny, steps=2, num_vectors=3,
                                   output_dir=tmp_path)
    assert result.embeds.shape == (3, 32)
    assert load_learned_embeds(tmp_path / EMBEDS_FILE)[1].shape == (3, 32)


def test_resume_after_interruption_matches_an_uninterrupted_run(dataset, tiny, tmp_path):
    kw = dict(model=tiny, steps=12, checkpoint_every=4, seed=3)
    straight = run_textual_inversion(dataset / "circle", "<c>", "circle", output_dir=tmp_path / "a", **kw)

    class Killed(Exception):
        pass

    def kill_at_10(step, total, loss):
        if step == 10:
            raise Killed

    with pytest.raises(Killed):
        run_textual_inversion(dataset / "circle", "<c>", "circle", output_dir=tmp_path / "b", progress=kill_at_10, **kw)
    assert not (tmp_path / "b" / EMBEDS_FILE).exists()  # nothing half-written
    resumed = run_textual_inversion(dataset / "circle", "<c>", "circle", output_dir=tmp_path / "b", **kw)
    assert resumed.resumed_from == 8
    assert torch.allclose(resumed.embeds, straight.embeds, atol=1e-6)
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)


def test_changed_images_do_not_resume_an_old_checkpoint(dataset, tiny, tmp_path):
    kw = dict(model=tiny, steps=4, checkpoint_every=2, output_dir=tmp_path / "t")
    run_textual_inversion(dataset / "circle", "<c>", "circle", **kw)
    next(iter((dataset / "circle").iterdir())).unlink()
    assert run_textual_inversion(dataset / "circle", "<c>", "circle", **kw).resumed_from == 0


def test_latents_are_encoded_once(dataset, tiny, monkeypatch):
    from di_assets.ml.models import load_diffusion_components

    _, vae = load_diffusion_components(tiny)
    calls = []
    original = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **k: calls.append(len(x)) or original(x, *a, **k))
    run_textual_inversion(dataset / "circle", "<c>", "circle", model=tiny, steps=5, batch_size=2)
    assert sum(calls) == 16  # 8 images and their mirror images, once, whatever the step count


def test_empty_folder_is_an_error_that_names_it(tmp_path, tiny):
    (tmp_path / "goldfish").mkdir()
    (tmp_path / "goldfish" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"class folder {tmp_path / 'goldfish'} has no readable images"):
        run_textual_inversion(tmp_path / "goldfish", "<e>", "goldfish", model=tiny, steps=1)


def test_corrupt_files_are_skipped_with_a_warning(dataset, tiny, caplog):
    (dataset / "circle" / "broken.png").write_bytes(b"not a png")
    (dataset / "circle" / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING, logger="di_assets"):
        run_textual_inversion(dataset / "circle", "<c>", "circle", model=tiny, steps=1)
    assert "broken.png" in caplog.text and "notes.txt" in caplog.text


@pytest.mark.parametrize("token", ["dog", "a", "<|endoftext|>"])
def test_a_token_that_exists_is_refused(dataset, tiny, token):
    with pytest.raises(ValueError, match="already exists"):
        run_textual_inversion(dataset / "circle", token, "circle", model=tiny, steps=1)
