"""Textual inversion: learn one new token embedding per class.

`run_textual_inversion` learns one class's token; `run_textual_inversion_many` learns several classes'
tokens in one loop (one UNet pass over all their images per step), each as its own run would.
Only the new token's vector(s) train. They live in a separate parameter that a forward hook
on the frozen embedding layer substitutes for the placeholder ids, so every other row of the
shared text encoder is untouched by construction. The vector starts from the mean of the
class name's token embeddings and, by default, keeps that initialiser's norm.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .defaults import TEXTUAL_INVERSION, default_classes_per_batch, default_workers
from .io import atomic_path, hash_folder, load_class_images, write_json
from .models import ModelSpec, load_base_text_encoder, load_diffusion_components, load_scheduler, native_resolution
from .templates import IMAGENET_TEMPLATES_SMALL

log = logging.getLogger("di_assets")

EMBEDS_FILE = "learned_embeds.safetensors"
LOSS_FILE = "loss.json"


class NonFiniteTokenError(FloatingPointError):
    """Training diverged: the loss or the learned vectors stopped being finite (one-line message).

    The last good checkpoint stays on disk; no token file is written.
    """

    def __init__(self, message: str, *, token: str | None = None, step: int | None = None,
                 loss: float | None = None):
        super().__init__(message)
        self.token, self.step, self.loss = token, step, loss

    def __reduce__(self):  # its fields survive the trip from a worker process (ml/train_tokens.py)
        return _non_finite, (self.args[0], self.token, self.step, self.loss)


def _non_finite(message, token, step, loss) -> NonFiniteTokenError:
    return NonFiniteTokenError(message, token=token, step=step, loss=loss)


_SD = TEXTUAL_INVERSION["sd"]  # the paper's defaults; the tiny family's are in ml/defaults.py too


@dataclass(frozen=True)
class TextualInversionConfig:
    """Hyperparameters. `for_family` gives the paper's defaults for `sd`, small ones for `tiny`."""

    steps: int = _SD["steps"]
    learning_rate: float = _SD["learning_rate"]
    batch_size: int = _SD["batch_size"]
    gradient_accumulation: int = _SD["gradient_accumulation"]
    resolution: int | None = _SD["resolution"]  # None: the model's native size (SD2 768, SD1 512, tiny 64)
    num_vectors: int = _SD["num_vectors"]
    seed: int = _SD["seed"]
    pin_norm: bool = _SD["pin_norm"]
    weight_decay: float = 1e-2
    checkpoint_every: int = _SD["checkpoint_every"]
    flip: bool = True  # random horizontal flip
    # Classes that train in one loop (run_textual_inversion_many); None: by family and device
    # (ml/defaults.py). It changes no token beyond float noise, so checkpoints and loss.json omit it.
    classes_per_batch: int | None = _SD["classes_per_batch"]
    # Processes that train groups of classes side by side (ml/train_tokens.py); None: by family and
    # device (ml/defaults.py). Like classes_per_batch, it changes how a token is trained, not what.
    workers: int | None = _SD["workers"]

    @classmethod
    def for_family(cls, family: str, **overrides) -> "TextualInversionConfig":
        base = cls(**TEXTUAL_INVERSION["sd" if family == "sd" else "tiny"])  # see ml/defaults.py
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def run_settings(self) -> dict:
        """The settings a token depends on: a checkpoint resumes only under the same ones."""
        return {k: v for k, v in asdict(self).items() if k not in ("classes_per_batch", "workers")}

    def classes_per_batch_on(self, family: str, device: str) -> int:
        """`classes_per_batch`, or its default for the model family and device."""
        return self.classes_per_batch or default_classes_per_batch(family, device)

    def workers_on(self, family: str, device: str, groups: int | None = None) -> int:
        """`workers`, or its default for the model family and device (and `groups` groups of classes)."""
        return self.workers or default_workers(family, device, groups)

    def __post_init__(self):
        for f in ("steps", "batch_size", "gradient_accumulation", "resolution", "num_vectors", "checkpoint_every",
                  "classes_per_batch", "workers"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise ValueError(f"textual inversion {f} must be >= 1, got {getattr(self, f)}")


@dataclass
class TextualInversionResult:
    token: str
    class_name: str
    embeds: torch.Tensor  # (num_vectors, dim), float32, CPU
    losses: list[float]
    initial_eval_loss: float
    final_eval_loss: float
    init_norm: float
    vocab_norm: float  # the largest row norm of the base vocabulary: the scale of a real word
    steps: int
    resumed_from: int = 0
    output_dir: Path | None = None
    config: dict = field(default_factory=dict)

    @property
    def embeds_path(self) -> Path | None:
        return self.output_dir / EMBEDS_FILE if self.output_dir else None


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """The diffusers convention for multi-vector tokens: `<t>`, `<t>_1`, `<t>_2`, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def check_new_tokens(tokenizer, tokens: list[str]) -> None:
    """Refuse tokens that the vocabulary already has, or that are not one word."""
    vocab = tokenizer.get_vocab()  # built once: it is a 49k-entry dict
    for token in tokens:
        if token in vocab or f"{token}</w>" in vocab:
            raise ValueError(f"token {token!r} already exists in the tokenizer's vocabulary; choose another token")
        if not token.strip() or any(ch.isspace() for ch in token):
            raise ValueError(f"token {token!r} must be one word without spaces, e.g. '<dog-1>'")


def initial_embedding(tokenizer, text_encoder, class_name: str) -> torch.Tensor:
    """Mean of the class name's token embeddings."""
    ids = tokenizer(class_name, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"class name {class_name!r} has no tokens to initialise the embedding from")
    weight = text_encoder.get_input_embeddings().weight
    return weight[torch.tensor(ids, device=weight.device)].float().mean(0).detach().cpu()


class _TokenInjector:
    """Forward hooks that map ids >= `first_id` to rows of `vectors` without resizing the layer
    (`vectors` may be replaced between forwards: the loop sets the rows of the classes in a batch).

    No host sync: the placeholders are selected with `torch.where`, never by a boolean index (whose
    size the host must read back from the device), so a step's kernels queue up without a stall
    and the text encoder can be traced whole by torch.compile. The values are those of writing the
    rows into a copy of the output; the vectors' gradient sums the same terms plus zeros."""

    def __init__(self, embedding: torch.nn.Embedding, first_id: int, vectors: torch.Tensor | None):
        self.first_id, self.vectors, self._ids = first_id, vectors, None
        self._handles = [
            embedding.register_forward_pre_hook(self._pre),
            embedding.register_forward_hook(self._post),
        ]

    def _pre(self, module, args):
        ids = args[0]
        self._ids = ids
        return (ids.clamp(max=self.first_id - 1),)

    def _post(self, module, args, out):
        ids, self._ids = self._ids, None
        rows = self.vectors[(ids - self.first_id).clamp(min=0)].to(out.dtype)
        return torch.where((ids >= self.first_id).unsqueeze(-1), rows, out)

    def remove(self):
        for h in self._handles:
            h.remove()


def _preprocess(images, resolution: int) -> torch.Tensor:
    """Center crop, resize, scale to [-1, 1]."""
    import numpy as np
    from PIL import Image

    out = []
    for im in images:
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior, computed once and sampled from at each step."""
    p = next(vae.parameters())
    means, stds = [], []
    for chunk in pixels.split(batch):
        dist = vae.encode(chunk.to(p.device, p.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("step-*.safetensors")) if ckpt_dir.is_dir() else []


@dataclass(frozen=True)
class TokenClass:
    """One class of `run_textual_inversion_many`: its image folder, its new token, the class name whose
    words initialise the token, where its files go (None: nowhere), and optionally its own settings
    (None: the run's `config` with its overrides; a class's own config takes no overrides)."""

    train_path: str | os.PathLike
    token: str
    class_name: str
    output_dir: str | os.PathLike | None = None
    config: TextualInversionConfig | None = None


def run_textual_inversion(
    train_path,
    token: str,
    class_name: str,
    *,
    model: ModelSpec | None = None,
    config: TextualInversionConfig | None = None,
    output_dir=None,
    resume: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
    **overrides,
) -> TextualInversionResult:
    """Learn `token` from the images in `train_path` (one class folder).

    Returns the learned embedding and its loss curve. With `output_dir`, writes
    `learned_embeds.safetensors` (diffusers format), `loss.json`, and checkpoints every
    `checkpoint_every` steps; a rerun resumes from the last compatible checkpoint.
    `progress(step, steps, loss)` is called after every step.

    The one-class case of `run_textual_inversion_many`; the class's error is raised.
    """
    each = None if progress is None else (lambda _index, step, total, loss: progress(step, total, loss))
    (result,) = run_textual_inversion_many([TokenClass(train_path, token, class_name, output_dir)], model=model,
                                           config=config, resume=resume, progress=each, **overrides)
    if isinstance(result, BaseException):
        raise result
    return result


def run_textual_inversion_many(
    classes: Sequence[TokenClass | tuple],
    *,
    model: ModelSpec | None = None,
    config: TextualInversionConfig | None = None,
    resume: bool = True,
    progress: Callable[[int, int, int, float], None] | None = None,
    **overrides,
) -> list[TextualInversionResult | Exception]:
    """Learn the tokens of several classes in one training loop; one result or error per class, in order.

    `classes`: `TokenClass`es, or tuples `(train_path, token, class_name, output_dir)`. Each step, every
    class draws its own batch from its own generator, exactly the draws (images, templates, noise,
    timesteps) of its single-class run; the batches are concatenated into one text-encoder and one
    UNet forward/backward, and the loss is the sum over classes of each class's own mean loss. The
    samples of one class reach no other class's vectors (the models are frozen and work per sample),
    so each token's gradient is its single run's, and with its own AdamW, checkpoints and divergence
    stop every token ends where `run_textual_inversion` would leave it, within float noise (a larger
    batch sums in another order).

    A class whose folder, token or training fails (non-finite loss or vectors) stops alone: its
    entry is the exception, and the others train on. `progress(index, step, steps, loss)` is called
    after each step of class `classes[index]`; an exception it raises stops the whole loop (each class
    resumes from its own checkpoints). All classes train in one batch: group them by
    `classes_per_batch` to bound its size (the settings' `textual_inversion.classes_per_batch`).
    """
    spec = (model or ModelSpec()).resolved()
    cfg = config or TextualInversionConfig.for_family(spec.family)
    if overrides:
        cfg = replace(cfg, **overrides)
    items = [c if isinstance(c, TokenClass) else TokenClass(*c) for c in classes]
    results: list = [None] * len(items)

    images, owners = {}, {}
    for i, item in enumerate(items):
        try:
            if item.output_dir is not None:
                where = Path(item.output_dir).resolve()
                if where in owners:
                    raise ValueError(f"token {item.token} ({item.class_name}): output_dir {item.output_dir} is "
                                     f"also {owners[where]}'s; give each class its own")
                owners[where] = item.token
            images[i] = load_class_images(item.train_path)  # warns once per unreadable file
        except Exception as exc:  # noqa: BLE001 - this class's own problem: the others still train
            results[i] = exc
    if not images:
        return results

    shared = _Shared.load(spec)
    learners = []
    for i, class_images in images.items():
        try:
            learners.append(_Learner(i, items[i], items[i].config or cfg, class_images, shared, spec, resume))
        except Exception as exc:  # noqa: BLE001 - as above
            results[i] = exc
    del images
    # One batch holds latents of one size: one loop per training resolution (one in practice).
    by_resolution: dict[int, list[_Learner]] = {}
    for learner in learners:
        by_resolution.setdefault(learner.resolution, []).append(learner)
    for group in by_resolution.values():
        _train_together(group, shared, progress)
    for learner in learners:
        results[learner.index] = learner.error if learner.error is not None else learner.result
    return results


EVAL_IMAGES = 8  # the eval loss's images per class (the first ones), each at 4 fixed noise draws
EVAL_REPEATS = 4


@dataclass
class _Shared:
    """The frozen models that every class of a loop uses (loaded once per process)."""

    base_tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    device: str

    @classmethod
    def load(cls, spec: ModelSpec) -> "_Shared":
        base_tokenizer, text_encoder = load_base_text_encoder(spec)
        text_encoder.to(spec.device)
        unet, vae = load_diffusion_components(spec)
        return cls(base_tokenizer, text_encoder, unet, vae, load_scheduler(spec, "ddpm"), spec.device)

    def __post_init__(self):
        self.unet_dtype = next(self.unet.parameters()).dtype
        embedding = self.text_encoder.get_input_embeddings()
        self.first_id = embedding.num_embeddings
        # the scale of a real word: the largest row norm of the base vocabulary (the same for every class)
        self.vocab_norm = float(embedding.weight.detach().norm(dim=-1).max())
        self.n_timesteps = self.scheduler.config.num_train_timesteps
        self.prediction = self.scheduler.config.prediction_type
        # The noise schedule's per-timestep factors, once, on the device: the scheduler's add_noise and
        # get_velocity recompute them from alphas_cumprod at every call (bitwise the same values).
        alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.sqrt_alpha = alphas_cumprod ** 0.5
        self.sqrt_one_minus_alpha = (1 - alphas_cumprod) ** 0.5

    def noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy latents at timesteps `t` and the UNet's target: the scheduler's `add_noise`, and
        `noise` (epsilon prediction) or `get_velocity` (v prediction), computed as they compute them."""
        shape = (-1,) + (1,) * (latents.dim() - 1)
        a, s = self.sqrt_alpha[t].view(shape), self.sqrt_one_minus_alpha[t].view(shape)
        noisy = a * latents + s * noise
        return noisy, (noise if self.prediction == "epsilon" else a * noise - s * latents)


@dataclass
class _Batch:
    noisy: torch.Tensor
    t: torch.Tensor
    ids: torch.Tensor  # caption ids in the class's own tokenizer (its vectors at first_id, first_id + 1, ...)
    target: torch.Tensor


class _Learner:
    """One class in a loop: its token's vectors, AdamW state, generator, latents, captions, losses,
    checkpoints and divergence stop; everything its single-class run has, drawn in the same order."""

    def __init__(self, index: int, item: TokenClass, cfg: TextualInversionConfig, images, shared: _Shared,
                 spec: ModelSpec, resume: bool):
        self.index, self.cfg, self.shared = index, cfg, shared
        self.token, self.class_name = token, class_name = item.token, item.class_name
        self.output_dir = Path(item.output_dir) if item.output_dir is not None else None
        device, text_encoder = spec.device, shared.text_encoder

        tokenizer = copy.deepcopy(shared.base_tokenizer)
        names = placeholder_tokens(token, cfg.num_vectors)
        check_new_tokens(tokenizer, names)
        first_id = len(tokenizer)
        tokenizer.add_tokens(names)
        if tokenizer.convert_tokens_to_ids(names[0]) != first_id:
            raise RuntimeError("tokenizer did not append the new token at the end of its vocabulary")
        if shared.first_id != first_id:
            raise ValueError("the base text encoder's vocabulary size differs from its tokenizer's")

        self.init = init = initial_embedding(tokenizer, text_encoder, class_name)
        self.init_norm = float(init.norm())
        self.vocab_norm = shared.vocab_norm
        self.vectors = init.repeat(cfg.num_vectors, 1).to(device).requires_grad_(True)
        self.optimizer = torch.optim.AdamW([self.vectors], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

        # Captions: the 27 templates with the placeholder, tokenized once.
        self.caption_ids = tokenizer(
            [t.format(" ".join(names)) for t in IMAGENET_TEMPLATES_SMALL], padding="max_length",
            max_length=text_encoder.config.max_position_embeddings, truncation=True, return_tensors="pt",
        ).input_ids.to(device)

        # VAE latents of every image and its mirror image, computed once.
        self.resolution = cfg.resolution or native_resolution(shared.unet, shared.vae)
        pixels = _preprocess(images, self.resolution)
        if cfg.flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        self.lat_mean, self.lat_std = encode_latents(shared.vae, pixels)
        self.n_train = self.lat_mean.shape[0]

        self.run_config = {**cfg.run_settings(), "token": token, "class_name": class_name,
                           "data": hash_folder(item.train_path, warn=False), "model": spec.diffusion}
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.ahead: _Batch | None = None  # the next step's first micro-batch, drawn ahead (draw_ahead)
        self.gen_state: torch.Tensor | None = None  # the generator's state before it
        self.losses: list[float] = []
        self.start = 0
        self.ckpt_dir = self.output_dir / "checkpoints" if self.output_dir else None
        if resume and self.ckpt_dir is not None:
            self.start = _restore(self.ckpt_dir, self.run_config, self.vectors, self.optimizer, self.gen, self.losses)
        self.step = self.start
        self.total = 0.0
        self.log_every = max(1, cfg.steps // 10)
        self.initial_eval: float | None = None
        self.error: Exception | None = None
        self.result: TextualInversionResult | None = None

    @property
    def running(self) -> bool:
        return self.error is None and self.step < self.cfg.steps

    def sample(self, idx: torch.Tensor, tmpl: torch.Tensor, gen: torch.Generator) -> _Batch:
        """Images `idx` with templates `tmpl`: a latent drawn from each posterior, noise and timesteps.

        The draws come from the CPU generator `gen` (the same numbers on every device); they go to the
        device without waiting for it (non_blocking: a host-to-device copy, safe from pageable memory),
        indices included (a CPU index into a device tensor would be copied with a wait)."""
        sh, device = self.shared, self.shared.device
        shape = (len(idx),) + tuple(self.lat_mean.shape[1:])
        eps = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        t = torch.randint(0, sh.n_timesteps, (len(idx),), generator=gen)
        idx, tmpl, eps, noise, t = (x.to(device, non_blocking=True) for x in (idx, tmpl, eps, noise, t))
        latents = self.lat_mean[idx] + self.lat_std[idx] * eps
        noisy, target = sh.noise(latents, noise, t)
        return _Batch(noisy, t, self.caption_ids[tmpl], target)

    def draw(self) -> _Batch:
        """One micro-batch of training, from this class's generator (the one drawn ahead, if any)."""
        if self.ahead is not None:
            batch, self.ahead, self.gen_state = self.ahead, None, None
            return batch
        b = self.cfg.batch_size
        idx = torch.randint(0, self.n_train, (b,), generator=self.gen)
        tmpl = torch.randint(0, len(IMAGENET_TEMPLATES_SMALL), (b,), generator=self.gen)
        return self.sample(idx, tmpl, self.gen)

    def draw_ahead(self) -> None:
        """Draw the next step's first micro-batch now, while the device still works on this step (the
        CPU generator's draws, latent-sized at every step, would otherwise leave it idle between steps).
        The same draws in the same order; a checkpoint of this step keeps the generator's state from
        before them. Not past the last step."""
        if self.step + 1 < self.cfg.steps:
            self.gen_state = self.gen.get_state()
            self.ahead = self.draw()

    def eval_draws(self) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
        """The same images, captions, noise and timesteps every time, so before/after compare."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        idx = torch.arange(min(self.n_train, EVAL_IMAGES))
        tmpl = torch.randint(0, len(IMAGENET_TEMPLATES_SMALL), (len(idx),), generator=gen)
        return gen, idx, tmpl

    def diverged(self, step: int, loss: float, what: str) -> NonFiniteTokenError:
        return NonFiniteTokenError(
            f"textual inversion of {self.token} ({self.class_name}) diverged at step {step}: {what}; "
            f"lower textual_inversion.learning_rate (now {self.cfg.learning_rate:g})",
            token=self.token, step=step, loss=loss)

    def fail(self, exc: Exception) -> None:
        self.error = exc
        self.vectors.grad = None
        self.ahead = self.gen_state = None

    def update(self) -> torch.Tensor | None:
        """The optimizer step after a step's micro-batches, unless the loss is not finite (`total` is on
        the host already): then this class stops, before its vectors change. Returns whether the vectors
        are still finite as a flag on the device, which the loop reads with the other classes' flags:
        one wait for the device per step, not one per class."""
        if not math.isfinite(self.total):
            self.fail(self.diverged(self.step + 1, self.total, f"the loss is {self.total}"))
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.pin_norm:
            with torch.no_grad():
                self.vectors.mul_(self.init_norm / self.vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return torch.isfinite(self.vectors).all()

    def finish_step(self, finite: bool, progress) -> None:
        """After `update`: stop at the first non-finite vector, so nothing non-finite reaches a checkpoint
        or the token file (the loss was checked before the update); then progress, log and checkpoint."""
        cfg, total, done = self.cfg, self.total, self.step + 1
        if not finite:
            return self.fail(self.diverged(done, total, f"the learned vectors are not finite (loss {total:.4g})"))
        self.losses.append(total)
        self.step = done
        if progress is not None:
            progress(self.index, done, cfg.steps, total)
        if done % self.log_every == 0 or done == cfg.steps:
            log.info("%s: step %d/%d loss %.4f", self.token, done, cfg.steps, total)
        if self.ckpt_dir is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            try:
                gen_state = self.gen.get_state() if self.gen_state is None else self.gen_state
                _save_checkpoint(self.ckpt_dir, done, self.run_config, self.vectors, self.optimizer, gen_state,
                                 self.losses)
            except OSError as exc:  # e.g. a full disk: this class stops, the others may still fit
                self.fail(exc)

    def finish(self, final_eval: float) -> None:
        """The result, and with an output_dir its token file and loss.json."""
        result = TextualInversionResult(
            token=self.token, class_name=self.class_name, embeds=self.vectors.detach().float().cpu().clone(),
            losses=self.losses, initial_eval_loss=self.initial_eval, final_eval_loss=final_eval,
            init_norm=self.init_norm, vocab_norm=self.vocab_norm, steps=self.cfg.steps,
            resumed_from=self.start, output_dir=self.output_dir, config=self.run_config,
        )
        if self.output_dir is not None:
            try:
                save_learned_embeds(self.output_dir / EMBEDS_FILE, self.token, result.embeds)
                write_json(self.output_dir / LOSS_FILE, {
                    "token": self.token, "class_name": self.class_name, "losses": self.losses,
                    "initial_eval_loss": self.initial_eval, "final_eval_loss": final_eval,
                    "init_norm": self.init_norm, "resumed_from": self.start, "config": self.run_config,
                })
            except (OSError, ValueError) as exc:
                return self.fail(exc)
        self.result = result


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _forward_losses(learners: list[_Learner], batches: list[_Batch], shared: _Shared,
                    injector: _TokenInjector) -> list[torch.Tensor]:
    """One text-encoder and one UNet pass over the classes' concatenated batches; each class's own
    mean squared error. Class k's placeholder ids move past the vectors of the classes before it."""
    injector.vectors = _cat([learner.vectors for learner in learners])
    ids, offset = [], 0
    for learner, batch in zip(learners, batches):
        ids.append(torch.where(batch.ids >= shared.first_id, batch.ids + offset, batch.ids) if offset else batch.ids)
        offset += learner.vectors.shape[0]
    hidden = shared.text_encoder(_cat(ids))[0]
    noisy, t = _cat([b.noisy for b in batches]), _cat([b.t for b in batches])
    pred = shared.unet(noisy.to(shared.unet_dtype), t, hidden.to(shared.unet_dtype)).sample.float()
    preds = [pred] if len(batches) == 1 else pred.split([len(b.t) for b in batches])
    return [F.mse_loss(p, b.target) for p, b in zip(preds, batches)]


def _eval_losses(learners: list[_Learner], shared: _Shared, injector: _TokenInjector, cap: int) -> list[float]:
    """Each class's eval loss, as its single run computes it: the mean of EVAL_REPEATS draws on its
    first images. Classes share a pass while their images fit in `cap`."""
    draws = [learner.eval_draws() for learner in learners]
    sums: list = [0] * len(learners)
    chunks, size = [], cap
    for i, (_, idx, _) in enumerate(draws):
        if size + len(idx) > cap:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += len(idx)
    with torch.no_grad():
        for chunk in chunks:
            for _ in range(EVAL_REPEATS):
                batches = [learners[i].sample(draws[i][1], draws[i][2], draws[i][0]) for i in chunk]
                losses = _forward_losses([learners[i] for i in chunk], batches, shared, injector)
                for i, loss in zip(chunk, losses):
                    sums[i] = sums[i] + loss
    return (torch.stack(sums) / EVAL_REPEATS).tolist() if sums else []  # one read for all classes


def _train_together(learners: list[_Learner], shared: _Shared, progress) -> None:
    """The shared loop: every running class takes one step per iteration (classes resumed from
    different steps run side by side, each on its own count); its result or error is left on it.

    A step waits for the device twice, whatever the number of classes and micro-batches: once for its
    losses (the non-finite guard and progress need them on the host before the update) and once for
    the updated vectors' finiteness flags. Nothing else in it reads a value back, so on a GPU the
    host queues a step's work without stalls and draws the next step's batch while the device runs."""
    # an eval pass holds no more images than a training pass (or than one class's eval in a single run)
    cap = max(EVAL_IMAGES, sum(learner.cfg.batch_size for learner in learners))
    injector = _TokenInjector(shared.text_encoder.get_input_embeddings(), shared.first_id, None)
    try:
        with torch.no_grad():
            saved = [learner.vectors.detach().clone() for learner in learners]
            for learner in learners:
                learner.vectors.copy_(learner.init.repeat(learner.cfg.num_vectors, 1))
            initial = _eval_losses(learners, shared, injector, cap)
            for learner, vectors in zip(learners, saved):
                learner.vectors.copy_(vectors)
        for learner, loss in zip(learners, initial):
            learner.initial_eval = loss
            if learner.start:
                log.info("resuming textual inversion of %s from step %d", learner.token, learner.start)
        active = [learner for learner in learners if learner.running]
        while active:
            for learner in active:
                learner.total = 0.0
            read = []  # each micro-batch's classes and their losses, on the device
            for micro in range(max(learner.cfg.gradient_accumulation for learner in active)):
                part = [learner for learner in active if micro < learner.cfg.gradient_accumulation]
                batches = [learner.draw() for learner in part]
                losses = [loss / learner.cfg.gradient_accumulation
                          for learner, loss in zip(part, _forward_losses(part, batches, shared, injector))]
                (losses[0] if len(losses) == 1 else torch.stack(losses).sum()).backward()
                read.append((part, torch.stack([loss.detach() for loss in losses])))
            for learner in active:  # queued behind this step's backward: the device is busy meanwhile
                learner.draw_ahead()
            # The step's losses, read back at once (a read waits for the device to finish the step's
            # work): summed on the host, micro-batch after micro-batch, as they always were.
            values = iter(_cat([losses for _, losses in read]).tolist())
            for part, _ in read:
                for learner in part:
                    learner.total += next(values)
            flags = [(learner, learner.update()) for learner in active]
            flags = [(learner, flag) for learner, flag in flags if flag is not None]
            if flags:
                for (learner, _), finite in zip(flags, torch.stack([flag for _, flag in flags]).tolist()):
                    learner.finish_step(finite, progress)
            for learner in active:
                if learner.error is not None and len(learners) > 1:
                    log.warning("textual inversion of %s stopped, the others go on: %s", learner.token,
                                learner.error)
            active = [learner for learner in active if learner.running]
        trained = [learner for learner in learners if learner.error is None]
        finals = _eval_losses(trained, shared, injector, cap)
    finally:
        injector.remove()
    for learner, loss in zip(trained, finals):
        learner.finish(loss)


def save_learned_embeds(path, token: str, embeds: torch.Tensor) -> None:
    """diffusers' `learned_embeds.safetensors`: {token: (num_vectors, dim)}."""
    from safetensors.torch import save_file

    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"refusing to write {path}: token {token} holds non-finite values (nan/inf); "
                         f"retrain it with a lower learning rate")
    with atomic_path(path) as tmp:
        save_file({token: embeds.detach().float().cpu().contiguous()}, str(tmp))


def load_learned_embeds(path) -> tuple[str, torch.Tensor]:
    from safetensors.torch import load_file

    data = load_file(str(path))
    if len(data) != 1:
        raise ValueError(f"{path} holds {len(data)} tensors; a learned_embeds file holds exactly one token")
    (token, embeds), = data.items()
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"{path}: token {token} holds non-finite values (nan/inf); delete it and retrain "
                         f"the token with a lower learning rate")
    return token, embeds.reshape(-1, embeds.shape[-1])


def _save_checkpoint(ckpt_dir: Path, step: int, run_config: dict, vectors, optimizer, gen, losses) -> None:
    """`gen`: the CPU generator, or the state to record for it."""
    from safetensors.torch import save_file

    state = optimizer.state.get(vectors, {})
    tensors = {"vectors": vectors.detach().float().cpu().contiguous(),
               "generator": gen.get_state() if isinstance(gen, torch.Generator) else gen,
               "losses": torch.tensor(losses, dtype=torch.float64)}
    for k in ("exp_avg", "exp_avg_sq", "step"):
        if k in state:
            tensors[f"adam.{k}"] = torch.as_tensor(state[k]).detach().cpu().contiguous()
    with atomic_path(ckpt_dir / f"step-{step:07d}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(step), "config": json.dumps(run_config, sort_keys=True)})
    for old in _checkpoints(ckpt_dir)[:-2]:  # keep the last two
        old.unlink(missing_ok=True)


def _restore(ckpt_dir: Path, run_config: dict, vectors, optimizer, gen, losses) -> int:
    """Load the newest checkpoint made with the same config and data; return its step (0 if none)."""
    from safetensors import safe_open

    want = json.dumps(run_config, sort_keys=True)
    for path in reversed(_checkpoints(ckpt_dir)):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("config") != want:
                    log.warning("ignoring checkpoint %s: made with other settings or images", path.name)
                    continue
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # a damaged checkpoint must not block training
            log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
            continue
        if not bool(torch.isfinite(t["vectors"]).all()):  # written by a version without the guard
            log.warning("ignoring checkpoint %s: its vectors are not finite", path.name)
            continue
        with torch.no_grad():
            vectors.copy_(t["vectors"].to(vectors.device))
        gen.set_state(t["generator"])
        losses[:] = t["losses"].tolist()
        if "adam.exp_avg" in t:
            optimizer.state[vectors] = {
                "step": t["adam.step"].clone(),
                "exp_avg": t["adam.exp_avg"].to(vectors.device),
                "exp_avg_sq": t["adam.exp_avg_sq"].to(vectors.device),
            }
        return int(meta["step"])
    return 0
