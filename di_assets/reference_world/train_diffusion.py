"""Train the embedded text-to-image model (the tiny family's VAE, UNet and text encoder) on the world.

    python -m di_assets.reference_world.train_diffusion --vae-steps 600 --steps 3000 --out /tmp/world-diffusion

Starts from the tiny family's architecture (built as for the embedded default), trains the VAE
to reconstruct world images, then the UNet and the text encoder together on the VAE's latents
with DDPM noise (epsilon), dropping 10% of the captions for classifier-free guidance. Writes a
diffusers folder (`save_pretrained`) and reports how a judge sees generated images: the shape
by the judge classifier, the context by the world's CLIP scorer.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import optimizer_step
from .world import COLOURS, CONTEXTS, SHAPES, Item, draw, random_item


def _batch(rng: random.Random, n: int):
    items = [random_item(rng) for _ in range(n)]
    from .train_classifier import to_tensor

    return items, to_tensor([draw(it, rng) for it in items])


def train(vae_steps: int, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0, log_every: int = 100):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from di_assets.ml.models import tiny_diffusion_dir

    torch.manual_seed(seed)
    rng = random.Random(seed)
    # from scratch: the architecture of the embedded default, with its random weights
    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusion_dir(trained=False), safety_checker=None)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    t0 = time.time()

    # 1. the VAE: reconstruction plus a small KL term
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    for step in range(1, vae_steps + 1):
        _, x = _batch(rng, batch)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == vae_steps:
            print(f"vae {step}/{vae_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # latents of unit variance, as Stable Diffusion's scaling factor gives
        _, x = _batch(rng, 64)
        vae.register_to_config(scaling_factor=float(1 / vae.encode(x).latent_dist.mean.std()))

    # 2. the UNet and the text encoder together
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    unet.train()
    text_encoder.train()
    losses = []
    for step in range(1, steps + 1):
        items, x = _batch(rng, batch)
        captions = [it.caption if rng.random() > 0.1 else "" for it in items]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,))
        pred = unet(noise_sched.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        optimizer_step(loss, opt, sched, losses, step, steps, log_every, t0, label="unet", clip_params=params)
    unet.eval()
    text_encoder.eval()
    return pipe, losses


@torch.no_grad()
def judge_generations(pipe, per_prompt: int = 4, steps: int = 20, guidance: float = 5.0, seed: int = 0) -> dict:
    """Generate `a photo of a <colour> <shape> <context>` and judge shape and context."""
    from di_assets.ml.models import ModelSpec, load_clip

    from .train_classifier import load_classifier, predict
    from .train_clip import context_caption

    rng = random.Random(seed)
    items = [Item(s, rng.choice(list(COLOURS)), c) for s in SHAPES for c in CONTEXTS for _ in range(per_prompt)]
    images = []
    pipe.set_progress_bar_config(disable=True)
    for start in range(0, len(items), 36):
        chunk = items[start:start + 36]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe([it.caption for it in chunk], num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens, height=64, width=64).images
    shapes = predict(load_classifier("judge"), images)
    model, preprocess, tokenizer = load_clip(ModelSpec(device="cpu"))
    img = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])).float(), dim=-1)
    ctx_captions = {c: context_caption(c) for c in CONTEXTS}
    txt = F.normalize(model.encode_text(tokenizer(list(ctx_captions.values()))).float(), dim=-1)
    contexts = [list(ctx_captions)[i] for i in (img @ txt.T).argmax(1).tolist()]
    n = len(items)
    return {"shape": sum(p == it.shape for p, it in zip(shapes, items)) / n,
            "context": sum(p == it.context for p, it in zip(contexts, items)) / n, "images": n}, images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="diffusers folder to write (and <out>.json, the record)")
    args = ap.parse_args(argv)
    t0 = time.time()
    pipe, losses = train(args.vae_steps, args.steps, args.batch, args.lr, args.seed)
    acc, images = judge_generations(pipe)
    record = {"script": "di_assets/reference_world/train_diffusion.py", "vae_steps": args.vae_steps,
              "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
              "final_loss": sum(losses[-50:]) / len(losses[-50:]), "judged_generations": acc,
              "seconds": round(time.time() - t0, 1)}
    import json

    print(json.dumps(record, indent=2))
    if args.out:
        from di_assets.ml.io import atomic_dir, write_json

        with atomic_dir(args.out) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(Path(str(args.out) + ".json"), record)
        from PIL import Image

        grid = Image.new("RGB", (64 * len(CONTEXTS), 64 * len(SHAPES)))
        for k, im in enumerate(images[::4]):
            grid.paste(im, (64 * (k % len(CONTEXTS)), 64 * (k // len(CONTEXTS))))
        grid.save(Path(str(args.out) + ".png"))
    return record


if __name__ == "__main__":
    main()
