"""Textual inversion stops at the first non-finite loss or vector; nothing non-finite is written."""

import dataclasses
import shutil

import dagster as dg
import pytest
import torch
from safetensors.torch import load_file, save_file

from di_assets.ml.textual_inversion import (
    EMBEDS_FILE, LOSS_FILE, NonFiniteTokenError, load_learned_embeds, run_textual_inversion, save_learned_embeds,
)

DIVERGE = dict(learning_rate=1e6, steps=12, checkpoint_every=2, seed=0)  # nan at step 6


def test_diverging_run_raises_and_keeps_only_finite_checkpoints(dataset, tiny, tmp_path):
    out = tmp_path / "tok"
    steps = []
    with pytest.raises(NonFiniteTokenError) as e:
        run_textual_inversion(dataset / "circle", "<c>", "circle", model=tiny, output_dir=out,
                              progress=lambda s, t, loss: steps.append(s), **DIVERGE)
    err = e.value
    msg = str(err)
    assert "\n" not in msg
    assert err.token == "<c>" and f"step {err.step}" in msg and err.step <= 10
    assert "lower textual_inversion.learning_rate (now 1e+06)" in msg
    assert steps == list(range(1, err.step))  # stopped at the first bad step, no step after it
    assert not (out / EMBEDS_FILE).exists() and not (out / LOSS_FILE).exists()
    ckpts = sorted((out / "checkpoints").glob("step-*.safetensors"))
    assert ckpts, "a checkpoint made before the blow-up stays on disk"
    for c in ckpts:
        assert torch.isfinite(load_file(str(c))["vectors"]).all(), c.name
        assert int(c.stem.split("-")[1]) < err.step
    assert not list(out.rglob(".*tmp-*"))


def test_non_finite_vectors_stop_before_their_checkpoint(dataset, tiny, tmp_path, monkeypatch):
    # The loss is still finite but the update overflows: the second optimizer step leaves inf.
    real_step, calls = torch.optim.AdamW.step, []

    def overflowing_step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    out = tmp_path / "tok"
    with pytest.raises(NonFiniteTokenError, match=r"diverged at step 2: the learned vectors are not finite"):
        run_textual_inversion(dataset / "circle", "<c>", "circle", model=tiny, output_dir=out, steps=4,
                              checkpoint_every=1, batch_size=1)
    assert not (out / EMBEDS_FILE).exists()
    assert [c.name for c in (out / "checkpoints").glob("*.safetensors")] == ["step-0000001.safetensors"]


def test_token_files_refuse_non_finite_values(tmp_path):
    bad = torch.tensor([[0.1, float("nan"), 0.3]])
    with pytest.raises(ValueError, match=r"refusing to write .*<x> holds non-finite values"):
        save_learned_embeds(tmp_path / EMBEDS_FILE, "<x>", bad)
    assert not (tmp_path / EMBEDS_FILE).exists()
    save_file({"<x>": torch.tensor([[float("inf"), 0.0]])}, str(tmp_path / "old.safetensors"))  # an old file
    with pytest.raises(ValueError, match=r"old.safetensors: token <x> holds non-finite values"):
        load_learned_embeds(tmp_path / "old.safetensors")


def test_encoder_root_refuses_a_non_finite_token(tiny, tmp_path):
    from di_assets.ml.encoder_root import create_token_dictionary

    good, bad = torch.zeros(1, 32), torch.full((1, 32), float("nan"))
    with pytest.raises(ValueError, match=r"class 'hot dog'.*<hd> holds non-finite values") as e:
        create_token_dictionary([good, bad], ["<ok>", "<hd>"], ["fine", "hot dog"], tmp_path / "root", model=tiny)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "root").exists()


def test_aggregated_error_names_every_failed_class():
    from di_assets.defs.class_token import ClassTokenError, raise_for_failures

    raise_for_failures({}, 3)  # nothing failed: no error
    with pytest.raises(ClassTokenError) as e:
        raise_for_failures({"b": "diverged at step 6; lower it", "c": "no readable images"}, 3)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("textual inversion failed for 2 of 3 classes")
    assert "b: diverged at step 6" in msg and "c: no readable images" in msg
    assert e.value.failures == {"b": "diverged at step 6; lower it", "c": "no readable images"}


def test_range_run_trains_the_good_classes_and_names_the_failed_ones(tmp_path, monkeypatch):
    """One run over three classes: `square` diverges, `empty` has no readable image; `circle` still
    gets its token, and the step fails with one line that names both failed classes."""
    import di_assets.ml.train_tokens as train_tokens
    from di_assets.defs import CLASSES, build_assets, build_resources
    from di_assets.settings import Settings
    from di_assets_tests.conftest import copy_classes

    data = copy_classes(tmp_path / "data", per_class=2)
    (data / "empty").mkdir()
    (data / "empty" / "readme.png").write_text("not an image")
    # workers 1: trained in this process, where the patch below is
    settings = Settings.load(dataset=str(data), storage=str(tmp_path / "store"),
                             textual_inversion={"steps": 4, "checkpoint_every": 2, "batch_size": 2, "workers": 1})
    real = train_tokens.run_textual_inversion_many

    def one_class_diverges(classes, *, config, **kw):
        # one learning rate is shared: give this class its own, diverging one (nan at step 2)
        return real([dataclasses.replace(c, config=dataclasses.replace(config, learning_rate=1e20))
                     if c.class_name == "square" else c for c in classes], config=config, **kw)

    monkeypatch.setattr(train_tokens, "run_textual_inversion_many", one_class_diverges)
    store = tmp_path / "store"
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        keys = ["circle", "empty", "square"]
        instance.add_dynamic_partitions(CLASSES.name, keys)
        result = dg.materialize(
            build_assets(settings), selection=["class_token"], instance=instance, resources=build_resources(settings),
            tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
            raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    msg = failure.step_failure_data.error.cause.message if failure.step_failure_data.error.cause else \
        failure.step_failure_data.error.message
    line = msg.strip().splitlines()[0]
    assert "failed for 2 of 3 classes" in line
    assert "empty: class folder" in line and "has no readable images" in line
    assert "square: textual inversion of <square>" in line and "learning_rate (now 1e+20)" in line
    assert "circle" not in line.split(":", 1)[1].replace("the other classes", "")
    assert (store / "tokens" / "circle" / EMBEDS_FILE).exists()  # the good class's token is written
    assert not (store / "tokens" / "square" / EMBEDS_FILE).exists()
    assert not (store / "tokens" / "empty" / EMBEDS_FILE).exists()
    shutil.rmtree(tmp_path / "home", ignore_errors=True)
