"""Multi-class textual inversion: K classes in one loop end where K separate runs end.

Each class draws its own batch from its own generator (its single run's draws), the batches go
through one text-encoder and one UNet pass, and the loss is the sum of each class's own mean loss;
so each token's gradient, AdamW state and checkpoints are its single run's, up to the summation
order of kernels that block their work by batch size. Measured on CPU (tiny model, 64 px, K=3): at 4
or 8 images per class the tokens, losses and eval losses come out bitwise equal; at 1 or 2 images the
tokens differ by at most 4e-6 (entries up to ~1, so ~4e-6 relative) and the losses by 1.2e-7, after
10 steps as after 100 (the noise does not grow). TOL allows some 3x that, for other CPU builds and GPU
kernels (cuBLAS/cuDNN pick algorithms by batch size).
"""

import dataclasses
import json
import logging

import dagster as dg
import pytest
import torch

from di_assets.ml.models import load_base_text_encoder
from di_assets.ml.textual_inversion import (
    EMBEDS_FILE, LOSS_FILE, NonFiniteTokenError, TextualInversionConfig, TokenClass, initial_embedding,
    load_learned_embeds, run_textual_inversion, run_textual_inversion_many,
)
from di_assets_tests.conftest import copy_classes, token_classes

SHAPES = ("circle", "square", "star")
TOL = dict(atol=1e-5, rtol=1e-4)  # see the module's docstring: bitwise equal on CPU
KW = dict(steps=6, batch_size=4, resolution=64, checkpoint_every=3)


@pytest.fixture
def shapes(tmp_path):
    return copy_classes(tmp_path / "shapes", SHAPES)


def _classes(data, out, names=SHAPES):
    return token_classes(data, out, names)


def _separately(classes, tiny, **kw):
    return [run_textual_inversion(c.train_path, c.token, c.class_name, model=tiny, output_dir=c.output_dir,
                                  config=c.config, **kw) for c in classes]


def _assert_same(a, b):
    assert a.token == b.token
    assert torch.allclose(a.embeds, b.embeds, **TOL), (a.token, (a.embeds - b.embeds).abs().max())
    assert a.losses == pytest.approx(b.losses, abs=TOL["atol"], rel=TOL["rtol"])
    assert a.initial_eval_loss == pytest.approx(b.initial_eval_loss, abs=TOL["atol"], rel=TOL["rtol"])
    assert a.final_eval_loss == pytest.approx(b.final_eval_loss, abs=TOL["atol"], rel=TOL["rtol"])
    assert a.resumed_from == b.resumed_from and a.steps == b.steps


def test_three_classes_together_equal_three_separate_runs(shapes, tiny, tmp_path):
    _, text_encoder = load_base_text_encoder(tiny)
    rows = text_encoder.get_input_embeddings().weight.detach().clone()
    kw = {**KW, "steps": 16, "learning_rate": 0.1, "pin_norm": True}  # enough for every class's loss to fall
    together = run_textual_inversion_many(_classes(shapes, tmp_path / "together"), model=tiny, **kw)
    separate = _separately(_classes(shapes, tmp_path / "separate"), tiny, **kw)
    tokenizer, _ = load_base_text_encoder(tiny)
    for name, a, b in zip(SHAPES, together, separate):
        _assert_same(a, b)
        assert a.final_eval_loss < a.initial_eval_loss  # the loss falls, class by class
        assert not torch.allclose(a.embeds[0], initial_embedding(tokenizer, text_encoder, name))  # it learned
        # each class's own files, as its single run writes them
        token, embeds = load_learned_embeds(tmp_path / "together" / name / EMBEDS_FILE)
        assert token == f"<{name}>" and torch.equal(embeds, a.embeds)
        record = json.loads((tmp_path / "together" / name / LOSS_FILE).read_text())
        assert record["config"] == json.loads((tmp_path / "separate" / name / LOSS_FILE).read_text())["config"]
        assert len(list((tmp_path / "together" / name / "checkpoints").glob("step-*.safetensors"))) == 2
    # the shared text encoder is untouched: no row changed, none added
    assert torch.equal(text_encoder.get_input_embeddings().weight, rows)
    # loaded into a fresh pipeline, only the three new rows are new, and they are the tokens
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny.resolved().diffusion, safety_checker=None)
    old = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    for name in SHAPES:
        pipe.load_textual_inversion(str(tmp_path / "together" / name / EMBEDS_FILE))
    weight = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert weight.shape[0] == old.shape[0] + 3 and torch.equal(weight[:old.shape[0]], old)
    for r in together:
        assert torch.equal(weight[pipe.tokenizer.convert_tokens_to_ids(r.token)], r.embeds[0])


def test_classes_with_their_own_settings_share_a_loop(shapes, tiny, tmp_path):
    """Per-class settings: multi-vector tokens shift the next class's ids; batch sizes, gradient
    accumulation, step counts and pinned norms differ by class."""
    base = TextualInversionConfig.for_family("tiny", resolution=64, steps=4, batch_size=3)
    classes = [
        TokenClass(shapes / "circle", "<c>", "circle", tmp_path / "c", dataclasses.replace(base, num_vectors=2)),
        TokenClass(shapes / "square", "<q>", "square", tmp_path / "q",
                   dataclasses.replace(base, batch_size=2, gradient_accumulation=2, steps=3)),
        TokenClass(shapes / "star", "<s>", "star", tmp_path / "s", dataclasses.replace(base, pin_norm=True, seed=5)),
    ]
    together = run_textual_inversion_many(classes, model=tiny)
    separate = _separately([dataclasses.replace(c, output_dir=tmp_path / "sep" / c.token) for c in classes], tiny)
    for a, b in zip(together, separate):
        _assert_same(a, b)
    assert [len(r.losses) for r in together] == [4, 3, 4] and together[0].embeds.shape == (2, 32)


def test_a_failing_class_fails_alone(shapes, tiny, tmp_path, caplog):
    """One class diverges (its own learning rate), one folder holds no readable image: both come
    back as errors, and the third class's token equals its single run's."""
    (shapes / "empty").mkdir()
    (shapes / "empty" / "broken.png").write_bytes(b"not a png")
    cfg = TextualInversionConfig.for_family("tiny", **KW)
    classes = [
        TokenClass(shapes / "empty", "<e>", "empty", tmp_path / "e"),
        TokenClass(shapes / "circle", "<c>", "circle", tmp_path / "c"),
        TokenClass(shapes / "square", "<q>", "square", tmp_path / "q", dataclasses.replace(cfg, learning_rate=1e20)),
    ]
    with caplog.at_level(logging.WARNING, logger="di_assets"):
        empty, circle, square = run_textual_inversion_many(classes, model=tiny, config=cfg)
    assert isinstance(empty, ValueError) and "has no readable images" in str(empty)
    assert isinstance(square, NonFiniteTokenError) and square.token == "<q>" and square.step == 2
    assert "textual inversion of <q> stopped, the others go on" in caplog.text
    _assert_same(circle, run_textual_inversion(shapes / "circle", "<c>", "circle", model=tiny, config=cfg))
    assert (tmp_path / "c" / EMBEDS_FILE).exists()
    assert not (tmp_path / "q" / EMBEDS_FILE).exists() and not (tmp_path / "e" / EMBEDS_FILE).exists()
    # the diverged class's checkpoints stop before its blow-up; nothing non-finite is on disk
    assert not list((tmp_path / "q").glob("checkpoints/*.safetensors"))


def test_resume_after_a_kill_equals_an_uninterrupted_run(shapes, tiny, tmp_path):
    """Killed at step 5, each class resumes from its own last checkpoint (star checkpoints every 2
    steps, the others every 3), and ends where an uninterrupted loop ends."""
    cfg = TextualInversionConfig.for_family("tiny", **KW)

    def classes(out):
        c = _classes(shapes, out)
        c[2] = dataclasses.replace(c[2], config=dataclasses.replace(cfg, checkpoint_every=2))
        return c

    straight = run_textual_inversion_many(classes(tmp_path / "a"), model=tiny, config=cfg)

    class Killed(Exception):
        pass

    seen = []

    def kill_at_5(index, step, total, loss):
        seen.append((index, step))
        if step == 5 and index == 1:
            raise Killed

    with pytest.raises(Killed):
        run_textual_inversion_many(classes(tmp_path / "b"), model=tiny, config=cfg, progress=kill_at_5)
    assert seen[:3] == [(0, 1), (1, 1), (2, 1)]  # one step of every class per iteration
    assert not list((tmp_path / "b").rglob(EMBEDS_FILE))  # nothing half-written
    resumed = run_textual_inversion_many(classes(tmp_path / "b"), model=tiny, config=cfg)
    assert [r.resumed_from for r in resumed] == [3, 3, 4]
    for a, b in zip(resumed, straight):
        assert torch.allclose(a.embeds, b.embeds, **TOL)
        assert a.losses == pytest.approx(b.losses, abs=TOL["atol"], rel=TOL["rtol"])


def test_class_token_trains_classes_per_batch_together(tmp_path, monkeypatch):
    """The asset over three classes with classes_per_batch 2: one loop of two classes, one single run;
    every partition gets its own record, chart, progress lines and token, as with one at a time, and as
    with two worker processes (ml/train_tokens.py)."""
    import di_assets.ml.train_tokens as train_tokens
    from di_assets.defs import CLASSES, build_assets, build_resources
    from di_assets.settings import Settings

    data = copy_classes(tmp_path / "data", SHAPES, per_class=2)
    ti_settings = {"steps": 4, "checkpoint_every": 2, "batch_size": 2}
    loops = []
    real_many = train_tokens.run_textual_inversion_many  # (in this process; a worker has its own)
    monkeypatch.setattr(train_tokens, "run_textual_inversion_many",
                        lambda classes, **kw: loops.append([c.token for c in classes]) or real_many(classes, **kw))
    records, logs = {}, {}
    configs = {2: {"classes_per_batch": 2, "workers": 1}, 1: {"classes_per_batch": 1, "workers": 1},
               "workers": {"classes_per_batch": 1, "workers": 2}}
    for per_batch, run_settings in configs.items():
        (tmp_path / "home" / str(per_batch)).mkdir(parents=True)
        settings = Settings.load(dataset=str(data), storage=str(tmp_path / f"store{per_batch}"),
                                 textual_inversion={**ti_settings, **run_settings})
        with dg.instance_for_test(temp_dir=str(tmp_path / "home" / str(per_batch))) as instance:
            instance.add_dynamic_partitions(CLASSES.name, list(SHAPES))
            result = dg.materialize(build_assets(settings), selection=["class_token"], instance=instance,
                                    resources=build_resources(settings),
                                    tags={"dagster/asset_partition_range_start": SHAPES[0],
                                          "dagster/asset_partition_range_end": SHAPES[-1]})
            assert result.success
            mats = instance.fetch_materializations(dg.AssetKey("class_token"), limit=10).records
            records[per_batch] = {m.asset_materialization.partition: m.asset_materialization.metadata for m in mats}
            logs[per_batch] = sorted(e.user_message for e in instance.all_logs(result.run_id)
                                     if ": step " in (e.user_message or ""))
    # classes_per_batch 2: circle and square in one loop, then star (a single run is a loop of one); 1: one
    # by one; the workers' loops ran in their own processes
    assert loops == [["<circle>", "<square>"], ["<star>"], ["<circle>"], ["<square>"], ["<star>"]]
    for per_batch in configs:
        store = tmp_path / f"store{per_batch}"
        assert set(records[per_batch]) == set(SHAPES)
        for key, meta in records[per_batch].items():
            assert meta["token"].value == f"<{key}>" and meta["steps"].value == 4
            assert meta["loss_curve"].value == str(store / "tokens" / key / "loss.png")
            assert (store / "tokens" / key / "loss.png").is_file() and (store / "tokens" / key / EMBEDS_FILE).is_file()
    for key in SHAPES:  # the same numbers every way
        for other in (2, "workers"):
            a, b = records[other][key], records[1][key]
            for field in ("final_loss", "eval_loss_before", "eval_loss_after", "norm"):
                assert a[field].value == pytest.approx(b[field].value, abs=TOL["atol"], rel=TOL["rtol"]), (key, field)
    assert logs[2] == logs[1] == logs["workers"] and len(logs[2]) == 3 * 4  # every class's progress lines
