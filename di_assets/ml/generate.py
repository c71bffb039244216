"""Counterfactual generation: prompts with `<TOKEN>` through a Stable Diffusion pipeline.

The pipeline is assembled once per process from the cached UNet/VAE of the base model and
the cached tokenizer/text encoder of the encoder root. By default every image has its own seed
(and its own torch.Generator), so any single image can be regenerated alone, in any batch;
`seed_mode="paper"` draws the images of a prompt one after another from one generator, as the
paper's code does.

The text encoder sees exactly the prompt as filled in: `<TOKEN>` becomes every vector of the
class token (`<t> <t>_1 ...`) once, and the pipeline's own multi-vector expansion is off.
"""

from __future__ import annotations

import functools
import itertools
import logging
import numbers
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .defaults import GENERATION
from .encoder_root import ClassToken, load_encoder_root, read_tokens, resolve_class, root_marker
from .models import (
    ModelSpec, base_model_location, load_diffusion_components, load_scheduler, native_resolution, torch_dtype,
)
from .shifts import TOKEN, check_prompt

log = logging.getLogger("di_assets")

SEED_MODES = ("per_image", "paper")


@dataclass(frozen=True)
class GenerationConfig:
    num_inference_steps: int = GENERATION["sd"]["num_inference_steps"]
    guidance_scale: float = GENERATION["sd"]["guidance_scale"]
    scheduler: str = GENERATION["sd"]["scheduler"]
    resolution: int | None = GENERATION["sd"]["resolution"]  # None: the model's native size
    negative_prompt: str = GENERATION["sd"]["negative_prompt"]
    batch_size: int = GENERATION["sd"]["batch_size"]
    # per_image: image j of a prompt from its own generator seeded `seed + j` (batched, each image
    # reproducible alone). paper: one generator per prompt seeded `seed`, its images drawn one after
    # another, one pipeline call each (the paper's `generate`; batch_size is not used).
    seed_mode: str = "per_image"
    output_size: int | None = None  # resize every image to this square size (the paper: 512); None keeps it

    def __post_init__(self):
        if self.seed_mode not in SEED_MODES:
            raise ValueError(f"unknown seed_mode {self.seed_mode!r}; choose one of {', '.join(SEED_MODES)}")

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
    draw: int = 0  # seed_mode="paper": the image's place in its generator's sequence


def model_spec_for(encoder_root, model: ModelSpec | None) -> ModelSpec:
    """The encoder root remembers its base model; use it unless told otherwise."""
    if model is not None:
        return model
    meta = read_tokens(encoder_root)
    return ModelSpec(family=meta.get("family", "tiny"), diffusion=base_model_location(meta.get("base_model")))


def _prompt_as_written(prompt, tokenizer=None):
    return prompt


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
    # Prompts arrive with every vector of a token written out (`fill_prompt`); diffusers' textual-
    # inversion conversion would add `<t>_1 ...` after `<t>` once more.
    pipe.maybe_convert_prompt = _prompt_as_written
    return pipe


def get_pipeline(encoder_root, model: ModelSpec | None = None, scheduler: str = "euler"):
    spec = model_spec_for(encoder_root, model).resolved()
    root = Path(encoder_root).resolve()
    return _pipeline(spec, str(root), root_marker(root).stat().st_mtime_ns, scheduler)


def fill_prompt(prompt: str, ct: ClassToken, use_token: bool = True) -> str:
    check_prompt(prompt)
    return prompt.replace(TOKEN, ct.prompt_text if use_token else ct.name)


class _Run:
    """The pipeline and settings that every image of one call shares."""

    def __init__(self, encoder_root, spec: ModelSpec, cfg: GenerationConfig):
        self.cfg = cfg
        self.pipe = get_pipeline(encoder_root, spec, cfg.scheduler)
        size = cfg.resolution or native_resolution(self.pipe.unet, self.pipe.vae)
        self.gen_device = "cpu" if spec.device == "mps" else spec.device
        self.settings = dict(num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                             height=size, width=size, output_type="pil")

    def finish(self, im):
        size = self.cfg.output_size
        return im.resize((size, size)) if size else im  # PIL: bicubic

    def batch(self, items: Sequence[tuple[str, str, int]]) -> list[Sample]:
        """One pipeline call for these (prompt, text, seed) items, each image from its own generator."""
        cfg = self.cfg
        with torch.inference_mode():
            images = self.pipe(
                prompt=[t for _, t, _ in items],
                negative_prompt=[cfg.negative_prompt] * len(items) if cfg.negative_prompt else None,
                generator=[torch.Generator(self.gen_device).manual_seed(s) for _, _, s in items],
                **self.settings,
            ).images
        return [Sample(p, t, s, self.finish(im)) for (p, t, s), im in zip(items, images)]

    def paper(self, prompt: str, text: str, seed: int, draws: int) -> Iterator[Sample]:
        """seed_mode="paper": `draws` images drawn one after another from one generator seeded `seed`."""
        generator = torch.Generator(self.gen_device).manual_seed(seed)
        for d in range(draws):
            with torch.inference_mode():
                image = self.pipe(prompt=text, negative_prompt=self.cfg.negative_prompt or None, generator=generator,
                                  **self.settings).images[0]
            yield Sample(prompt, text, seed, self.finish(image), d)


@dataclass(frozen=True)
class _Plan:
    """The images of one class's prompts and seeds: (prompt, text, seed), prompt-major, made when
    iterated (a run over every class x shift pair holds one small plan per pair, not every image)."""

    prompts: tuple[str, ...]
    texts: tuple[str, ...]
    seeds: Sequence[int]

    def __len__(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def __iter__(self) -> Iterator[tuple[str, str, int]]:
        return ((p, t, int(s)) for p, t in zip(self.prompts, self.texts) for s in self.seeds)


def _plan(encoder_root, c, prompts, seeds, use_token: bool) -> _Plan:
    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    ct = resolve_class(encoder_root, c)
    texts = tuple(fill_prompt(p, ct, use_token) for p in prompts)
    return _Plan(prompts, texts, seeds if isinstance(seeds, range) else [int(s) for s in seeds])


def _per_image(run: _Run, plans: list[_Plan], progress) -> Iterator[list[Sample]]:
    """Every plan's images in batches of `batch_size` filled across plans; each plan's samples as soon
    as its last image is made, in order."""
    flat = ((j, item) for j, plan in enumerate(plans) for item in plan)
    total = sum(len(plan) for plan in plans)
    made: list[list[Sample]] = [[] for _ in plans]
    done = nxt = 0
    while True:
        while nxt < len(plans) and len(made[nxt]) == len(plans[nxt]):
            out, made[nxt] = made[nxt], []
            nxt += 1
            yield out
        batch = list(itertools.islice(flat, run.cfg.batch_size))
        if not batch:
            return
        for (j, _), sample in zip(batch, run.batch([item for _, item in batch])):
            made[j].append(sample)
        done += len(batch)
        if progress is not None:
            progress(done, total)


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
    draws: int = 1,
) -> list[Sample]:
    """Images of class `c` (an int index, or a str key / name / token), prompt-major.

    `config.seed_mode="per_image"` (the default): one image per (prompt, seed), each from its
    own generator seeded with that seed, in batches of `config.batch_size`.
    `config.seed_mode="paper"`: per (prompt, seed), one generator seeded with `seed` draws
    `draws` images one after another, one pipeline call per image, as the paper's `generate`
    does; `Sample.draw` is an image's place in that sequence.
    For many classes or prompts with batches filled across them, see `generate_many`.
    """
    plan = _plan(encoder_root, c, prompts, seeds, use_token)
    spec = model_spec_for(encoder_root, model).resolved()
    cfg = config or GenerationConfig.for_family(spec.family)
    if draws < 1 or (draws > 1 and cfg.seed_mode != "paper"):
        raise ValueError(f"draws={draws}: several draws per seed need seed_mode='paper' (per_image: one image per seed)")
    run = _Run(encoder_root, spec, cfg)
    if cfg.seed_mode != "paper":
        return next(_per_image(run, [plan], progress))
    out: list[Sample] = []
    for p, t, s in plan:
        for sample in run.paper(p, t, s, draws):
            out.append(sample)
            if progress is not None:
                progress(len(out), len(plan) * draws)
    return out


def generate_many(
    encoder_root,
    jobs: Iterable[tuple[object, str | Sequence[str], Sequence[int]]],
    *,
    use_token: bool = True,
    model: ModelSpec | None = None,
    config: GenerationConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[list[Sample]]:
    """`generate_samples` of many `(class, prompts, seeds)` jobs, with batches filled across jobs.

    Yields one list of samples per job, in the order of `jobs`, each as soon as its last image is
    made (so a caller can write a job's images while later jobs run). With the default
    `seed_mode="per_image"`, every image comes from its own generator seeded with its seed, so a
    job's images are those of `generate_samples` for that job alone, up to the float noise of
    another batch composition (a pixel level or so on CPU); the pipeline sees `config.batch_size`
    images per call until the last batch, whatever the jobs' sizes. `seed_mode="paper"` makes one
    pipeline call per image anyway: the jobs run one after another. `progress(done, total)`
    counts images over all jobs.

    Every job's class and prompts are checked first, so a bad job fails before any image is made.
    """
    plans = [_plan(encoder_root, c, prompts, seeds, use_token) for c, prompts, seeds in jobs]
    spec = model_spec_for(encoder_root, model).resolved()
    cfg = config or GenerationConfig.for_family(spec.family)
    run = _Run(encoder_root, spec, cfg)
    if cfg.seed_mode != "paper":
        return _per_image(run, plans, progress)

    def one_after_another():
        total, done = sum(len(plan) for plan in plans), 0
        for plan in plans:
            out = []
            for p, t, s in plan:
                out += run.paper(p, t, s, 1)
                done += 1
                if progress is not None:
                    progress(done, total)
            yield out

    return one_after_another()


def _prompt_seeds(random_seed, n_prompts: int) -> list[int]:
    """One starting seed per prompt from what the paper's `generate` accepts.

    An int is every prompt's seed; a sequence (a list, or a `range` as the paper's notebook
    passes) gives one seed per prompt; -1 (the paper's default) or None means unseeded: a seed
    is drawn at random (one for the call, so the prompts' images still share their noise).
    """
    def integral(s) -> bool:
        return isinstance(s, numbers.Integral) and not isinstance(s, bool)

    def one(s):
        if s is None or (integral(s) and int(s) == -1):
            return None
        if integral(s):
            return int(s)
        raise TypeError(f"random_seed must be an int, None, or one int per prompt; got {type(s).__name__} {s!r}")

    if random_seed is None or integral(random_seed):
        seeds = [one(random_seed)] * n_prompts
    elif isinstance(random_seed, (str, bytes)) or not hasattr(random_seed, "__len__"):
        raise TypeError(f"random_seed must be an int, None, or one int per prompt; got {random_seed!r}")
    else:
        seeds = [one(s) for s in random_seed]
        if len(seeds) != n_prompts:
            raise ValueError(f"random_seed gives {len(seeds)} seeds for {n_prompts} prompts; give one per prompt")
    drawn = random.SystemRandom().randrange(2**31)
    return [drawn if s is None else s for s in seeds]


def generate(
    encoder_root,
    c,
    prompts: str | Sequence[str],
    num_samples: int = 1,
    random_seed: int | Sequence[int] | None = None,
    *,
    use_token: bool = True,
    model: ModelSpec | None = None,
    seed_mode: str | None = None,
    **settings,
):
    """Generate `num_samples` images per prompt for class `c`, with the paper's call patterns.

    `c` is an int index, or a str key (else display name, else token); a str is never an
    index. `prompts` is one prompt (returns a list of images) or a list of prompts (returns
    one list of images per prompt). `random_seed` is an int, one int per prompt (a list or a
    `range`), or None / -1 (the paper's default) for a random seed. `use_token=False` puts
    the class name in place of the token (the baseline).

    `seed_mode`:
      - `"per_image"` (the default): image `j` of a prompt comes from its own generator seeded
        `seed + j`, so any image can be regenerated alone and the shifts of one class share
        their starting noise.
      - `"paper"`: as the paper's `generate`: one `torch.Generator` per prompt seeded `seed`,
        the prompt's images drawn from it one after another, one pipeline call per image.
        Image `j` then depends on images `0..j-1` and on the step count. The paper's own
        images also need its model and settings: `model=ModelSpec(family="sd",
        dtype="float16")` on CUDA (it seeds a CUDA generator and runs SD2 in float16), 50
        steps, guidance 7.5 and the Euler scheduler (the `sd` defaults), and `output_size=512`
        (it resizes every image to 512x512).

    `settings` are GenerationConfig fields (guidance_scale, num_inference_steps, scheduler,
    resolution, negative_prompt, batch_size, output_size).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    single = isinstance(prompts, str)
    prompt_list = [prompts] if single else list(prompts)
    seeds = _prompt_seeds(random_seed, len(prompt_list))
    spec = model_spec_for(encoder_root, model)
    cfg = GenerationConfig.for_family(spec.family, seed_mode=seed_mode, **settings)
    paper = cfg.seed_mode == "paper"
    groups: dict[int, list[int]] = {}  # prompts that share a seed go in one call (per_image batches them)
    for i, s in enumerate(seeds):
        groups.setdefault(s, []).append(i)
    rows: dict[int, list] = {}
    for s, idx in groups.items():
        samples = generate_samples(encoder_root, c, [prompt_list[i] for i in idx],
                                   seeds=[s] if paper else range(s, s + num_samples), use_token=use_token,
                                   model=spec, config=cfg, draws=num_samples if paper else 1)
        for k, i in enumerate(idx):
            rows[i] = [x.image for x in samples[k * num_samples:(k + 1) * num_samples]]
    out = [rows[i] for i in range(len(prompt_list))]
    return out[0] if single else out


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
