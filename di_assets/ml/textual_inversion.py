"""Textual inversion: learn one new token embedding per class.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .defaults import TEXTUAL_INVERSION
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

    @classmethod
    def for_family(cls, family: str, **overrides) -> "TextualInversionConfig":
        base = cls(**TEXTUAL_INVERSION["sd" if family == "sd" else "tiny"])  # see ml/defaults.py
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def __post_init__(self):
        for f in ("steps", "batch_size", "gradient_accumulation", "resolution", "num_vectors", "checkpoint_every"):
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
    """Forward hooks that map ids >= `first_id` to rows of `vectors` without resizing the layer."""

    def __init__(self, embedding: torch.nn.Embedding, first_id: int, vectors: torch.Tensor):
        self.first_id, self.vectors, self._mask = first_id, vectors, None
        self._handles = [
            embedding.register_forward_pre_hook(self._pre),
            embedding.register_forward_hook(self._post),
        ]

    def _pre(self, module, args):
        ids = args[0]
        self._mask = ids >= self.first_id
        self._ids = ids
        return (ids.clamp(max=self.first_id - 1),)

    def _post(self, module, args, out):
        mask = self._mask
        if not mask.any():
            return out
        rows = self.vectors[(self._ids[mask] - self.first_id)].to(out.dtype)
        out = out.clone()
        out[mask] = rows
        return out

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
    """
    spec = (model or ModelSpec()).resolved()
    cfg = config or TextualInversionConfig.for_family(spec.family)
    if overrides:
        cfg = replace(cfg, **overrides)
    output_dir = Path(output_dir) if output_dir is not None else None
    device = spec.device

    images = load_class_images(train_path)  # warns once per unreadable file
    base_tokenizer, text_encoder = load_base_text_encoder(spec)
    text_encoder.to(device)
    unet, vae = load_diffusion_components(spec)
    scheduler = load_scheduler(spec, "ddpm")
    unet_dtype = next(unet.parameters()).dtype

    tokenizer = copy.deepcopy(base_tokenizer)
    names = placeholder_tokens(token, cfg.num_vectors)
    check_new_tokens(tokenizer, names)
    first_id = len(tokenizer)
    tokenizer.add_tokens(names)
    if tokenizer.convert_tokens_to_ids(names[0]) != first_id:
        raise RuntimeError("tokenizer did not append the new token at the end of its vocabulary")
    if text_encoder.get_input_embeddings().num_embeddings != first_id:
        raise ValueError("the base text encoder's vocabulary size differs from its tokenizer's")

    init = initial_embedding(tokenizer, text_encoder, class_name)
    init_norm = float(init.norm())
    vocab_norm = float(text_encoder.get_input_embeddings().weight.detach().norm(dim=-1).max())
    vectors = init.repeat(cfg.num_vectors, 1).to(device).requires_grad_(True)
    optimizer = torch.optim.AdamW([vectors], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    # Captions: the 27 templates with the placeholder, tokenized once.
    caption_ids = tokenizer(
        [t.format(" ".join(names)) for t in IMAGENET_TEMPLATES_SMALL], padding="max_length",
        max_length=text_encoder.config.max_position_embeddings, truncation=True, return_tensors="pt",
    ).input_ids.to(device)

    # VAE latents of every image and its mirror image, computed once.
    resolution = cfg.resolution or native_resolution(unet, vae)
    pixels = _preprocess(images, resolution)
    if cfg.flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    lat_mean, lat_std = encode_latents(vae, pixels)
    n_train = lat_mean.shape[0]
    n_timesteps = scheduler.config.num_train_timesteps
    prediction = scheduler.config.prediction_type

    run_config = {**asdict(cfg), "token": token, "class_name": class_name,
                  "data": hash_folder(train_path, warn=False), "model": spec.diffusion}
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    start = 0
    ckpt_dir = output_dir / "checkpoints" if output_dir else None
    if resume and ckpt_dir is not None:
        start = _restore(ckpt_dir, run_config, vectors, optimizer, gen, losses)

    injector = _TokenInjector(text_encoder.get_input_embeddings(), first_id, vectors)

    def diverged(step: int, loss: float, what: str) -> NonFiniteTokenError:
        return NonFiniteTokenError(
            f"textual inversion of {token} ({class_name}) diverged at step {step}: {what}; "
            f"lower textual_inversion.learning_rate (now {cfg.learning_rate:g})",
            token=token, step=step, loss=loss)

    def loss_on(idx, tmpl, noise_gen) -> torch.Tensor:
        latents = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=noise_gen).to(device)
        noise = torch.randn(latents.shape, generator=noise_gen).to(device)
        t = torch.randint(0, n_timesteps, (len(idx),), generator=noise_gen).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(caption_ids[tmpl])[0]
        pred = unet(noisy.to(unet_dtype), t, hidden.to(unet_dtype)).sample.float()
        target = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, t)
        return F.mse_loss(pred, target)

    def eval_loss() -> float:
        # The same images, captions, noise and timesteps every time, so before/after compare.
        g = torch.Generator().manual_seed(cfg.seed + 1)
        idx = torch.arange(min(n_train, 8))
        tmpl = torch.randint(0, len(IMAGENET_TEMPLATES_SMALL), (len(idx),), generator=g)
        with torch.no_grad():
            return float(sum(loss_on(idx, tmpl, g) for _ in range(4)) / 4)

    try:
        with torch.no_grad():
            saved = vectors.detach().clone()
            vectors.copy_(init.repeat(cfg.num_vectors, 1))
            initial_eval = eval_loss()
            vectors.copy_(saved)
        if start:
            log.info("resuming textual inversion of %s from step %d", token, start)
        log_every = max(1, cfg.steps // 10)
        for step in range(start, cfg.steps):
            total = 0.0
            for _ in range(cfg.gradient_accumulation):
                idx = torch.randint(0, n_train, (cfg.batch_size,), generator=gen)
                tmpl = torch.randint(0, len(IMAGENET_TEMPLATES_SMALL), (cfg.batch_size,), generator=gen)
                loss = loss_on(idx, tmpl, gen) / cfg.gradient_accumulation
                loss.backward()
                total += loss.detach().item()
            # Stop at the first non-finite loss or vector: `total` is already on the host, and the
            # vectors are a few numbers. Nothing non-finite reaches a checkpoint or the token file.
            if not math.isfinite(total):
                raise diverged(step + 1, total, f"the loss is {total}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.pin_norm:
                with torch.no_grad():
                    vectors.mul_(init_norm / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            if not bool(torch.isfinite(vectors).all()):
                raise diverged(step + 1, total, f"the learned vectors are not finite (loss {total:.4g})")
            losses.append(total)
            done = step + 1
            if progress is not None:
                progress(done, cfg.steps, total)
            if done % log_every == 0 or done == cfg.steps:
                log.info("%s: step %d/%d loss %.4f", token, done, cfg.steps, total)
            if ckpt_dir is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                _save_checkpoint(ckpt_dir, done, run_config, vectors, optimizer, gen, losses)
        final_eval = eval_loss()
    finally:
        injector.remove()

    result = TextualInversionResult(
        token=token, class_name=class_name, embeds=vectors.detach().float().cpu().clone(), losses=losses,
        initial_eval_loss=initial_eval, final_eval_loss=final_eval, init_norm=init_norm, vocab_norm=vocab_norm,
        steps=cfg.steps,
        resumed_from=start, output_dir=output_dir, config=run_config,
    )
    if output_dir is not None:
        save_learned_embeds(output_dir / EMBEDS_FILE, token, result.embeds)
        write_json(output_dir / LOSS_FILE, {
            "token": token, "class_name": class_name, "losses": losses,
            "initial_eval_loss": initial_eval, "final_eval_loss": final_eval,
            "init_norm": init_norm, "resumed_from": start, "config": run_config,
        })
    return result


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
    from safetensors.torch import save_file

    state = optimizer.state.get(vectors, {})
    tensors = {"vectors": vectors.detach().float().cpu().contiguous(),
               "generator": gen.get_state(), "losses": torch.tensor(losses, dtype=torch.float64)}
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
