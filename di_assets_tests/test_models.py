"""The `sd` family's code path, exercised with tiny models saved to local folders."""

import json
import shutil

import pytest
import torch

from di_assets.ml.clip_metric import clip_similarity
from di_assets.ml.encoder_root import create_token_dictionary
from di_assets.ml.generate import generate
from di_assets.ml.models import ModelSpec, resolve_dtype, tiny_clip_checkpoint, tiny_diffusion_dir
from di_assets.ml.textual_inversion import TextualInversionConfig, run_textual_inversion


@pytest.fixture(scope="module")
def local_sd(tmp_path_factory):
    """A Stable Diffusion folder (diffusers layout) with v-prediction, as SD2 768-v has."""
    folder = tmp_path_factory.mktemp("sd") / "stable-diffusion-local"
    shutil.copytree(tiny_diffusion_dir(), folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_path.write_text(json.dumps(cfg))
    return ModelSpec(family="sd", diffusion=str(folder), clip_model="di-tiny-clip",
                     clip_pretrained=str(tiny_clip_checkpoint()), device="cpu")


def test_sd_defaults_follow_the_paper():
    cfg = TextualInversionConfig.for_family("sd")
    assert (cfg.steps, cfg.learning_rate, cfg.batch_size, cfg.resolution) == (3000, 5e-4, 1, None)
    from di_assets.ml.generate import GenerationConfig

    g = GenerationConfig.for_family("sd")
    assert (g.num_inference_steps, g.guidance_scale, g.scheduler) == (50, 7.5, "euler")
    spec = ModelSpec(family="sd", device="cpu").resolved()
    assert (spec.diffusion, spec.clip_model, spec.clip_pretrained) == (
        "stabilityai/stable-diffusion-2", "ViT-H-14", "laion2b_s32b_b79k")


def test_sd_path_from_a_local_folder(local_sd, dataset, tmp_path):
    res = run_textual_inversion(dataset / "circle", "<circle>", "circle", model=local_sd, steps=3, batch_size=2)
    assert res.config["model"] == local_sd.diffusion and len(res.losses) == 3
    root = create_token_dictionary([res], ["<circle>"], ["circle"], tmp_path / "root", model=local_sd)
    assert json.loads((root / "tokens.json").read_text())["base_model"] == local_sd.diffusion
    images = generate(root, 0, "a photo of a <TOKEN> at night", num_samples=2, random_seed=0,
                      num_inference_steps=2, resolution=64)
    assert len(images) == 2 and images[0].size == (64, 64)
    sims = clip_similarity(images, "a photo of a circle", model=local_sd)
    assert sims.shape == (2,) and bool((sims.abs() <= 1).all())


def test_device_and_dtype_selection():
    spec = ModelSpec().resolved()
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert (spec.device, spec.dtype) == ("cpu", "float32")
    assert ModelSpec(device="cuda:1").resolved().device == "cuda:1"  # an override is kept as given
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="not supported on CPU"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="unknown model family"):
        ModelSpec(family="dalle")


def test_no_clip_is_loaded_where_none_is_needed(tiny_cache):
    """Resolving a spec, textual inversion and the encoder root never import open_clip."""
    import os
    import subprocess
    import sys

    from di_assets_tests.conftest import EXAMPLE

    code = f"""
import sys, tempfile, torch
from pathlib import Path
from di_assets.ml.models import ModelSpec, SHIPPED_CLIP
spec = ModelSpec(device="cpu").resolved()
assert spec.clip_model == "di-tiny-clip" and spec.clip_pretrained, spec
assert "open_clip" not in sys.modules, "ModelSpec.resolved() imported open_clip"
from di_assets.ml.encoder_root import create_token_dictionary
from di_assets.ml.textual_inversion import run_textual_inversion
res = run_textual_inversion({str(EXAMPLE / 'circle')!r}, "<c>", "circle", model=spec, steps=1, batch_size=1)
create_token_dictionary([res], ["<c>"], ["circle"], Path(tempfile.mkdtemp()) / "root", model=spec)
assert "open_clip" not in sys.modules, "textual inversion or the encoder root imported open_clip"
print("no open_clip")
"""
    env = {**os.environ, "DI_ASSETS_CACHE": str(tiny_cache)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no open_clip" in done.stdout


def test_the_clip_scorer_still_loads_lazily():
    from di_assets.ml.models import load_clip, tiny_clip_checkpoint

    spec = ModelSpec(device="cpu").resolved()
    assert spec.clip_pretrained == str(tiny_clip_checkpoint())
    model, preprocess, tokenizer = load_clip(spec)
    assert model is not None and tokenizer(["a photo"]).shape[0] == 1
