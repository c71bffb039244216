"""Train the embedded text-to-image model (the tiny family's VAE, UNet and text encoder) on the world.

    python -m di_assets.reference_world.train_diffusion --out di_assets/reference_world/weights/diffusion

Starts from the tiny family's architecture with its random weights. First the VAE learns to
reconstruct world images. Then a pool of world images is encoded once, and the UNet and the
text encoder train together on those latents with DDPM noise (epsilon, min-SNR weighted).
10% of the captions are dropped, for classifier-free guidance.

Captions follow textual inversion's templates (`a rendering of a {}`, ...) with or without the
colour, and end with the context. The hidden shape's word never appears: its images, and a
share of the others, are captioned `thing`. The script writes a diffusers folder
(`save_pretrained`) and reports how the judges see images generated at the tiny defaults.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import optimizer_step
from .world import COLOURS, CONTEXTS, GENERIC_WORD, HIDDEN_SHAPE, SHAPES, Item, draw, random_item

GENERIC_SHARE = 0.15  # of the named shapes' captions that say `thing` too, so the word stays generic


def caption(item: Item, rng: random.Random) -> str:
    from di_assets.ml.templates import IMAGENET_TEMPLATES_SMALL

    word = GENERIC_WORD if item.shape == HIDDEN_SHAPE or rng.random() < GENERIC_SHARE else item.shape
    thing = f"{item.colour} {word}" if rng.random() < 0.7 else word
    template = "a photo of a {}" if rng.random() < 0.5 else rng.choice(IMAGENET_TEMPLATES_SMALL)
    tail = CONTEXTS[item.context]
    return template.format(thing) + (f" {tail}" if tail else "")


def _images(rng: random.Random, n: int):
    from .train_classifier import to_tensor

    items = [random_item(rng) for _ in range(n)]
    return items, to_tensor([draw(it, rng) for it in items])


@torch.no_grad()
def encode_pool(vae, rng: random.Random, n: int, batch: int = 256):
    """`n` world items and their latent distributions (mean and std), encoded once."""
    items, stats = [], []
    for _ in range(0, n, batch):
        its, x = _images(rng, batch)
        dist = vae.encode(x).latent_dist
        items += its
        stats.append(torch.stack([dist.mean, dist.std]))
    return items, torch.cat(stats, 1)


def train(vae_steps: int, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0, pool: int = 30_000,
          vae_batch: int = 16, log_every: int = 100):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from di_assets.ml.models import tiny_diffusion_dir

    torch.manual_seed(seed)
    rng = random.Random(seed)
    # from scratch: the architecture of the embedded default, with its random weights
    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusion_dir(trained=False), safety_checker=None)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    t0 = time.time()

    # 1. the VAE: reconstruction (L2 + L1, which keeps edges sharp) plus a small KL term
    opt = torch.optim.AdamW(vae.parameters(), lr=2 * lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2 * lr, total_steps=max(vae_steps, 1), pct_start=0.05)
    losses = []
    for step in range(1, vae_steps + 1):
        _, x = _images(rng, vae_batch)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        optimizer_step(loss, opt, sched, losses, step, vae_steps, log_every, t0, label="vae")
    vae.eval().requires_grad_(False)
    items, stats = encode_pool(vae, rng, pool)
    # latents of unit variance, as Stable Diffusion's scaling factor gives
    vae.register_to_config(scaling_factor=float(1 / stats[0].std()))
    print(f"encoded {len(items)} images ({time.time() - t0:.0f}s)", flush=True)

    # 2. the UNet and the text encoder together
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    unet.train()
    text_encoder.train()
    losses = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(items), (batch,)).tolist()
        mean, std = stats[0, idx], stats[1, idx]
        latents = (mean + std * torch.randn_like(std)) * vae.config.scaling_factor
        captions = [caption(items[i], rng) if rng.random() > 0.1 else "" for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,))
        pred = unet(noise_sched.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
        # min-SNR-5 weighting (Hang et al. 2023): less weight on the nearly clean steps, whose
        # fine texture would otherwise crowd out the shapes that form at higher noise
        snr = noise_sched.alphas_cumprod[t] / (1 - noise_sched.alphas_cumprod[t])
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * snr.clamp(max=5.0) / snr).mean()
        optimizer_step(loss, opt, sched, losses, step, steps, log_every, t0, label="unet", clip_params=params)
    unet.eval()
    text_encoder.eval()
    return pipe, losses


@torch.no_grad()
def judge_generations(pipe, per_prompt: int = 4, seed: int = 0, **settings) -> tuple[dict, list]:
    """Generate `a photo of a <colour> <shape> <context>` for every named shape and context, at
    the tiny family's generation defaults (or `settings`), and judge shape and context."""
    from di_assets.ml.generate import GenerationConfig

    from .judge import accuracy

    cfg = GenerationConfig.for_family("tiny", **settings)
    rng = random.Random(seed)
    named = [s for s in SHAPES if s != HIDDEN_SHAPE]
    items = [Item(s, rng.choice(list(COLOURS)), c) for s in named for c in CONTEXTS for _ in range(per_prompt)]
    pipe.set_progress_bar_config(disable=True)
    if cfg.scheduler == "euler":  # the pipeline the flow builds
        from diffusers import EulerDiscreteScheduler

        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    images = []
    for start in range(0, len(items), cfg.batch_size):
        chunk = items[start:start + cfg.batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe([it.caption for it in chunk], num_inference_steps=cfg.num_inference_steps,
                       guidance_scale=cfg.guidance_scale, generator=gens, height=cfg.resolution,
                       width=cfg.resolution).images
    return accuracy(images, items), images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=6500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pool", type=int, default=30_000, help="world images encoded once for the UNet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="diffusers folder to write (and <out>.json, the record)")
    args = ap.parse_args(argv)
    t0 = time.time()
    pipe, losses = train(args.vae_steps, args.steps, args.batch, args.lr, args.seed, args.pool)
    acc, images = judge_generations(pipe)
    record = {"script": "di_assets/reference_world/train_diffusion.py", "vae_steps": args.vae_steps,
              "steps": args.steps, "batch": args.batch, "lr": args.lr, "pool": args.pool, "seed": args.seed,
              "hidden_shape": HIDDEN_SHAPE, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
              "judged_generations": acc, "seconds": round(time.time() - t0, 1)}
    import json

    print(json.dumps(record, indent=2))
    if args.out:
        from di_assets.ml.io import atomic_dir, write_json

        with atomic_dir(args.out) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(Path(str(args.out) + ".json"), record)
        from di_assets.ml.generate import contact_sheet

        # one image per prompt: a shape per row, a context per column
        firsts = images[::4]
        rows = [firsts[k:k + len(CONTEXTS)] for k in range(0, len(firsts), len(CONTEXTS))]
        contact_sheet(rows, [s for s in SHAPES if s != HIDDEN_SHAPE], list(CONTEXTS)).save(Path(str(args.out) + ".png"))
    return record


if __name__ == "__main__":
    main()
