"""Counterfactual generation: prompts with `<TOKEN>` through a Stable Diffusion pipeline.

The pipeline is assembled once per process from the cached UNet/VAE of the base model and
the cached tokenizer/text encoder of the encoder root. Every image has its own seed (and its
own torch.Generator), so any single image can be regenerated alone, in any batch.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .encoder_root import ClassToken, load_encoder_root, read_tokens, resolve_class
from .defaults import GENERATION
from .models import ModelSpec, load_diffusion_components, load_scheduler, native_resolution, torch_dtype
from .shifts import TOKEN, check_prompt

log = logging.getLogger("di_assets")


@dataclass(frozen=True)
class GenerationConfig:
    num_inference_steps: int = GENERATION["sd"]["num_inference_steps"]
    guidance_scale: float = GENERATION["sd"]["guidance_scale"]
    scheduler: str = GENERATION["sd"]["scheduler"]
    resolution: int | None = GENERATION["sd"]["resolution"]  # None: the model's native size
    negative_prompt: str = GENERATION["sd"]["negative_prompt"]
    batch_size: int = GENERATION["sd"]["batch_size"]

    @classmethod
    def for_family(cls, family: str, **overrides) -> "GenerationConfig":
        base = cls(**GENERATION["sd" if family == "sd" else "tiny"])  # see ml/defaults.py
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Sample:
    prompt: str  # the prompt as written, with <TOKEN>
    text: str  # what the model saw
    seed: int
    image: object  # PIL.Image


def model_spec_for(encoder_root, model: ModelSpec | None) -> ModelSpec:
    """The encoder root remembers its base model; use it unless told otherwise."""
    if model is not None:
        return model
    meta = read_tokens(encoder_root)
    return ModelSpec(family=meta.get("family", "tiny"), diffusion=meta.get("base_model"))


@functools.lru_cache(maxsize=4)
def _pipeline(spec: ModelSpec, encoder_root: str, stamp: int, scheduler: str):
    from diffusers import StableDiffusionPipeline

    unet, vae = load_diffusion_components(spec)
    tokenizer, text_encoder = load_encoder_root(encoder_root, spec.device, torch_dtype(spec.dtype))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=load_scheduler(spec, scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def get_pipeline(encoder_root, model: ModelSpec | None = None, scheduler: str = "euler"):
    spec = model_spec_for(encoder_root, model).resolved()
    root = Path(encoder_root).resolve()
    return _pipeline(spec, str(root), (root / "tokens.json").stat().st_mtime_ns, scheduler)


def fill_prompt(prompt: str, ct: ClassToken, use_token: bool = True) -> str:
    check_prompt(prompt)
    return prompt.replace(TOKEN, ct.prompt_text if use_token else ct.name)


def generate_samples(
    encoder_root,
    c,
    prompts: str | Sequence[str],
    *,
    seeds: Sequence[int],
    use_token: bool = True,
    model: ModelSpec | None = None,
    config: GenerationConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """One image per (prompt, seed), prompt-major, in batches of `config.batch_size`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ct = resolve_class(encoder_root, c)
    texts = [fill_prompt(p, ct, use_token) for p in prompts]
    spec = model_spec_for(encoder_root, model).resolved()
    cfg = config or GenerationConfig.for_family(spec.family)
    pipe = get_pipeline(encoder_root, spec, cfg.scheduler)
    size = cfg.resolution or native_resolution(pipe.unet, pipe.vae)
    jobs = [(p, t, s) for p, t in zip(prompts, texts) for s in seeds]
    gen_device = "cpu" if spec.device == "mps" else spec.device
    out: list[Sample] = []
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start:start + cfg.batch_size]
        with torch.inference_mode():
            images = pipe(
                prompt=[t for _, t, _ in batch],
                negative_prompt=[cfg.negative_prompt] * len(batch) if cfg.negative_prompt else None,
                generator=[torch.Generator(gen_device).manual_seed(int(s)) for _, _, s in batch],
                num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                height=size, width=size, output_type="pil",
            ).images
        out += [Sample(p, t, int(s), im) for (p, t, s), im in zip(batch, images)]
        if progress is not None:
            progress(len(out), len(jobs))
    return out


def generate(
    encoder_root,
    c,
    prompts: str | Sequence[str],
    num_samples: int = 1,
    random_seed: int | None = None,
    *,
    use_token: bool = True,
    model: ModelSpec | None = None,
    **settings,
):
    """Generate `num_samples` images per prompt for class `c` (index or key), as in the paper.

    Sample `j` of every prompt uses seed `random_seed + j`, so shifts of one class share
    their starting noise. `use_token=False` puts the class name in place of the token (the
    baseline). `settings` are GenerationConfig fields (guidance_scale, num_inference_steps,
    scheduler, resolution, negative_prompt, batch_size).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if random_seed is None:
        random_seed = random.SystemRandom().randrange(2**31)
    spec = model_spec_for(encoder_root, model)
    cfg = GenerationConfig.for_family(spec.family, **settings)
    samples = generate_samples(encoder_root, c, prompts, seeds=range(random_seed, random_seed + num_samples),
                               use_token=use_token, model=spec, config=cfg)
    return [s.image for s in samples]


def contact_sheet(rows, row_labels=(), col_labels=(), size: int = 64):
    """One picture of image rows (a class per row, a shift per column), with labels if given."""
    from PIL import Image, ImageDraw

    left = 7 * max((len(s) for s in row_labels), default=0) + (6 if row_labels else 0)
    top = 26 if col_labels else 0
    columns = max((len(r) for r in rows), default=0)
    sheet = Image.new("RGB", (left + size * columns, top + size * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(col_labels):  # two short lines: `in the` / `grass`
        words = label.replace("_", " ").split()
        lines = [" ".join(words[:-1]), words[-1]] if len(words) > 1 else ["", label]
        for k, line in enumerate(lines):
            draw.text((left + size * j + 2, 1 + 12 * k), line[: size // 6], fill="black")
    for i, row in enumerate(rows):
        if i < len(row_labels):
            draw.text((3, top + size * i + size // 2 - 6), row_labels[i], fill="black")
        for j, im in enumerate(row):
            sheet.paste(im.convert("RGB").resize((size, size)), (left + size * j, top + size * i))
    return sheet
