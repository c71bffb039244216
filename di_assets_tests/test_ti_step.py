"""A textual-inversion step does nothing twice and waits for the device as little as it can.

The step's own work (draws, noise, token injection, loss reads, the non-finite guard) must leave the
numbers as they were: `test_textual_inversion.py` and `test_multi_class_ti.py` check the results;
these tests check the mechanics. `benchmarks/bench_ti_step.py` times a step against an old version.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from di_assets.ml.models import load_base_text_encoder, load_diffusion_components, load_scheduler
from di_assets.ml.textual_inversion import TokenClass, _Shared, _TokenInjector, run_textual_inversion_many


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_noise_tables_equal_the_schedulers_formulas(tiny, prediction):
    """The per-timestep factors are computed once; the noisy latents and targets are bitwise the scheduler's."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(load_scheduler(tiny, "ddpm").config, prediction_type=prediction)
    _, text_encoder = load_base_text_encoder(tiny)
    unet, vae = load_diffusion_components(tiny)
    shared = _Shared(None, text_encoder, unet, vae, scheduler, "cpu")
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(6, 4, 16, 16, generator=gen), torch.randn(6, 4, 16, 16, generator=gen)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    noisy, target = shared.noise(latents, noise, t)
    assert torch.equal(noisy, scheduler.add_noise(latents, noise, t))
    want = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, t)
    assert torch.equal(target, want)


def test_token_injection_has_no_data_dependent_step(tiny):
    """The injector reads nothing back from the device: the text encoder with its hooks traces as one
    graph. Its output is the base output with the placeholders' rows replaced; the gradient reaches
    the vectors of the placeholders that occur, summed over their occurrences."""
    _, text_encoder = load_base_text_encoder(tiny)
    embedding = text_encoder.get_input_embeddings()
    first_id = embedding.num_embeddings
    ids = torch.full((3, 77), 49407)
    ids[:, 0] = 49406
    ids[0, 4], ids[1, 2], ids[1, 5] = first_id, first_id + 1, first_id  # caption 2 has no placeholder
    vectors = torch.randn(2, embedding.embedding_dim, requires_grad=True)
    injector = _TokenInjector(embedding, first_id, vectors)
    try:
        embeds = embedding(ids)
        want = embedding.weight[ids.clamp(max=first_id - 1)].detach().clone()
        want[ids >= first_id] = vectors.detach()[ids[ids >= first_id] - first_id]
        assert torch.equal(embeds, want)
        embeds.sum().backward()
        assert torch.equal(vectors.grad, torch.stack([torch.full((embedding.embedding_dim,), 2.0),
                                                      torch.ones(embedding.embedding_dim)]))
        torch._dynamo.reset()
        traced = torch.compile(lambda x: text_encoder(x)[0], backend="eager", fullgraph=True)  # raises at a break
        assert torch.allclose(traced(ids), text_encoder(ids)[0], atol=1e-6)
    finally:
        injector.remove()
        torch._dynamo.reset()
    assert not embedding._forward_hooks and not embedding._forward_pre_hooks


class _HostReads(TorchDispatchMode):
    """Counts the operations that make the host wait for a tensor's values (`item`, `bool`, `float`,
    a boolean-mask index), and `tolist`, while `counting`."""

    def __init__(self):
        super().__init__()
        self.counting, self.reads = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def test_one_loss_read_and_one_guard_read_per_step(dataset, tiny, monkeypatch):
    """Two classes, two micro-batches each per step: the host reads the step's losses once and the
    vectors' finiteness flags once, for all classes and micro-batches together."""
    mode = _HostReads()
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        if mode.counting:
            mode.reads.append("tolist")
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # AdamW reads its step count, a CPU tensor on every device: no wait
        counting, mode.counting = mode.counting, False
        try:
            return real_step(self, *args, **kwargs)
        finally:
            mode.counting = counting

    monkeypatch.setattr(torch.optim.AdamW, "step", step)

    def progress(index, step, total, loss):
        if index == 0:  # count from the first class's step 1 to its step 3: two whole steps
            mode.counting = step < 3

    classes = [TokenClass(dataset / "circle", "<c>", "circle"), TokenClass(dataset / "square", "<q>", "square")]
    with mode:
        results = run_textual_inversion_many(classes, model=tiny, steps=3, batch_size=2, gradient_accumulation=2,
                                             pin_norm=True, progress=progress)
    assert all(not isinstance(r, BaseException) for r in results)
    assert mode.reads == ["tolist", "tolist"] * 2, mode.reads


def test_drawing_ahead_draws_what_drawing_in_turn_draws(dataset, tiny):
    """The next step's first batch, drawn while the device still works on this step, is the batch the
    next step would draw; a checkpoint in between keeps the generator's state from before it."""
    from di_assets.ml.io import load_class_images
    from di_assets.ml.textual_inversion import TextualInversionConfig, _Learner

    spec = tiny.resolved()
    shared = _Shared.load(spec)
    cfg = TextualInversionConfig.for_family("tiny", batch_size=3, resolution=64, steps=3)
    images = load_class_images(dataset / "circle")
    in_turn, ahead = (_Learner(0, TokenClass(dataset / "circle", "<c>", "circle"), cfg, images, shared, spec, False)
                      for _ in range(2))
    first = in_turn.draw(), ahead.draw()
    state = in_turn.gen.get_state()
    ahead.draw_ahead()
    assert torch.equal(ahead.gen_state, state)  # what a checkpoint of step 1 records
    second = in_turn.draw(), ahead.draw()
    assert ahead.gen_state is None and ahead.ahead is None
    ahead.step = in_turn.step = 2  # the last step has no next one: nothing is drawn
    ahead.draw_ahead()
    assert ahead.ahead is None and torch.equal(ahead.gen.get_state(), in_turn.gen.get_state())
    for a, b in (first, second):
        for name in ("noisy", "t", "ids", "target"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(first[0].noisy, second[0].noisy)
