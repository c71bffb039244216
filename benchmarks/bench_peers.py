"""di-assets beside its peers: the diffusers textual-inversion example and the paper's code patterns.

    python benchmarks/bench_peers.py --diffusers-repo /path/to/diffusers           # tiny size, all four works
    python benchmarks/bench_peers.py --diffusers-repo /path/to/diffusers --size both
    python benchmarks/bench_peers.py --work generate,clip,encoder --size mid --pairs 3

Every measurement is a fresh Python process with one thread (DI_ASSETS_THREADS=1, OMP_NUM_THREADS=1,
MKL_NUM_THREADS=1, OMP_WAIT_POLICY=PASSIVE, HF_HUB_OFFLINE=1), di-assets and its peer interleaved
(A, B, A, B, ...), --pairs pairs (default 3); the table gives the median of each side and the ratio
peer / di-assets of the medians (above 1: the peer is slower). The works:

1. **Textual inversion step** at equal settings (one class, the bundled circles, 8 images; batch
   --ti-batch, --ti-resolution px, AdamW at lr --ti-lr, constant schedule, no warm-up, weight decay
   1e-2, norm not pinned, centre crop, seed 0): di-assets `run_textual_inversion` against the diffusers
   example `examples/textual_inversion/textual_inversion.py`, run as its own command from a local copy
   of the diffusers repository (--diffusers-repo: a work tree, or a bare git directory, from which the
   example is extracted with `git show` into a temporary folder; nothing of diffusers is kept in this
   project). The example needs `accelerate` (`pip install accelerate`). Method: each side runs as a whole
   process twice, with --ti-steps steps and with 1 step, and the step time is
   (wall(N steps) - wall(1 step)) / (N - 1): start-up, model loading, data preparation, and the
   evaluations and file writing around the loop cancel out, and so does the first step's warm-up.
   The in-loop time that each side reports itself (di-assets' progress callback, the example's own
   tqdm bar, `it/s`) is printed beside it as a check.
   The example runs offline from a local diffusers folder with no flag beyond its own
   (--pretrained_model_name_or_path <folder>): it reads only that folder. Its default
   `--report_to tensorboard` is skipped by accelerate when tensorboard is not installed (accelerate
   has no `none`: `--report_to none` fails with "Unsupported logging capability"); where tensorboard
   is installed it logs two scalars per step, the example's own default. --save_steps and
   --checkpointing_steps are set past the last step, as di-assets here writes no checkpoint either.
2. **5 prompts x 10 samples + CLIP scoring, whole process**: di-assets `generate_samples` (its
   batches, models loaded once) and `clip_similarity` (scorer loaded once) against an emulation of
   the paper's pattern written here with public diffusers / transformers / open_clip calls: each
   `generate` call loads the encoder root's tokenizer and text encoder and
   `StableDiffusionPipeline.from_pretrained` of the base model (Euler scheduler), and makes one image
   per pipeline call, the prompt's images drawn one after another from one generator; each
   `clip_similarity` call loads the CLIP model and the base tokenizer again. As in the paper's
   notebook, one `generate` call per class with the list of prompts (--paper-generate per-prompt:
   one call per prompt), and per prompt two `clip_similarity` calls (class caption, shift caption).
   Same models, float32 on CPU, same steps (--gen-steps), guidance 7.5, --gen-resolution px; the
   paper's resize of every image to 512 px is left out (both sides return the model's own size).
   The prompts and shift captions are the first --prompts of the ImageNet* catalog.
3. **CLIP scoring calls alone**: the same 2 x --prompts calls on --samples images each (random
   pictures: speed does not depend on content), timed inside the process from the first call on,
   after both sides have imported open_clip and transformers (di-assets' first call loads the scorer,
   every paper call loads it). The largest difference
   between the two sides' scores is printed: the emulation computes the same numbers.
4. **Encoder root with --tokens tokens, whole process**: di-assets `create_token_dictionary` (one
   resize) against the paper's `create_encoder` pattern (load tokenizer and text encoder, then per
   token `add_tokens`, `resize_token_embeddings`, set the row; save both and `tokens.pt`), emulated,
   in float32 as di-assets writes (the paper writes float16), with `mean_resizing=False`: the
   transformers of 2023 had no mean resizing; today's default (True) would add a covariance of the
   whole vocabulary to every one of the paper's resizes.

**Sizes** (--size tiny|mid|both). `tiny`: the embedded default (the shipped tiny UNet/VAE/text
encoder and the tiny open_clip scorer). `mid`: a Stable Diffusion 2 architecture at a fifth of its
widths with random weights, built here with diffusers' and transformers' config classes and saved under
--models-dir (a temporary folder; nothing is downloaded): UNet block_out_channels (64, 128, 256, 256),
2 layers per block, 64-dim heads, cross-attention 512; VAE (32, 64, 128, 128), 8x down-sampling; text
encoder 512 wide, 6 layers, with the real CLIP BPE tokenizer; open_clip ViT-B-32 as the scorer. The
work sizes per model size are below (--help's defaults); any flag given applies to both sizes.

**Projection to SD2 size.** Per measured size, child processes (--pairs of them; medians) time each
component alone: the loads that the works repeat (UNet + VAE, text encoder, CLIP model; files in the
page cache, as from the second load of a process on), a text-encoder save, a UNet step of one image
with classifier-free guidance (a batch of 2), a UNet forward + backward per image (the textual-inversion
pass), VAE encode and decode per image, a CLIP image, one `resize_token_embeddings`, and the example's
per-step update of the whole embedding matrix (dense gradient, AdamW, frozen rows restored). Each
component k has a size x_k that its time grows with: FLOPs for compute (torch's FlopCounterMode),
parameters for loads and saves, vocabulary x width for resizes and the embedding update. x_k at SD2
(768-v UNet, VAE and text encoder at 768 px; scorer ViT-H-14) comes from the architectures built on
the meta device (no weights, no compute). Each work's measured median T, per side, is projected as

    T_SD2 = T + sum_k n_k * (t_k(SD2) - t_k)

n_k: how often the work does component k (its structure: loads per call, images x steps, tokens, ...);
t_k: the component's time at the work's size; t_k(SD2): on the line t = a + b * x through the tiny
and mid points when both sizes are measured (a: the fixed overhead of a call, b: the cost per FLOP or
per parameter), else in proportion to x_k from the one size measured (t_k * x_k(SD2) / x_k). What does
not grow with the model (start-up, imports, tokenizer loads, Python, data loading, batching gains)
stays as measured. Assumptions: this CPU's cost per FLOP and per byte goes on as measured; the counts
are the work's own (its steps, images, tokens, batch), at SD2's native 768 px. The projected table has
one row per measured work, so the tiny rows (the issue's counts) and the mid rows can be compared.

Run it on a quiet machine; the medians and the interleaving absorb some load, not all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASS_IMAGES = ROOT / "di_assets" / "example_data" / "circle"
CLASS_NAME = "circle"
EXAMPLE = "examples/textual_inversion/textual_inversion.py"
WORKS = ("ti", "generate", "clip", "encoder")
GUIDANCE = 7.5

# Work sizes per model size: the tiny ones as the issue asks, the mid ones cut to fit minutes on 2 cores.
SIZE_DEFAULTS = {
    "tiny": dict(ti_steps=101, ti_batch=8, ti_resolution=64, ti_lr=5e-2, prompts=5, samples=10, gen_steps=10,
                 gen_resolution=64, tokens=1000),
    "mid": dict(ti_steps=11, ti_batch=8, ti_resolution=128, ti_lr=5e-2, prompts=5, samples=2, gen_steps=10,
                gen_resolution=128, tokens=100),
}

# The mid-size model: Stable Diffusion 2 (768-v) at a fifth of its widths, random weights.
MID_VERSION = "mid-v1"
MID_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(1, 2, 4, 4), cross_attention_dim=512, use_linear_projection=True, upcast_attention=True,
    norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)
MID_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=256, scaling_factor=0.18215, act_fn="silu",
)
MID_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                        num_attention_heads=8, max_position_embeddings=77, projection_dim=512, hidden_act="gelu",
                        layer_norm_eps=1e-5)
MID_CLIP = "ViT-B-32"
SD2_CLIP = "ViT-H-14"
SD2_RESOLUTION = 768


def now() -> float:
    return time.perf_counter()


# ---------------------------------------------------------------- models per size


def models_of(size: str, models_dir: Path) -> dict:
    """Where each size's models are: diffusers folder, open_clip architecture (and its config file) and checkpoint."""
    if size == "tiny":
        from di_assets.ml.models import TINY_CLIP_NAME, tiny_clip_checkpoint, tiny_diffusion_dir

        return {"diffusion": str(tiny_diffusion_dir()), "clip_model": TINY_CLIP_NAME,
                "clip_config": str(ROOT / "di_assets" / "ml" / f"{TINY_CLIP_NAME}.json"),
                "clip_pretrained": str(tiny_clip_checkpoint()), "family": "tiny"}
    folder = models_dir / MID_VERSION
    if not (folder / "done").exists():
        build_mid(folder)
    return {"diffusion": str(folder / "diffusion"), "clip_model": MID_CLIP, "clip_config": None,
            "clip_pretrained": str(folder / "clip.safetensors"), "family": "sd"}


def build_mid(folder: Path) -> None:
    """The mid-size model: a diffusers folder and an open_clip checkpoint, random weights, no download."""
    import open_clip
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import SD2_SCHEDULER

    from di_assets.ml.models import clip_bpe_files

    print(f"building the mid-size model in {folder} (random weights)", flush=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vocab, merges = clip_bpe_files(tmp / "bpe")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>", model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**MID_TEXT_ENCODER, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**MID_VAE), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**MID_UNET), scheduler=EulerDiscreteScheduler(**SD2_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp / "diffusion", safe_serialization=True)
    clip = open_clip.create_model(MID_CLIP, pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp / "clip.safetensors"))
    shutil.rmtree(tmp / "bpe")
    (tmp / "done").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def di_spec(m: dict):
    from di_assets.ml.models import ModelSpec

    if m["family"] == "tiny":
        return ModelSpec(family="tiny", device="cpu")
    return ModelSpec(family="sd", diffusion=m["diffusion"], clip_model=m["clip_model"],
                     clip_pretrained=m["clip_pretrained"], device="cpu")


def work_prompts(n: int) -> list[tuple[str, str]]:
    from di_assets.ml.shifts import IMAGENET_STAR

    if n > len(IMAGENET_STAR):
        raise SystemExit(f"--prompts: the ImageNet* catalog has {len(IMAGENET_STAR)} shifts")
    return [(s.prompt, s.caption) for s in IMAGENET_STAR[:n]]


# ---------------------------------------------------------------- the paper's patterns, emulated
# Written here with public diffusers / transformers / open_clip calls; the paper's code is not copied.


def paper_load_pipe(encoder_root: str, base: str):
    """What each of the paper's `generate` calls loads: the root's tokenizer and text encoder, then the
    base model's pipeline (UNet, VAE, Euler scheduler) around them."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel.from_pretrained(encoder_root, subfolder="text_encoder", torch_dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(encoder_root, subfolder="tokenizer")
    scheduler = EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    return StableDiffusionPipeline.from_pretrained(base, scheduler=scheduler, text_encoder=text_encoder,
                                                   tokenizer=tokenizer, torch_dtype=torch.float32).to("cpu")


def paper_generate(encoder_root: str, base: str, c: int, prompts: list[str], num_samples: int, random_seed: int,
                   steps: int, resolution: int) -> list[list]:
    """The paper's `generate` pattern: the pipeline loaded on every call, one image per pipeline call."""
    import torch

    token = json.loads((Path(encoder_root) / "tokens.json").read_text())["classes"][c]["token"]
    pipe = paper_load_pipe(encoder_root, base)
    out = []
    for prompt in prompts:
        generator = torch.Generator("cpu").manual_seed(random_seed)
        text = prompt.replace("<TOKEN>", token)
        out.append([pipe(text, num_inference_steps=steps, guidance_scale=GUIDANCE, height=resolution,
                         width=resolution, generator=generator).images[0] for _ in range(num_samples)])
    return out


def paper_load_clip(arch: str, checkpoint: str, base: str):
    """What each of the paper's `clip_similarity` calls loads: the open_clip model and transform, and the
    base model's tokenizer."""
    import open_clip
    from transformers import CLIPTokenizer

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint)
    return model.eval(), preprocess, CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")


def paper_clip_similarity(images, caption: str, arch: str, checkpoint: str, base: str):
    """The paper's `clip_similarity` pattern: the CLIP model loaded on every call."""
    import torch

    model, preprocess, tokenizer = paper_load_clip(arch, checkpoint, base)
    with torch.no_grad():
        ids = tokenizer([caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        text = model.encode_text(ids).float()
        text = text / text.norm(dim=-1, keepdim=True)
        feats = model.encode_image(torch.stack([preprocess(im) for im in images])).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
    return (text @ feats.T)[0]


def paper_create_encoder(embeds, tokens: list[str], class_names: list[str], encoder_root: Path, base: str) -> None:
    """The paper's `create_encoder` pattern: one token added, and one embedding resize, per class."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=torch.float32)
    for token, embed in zip(tokens, embeds):
        if tokenizer.add_tokens(token) == 0:
            raise ValueError(f"the tokenizer already holds {token}")
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        text_encoder.get_input_embeddings().weight.data[tokenizer.convert_tokens_to_ids(token)] = embed
    tokenizer.save_pretrained(encoder_root / "tokenizer")
    text_encoder.save_pretrained(encoder_root / "text_encoder")
    torch.save({"initializer_words": class_names, "tokens": tokens}, encoder_root / "tokens.pt")


def register_clip_config(m: dict) -> None:
    """The tiny scorer's architecture is a config file that open_clip must be told about (once per process)."""
    import open_clip

    if m["clip_config"] and m["clip_model"] not in open_clip.list_models():
        open_clip.add_model_config(m["clip_config"])


# ---------------------------------------------------------------- children: one measurement each


def child_ti(a, m: dict) -> dict:
    from di_assets.ml.textual_inversion import run_textual_inversion

    stamps = []
    run_textual_inversion(CLASS_IMAGES, "<circle>", CLASS_NAME, model=di_spec(m), steps=a.ti_steps,
                          batch_size=a.ti_batch, learning_rate=a.ti_lr, resolution=a.ti_resolution, pin_norm=False,
                          seed=0, progress=lambda step, total, loss: stamps.append(now()))
    per = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return {"in_loop_step": per}


def child_generate(a, m: dict) -> dict:
    pairs = work_prompts(a.prompts)
    t = now()
    if a.peer == "di":
        from di_assets.ml.clip_metric import clip_similarity
        from di_assets.ml.generate import GenerationConfig, generate_samples

        spec = di_spec(m)
        cfg = GenerationConfig.for_family(m["family"], num_inference_steps=a.gen_steps, resolution=a.gen_resolution,
                                          guidance_scale=GUIDANCE)
        samples = generate_samples(a.root, 0, [p for p, _ in pairs], seeds=range(a.samples), model=spec, config=cfg)
        rows = [[s.image for s in samples[i * a.samples:(i + 1) * a.samples]] for i in range(len(pairs))]
        sims = [(clip_similarity(imgs, f"a photo of a {CLASS_NAME}", model=spec), clip_similarity(imgs, cap, model=spec))
                for imgs, (_, cap) in zip(rows, pairs)]
    else:
        register_clip_config(m)
        calls = [[p for p, _ in pairs]] if a.paper_generate == "per-class" else [[p] for p, _ in pairs]
        rows = [imgs for prompts in calls for imgs in paper_generate(a.root, m["diffusion"], 0, prompts, a.samples, 0,
                                                                      a.gen_steps, a.gen_resolution)]
        sims = [(paper_clip_similarity(imgs, f"a photo of a {CLASS_NAME}", m["clip_model"], m["clip_pretrained"],
                                       m["diffusion"]),
                 paper_clip_similarity(imgs, cap, m["clip_model"], m["clip_pretrained"], m["diffusion"]))
                for imgs, (_, cap) in zip(rows, pairs)]
    return {"work": now() - t, "images": sum(len(r) for r in rows), "scores": sum(len(s) + len(h) for s, h in sims)}


def random_images(n: int, size: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def child_clip(a, m: dict) -> dict:
    import numpy as np

    pairs = work_prompts(a.prompts)
    images = [random_images(a.samples, a.gen_resolution) for _ in pairs]
    captions = [(f"a photo of a {CLASS_NAME}", cap) for _, cap in pairs]
    import open_clip  # noqa: F401  (imports are the process's, not the calls': both sides import first)
    from transformers import CLIPTokenizer  # noqa: F401

    if a.peer == "di":
        from di_assets.ml.clip_metric import clip_similarity

        spec = di_spec(m)
        t = now()
        sims = [clip_similarity(imgs, c, model=spec) for imgs, caps in zip(images, captions) for c in caps]
    else:
        register_clip_config(m)
        t = now()
        sims = [paper_clip_similarity(imgs, c, m["clip_model"], m["clip_pretrained"], m["diffusion"])
                for imgs, caps in zip(images, captions) for c in caps]
    took = now() - t
    if a.save:
        np.save(a.save, np.stack([s.float().numpy() for s in sims]))
    return {"work": took, "calls": len(sims)}


def child_encoder(a, m: dict) -> dict:
    import torch

    t = now()
    g = torch.Generator().manual_seed(0)
    tokens = [f"<c{i}>" for i in range(a.tokens)]
    names = [f"class {i}" for i in range(a.tokens)]
    with tempfile.TemporaryDirectory() as d:
        if a.peer == "di":
            from di_assets.ml.encoder_root import create_token_dictionary
            from di_assets.ml.models import load_base_text_encoder

            spec = di_spec(m)  # the base text encoder loads once: its width here, then create_token_dictionary
            dim = load_base_text_encoder(spec)[1].get_input_embeddings().embedding_dim
            embeds = [torch.randn(dim, generator=g) for _ in tokens]
            create_token_dictionary(embeds, tokens, names, Path(d) / "root", model=spec)
        else:
            from transformers import CLIPTextConfig

            dim = CLIPTextConfig.from_pretrained(m["diffusion"], subfolder="text_encoder").hidden_size
            embeds = [torch.randn(dim, generator=g) for _ in tokens]
            paper_create_encoder(embeds, tokens, names, Path(d) / "root", m["diffusion"])
    return {"work": now() - t}


def child_make_root(a, m: dict) -> dict:
    import torch

    from di_assets.ml.encoder_root import create_token_dictionary
    from di_assets.ml.models import load_base_text_encoder

    spec = di_spec(m)
    dim = load_base_text_encoder(spec)[1].get_input_embeddings().embedding_dim
    create_token_dictionary([torch.randn(dim, generator=torch.Generator().manual_seed(0))], ["<bench-0>"], [CLASS_NAME],
                            a.root, model=spec)
    return {}


def _median_time(fn, reps: int, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t = now()
        fn()
        times.append(now() - t)
    return statistics.median(times)


def _flops(fn) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _architecture_counts(unet, vae, clip, te_params: int, vocab: int, width: int, gen_px: int, ti_px: int,
                         clip_px: int, device: str) -> dict:
    """FLOPs per image of each compute component and parameter counts (works on the meta device too)."""
    import torch

    def lat(px):
        return px // 2 ** (len(vae.config.block_out_channels) - 1)

    def unet_fwd(px):
        x = torch.zeros(1, unet.config.in_channels, lat(px), lat(px), device=device)
        ctx = torch.zeros(1, 77, unet.config.cross_attention_dim, device=device)
        return lambda: unet(x, torch.tensor([500], device=device), ctx)

    enc_x = torch.zeros(1, 3, ti_px, ti_px, device=device)
    dec_x = torch.zeros(1, vae.config.latent_channels, lat(gen_px), lat(gen_px), device=device)
    clip_x = torch.zeros(1, 3, clip_px, clip_px, device=device)
    return {
        "flops": {"unet_gen": 2 * _flops(unet_fwd(gen_px)),  # one image's step: a batch of 2 (guidance)
                  "unet_ti": _flops(unet_fwd(ti_px)),
                  "vae_enc": _flops(lambda: vae.encode(enc_x)), "vae_dec": _flops(lambda: vae.decode(dec_x)),
                  "clip_img": _flops(lambda: clip.encode_image(clip_x))},
        "params": {"unet": _params(unet), "vae": _params(vae), "te": te_params, "clip": _params(clip),
                   "embedding": vocab * width},
    }


def child_components(a, m: dict) -> dict:
    """Each component of the works alone, at this size: seconds per call or per image, and its FLOPs and parameters."""
    import open_clip
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base, reps = m["diffusion"], 3
    register_clip_config(m)
    kw = {"local_files_only": True}
    t = {}

    def load_unet_vae():
        return (UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kw),
                AutoencoderKL.from_pretrained(base, subfolder="vae", **kw))

    # Loads split by what grows with the model: a tokenizer is the same at every size.
    t["load_unet_vae"] = _median_time(load_unet_vae, reps)
    t["load_te"] = _median_time(lambda: CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kw), reps)
    t["load_tokenizer"] = _median_time(lambda: CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw), reps)
    t["load_clip"] = _median_time(lambda: open_clip.create_model_and_transforms(
        m["clip_model"], pretrained=m["clip_pretrained"]), reps)
    # the paper's per-call loads as a whole, for the record (the projection counts their parts)
    t["paper_pipe_call_load"] = _median_time(lambda: paper_load_pipe(a.root, base), reps)
    t["paper_clip_call_load"] = _median_time(lambda: paper_load_clip(m["clip_model"], m["clip_pretrained"], base),
                                             reps)
    te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kw)
    with tempfile.TemporaryDirectory() as d:
        t["save_te"] = _median_time(lambda: te.save_pretrained(Path(d) / "text_encoder"), reps)
    vocab, width = te.get_input_embeddings().weight.shape
    k = 10

    def resizes():
        for i in range(k):
            te.resize_token_embeddings(vocab + i + 1, mean_resizing=False)
    t["resize"] = _median_time(resizes, 1, warm=0) / k

    # the example's per-step extra: a dense gradient of the whole vocabulary, AdamW over it, rows restored
    weight = torch.nn.Parameter(te.get_input_embeddings().weight.detach().clone())
    orig = weight.detach().clone()
    opt = torch.optim.AdamW([weight], lr=1e-3, weight_decay=1e-2)
    keep = torch.ones(len(weight), dtype=torch.bool)
    keep[-1] = False
    ids = torch.randint(0, len(weight), (a.ti_batch * 77,))

    def emb_update():
        grad = torch.zeros_like(weight)
        grad.index_add_(0, ids, torch.ones(len(ids), weight.shape[1]))
        weight.grad = grad
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            weight[keep] = orig[keep]
    t["emb_update"] = _median_time(emb_update, reps)
    del weight, orig, opt

    unet, vae = load_unet_vae()
    unet.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    lg, lt = a.gen_resolution // down, a.ti_resolution // down
    cross = unet.config.cross_attention_dim
    with torch.no_grad():
        x, ctx, ts = torch.randn(2, 4, lg, lg), torch.randn(2, 77, cross), torch.tensor([500, 500])
        t["unet_gen"] = _median_time(lambda: unet(x, ts, ctx), reps)  # one image's step with guidance
        xb = torch.randn(a.ti_batch, 3, a.ti_resolution, a.ti_resolution)
        t["vae_enc"] = _median_time(lambda: vae.encode(xb).latent_dist.sample(), reps) / a.ti_batch
        z = torch.randn(1, 4, lg, lg)
        t["vae_dec"] = _median_time(lambda: vae.decode(z), reps)
    xt, tt = torch.randn(a.ti_batch, 4, lt, lt), torch.full((a.ti_batch,), 500)

    def unet_ti():
        ctx_t = torch.randn(a.ti_batch, 77, cross, requires_grad=True)
        unet(xt, tt, ctx_t).sample.float().pow(2).mean().backward()
    t["unet_ti"] = _median_time(unet_ti, reps) / a.ti_batch
    clip, _, _ = open_clip.create_model_and_transforms(m["clip_model"], pretrained=m["clip_pretrained"])
    clip.eval()
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with torch.no_grad():
        xc = torch.randn(a.samples, 3, size, size)
        t["clip_img"] = _median_time(lambda: clip.encode_image(xc), reps) / a.samples
    counts = _architecture_counts(unet, vae, clip, _params(te), vocab, width, a.gen_resolution, a.ti_resolution,
                                  size, "cpu")
    return {"seconds": t, **counts}


def child_sd2(a, m: dict) -> dict:
    """FLOPs and parameters of SD2 768-v and ViT-H-14, built on the meta device (no weights, no compute)."""
    import open_clip
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import SD2_TEXT_ENCODER, SD2_UNET, SD2_VAE

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD2_UNET), AutoencoderKL(**SD2_VAE)
        te = CLIPTextModel(CLIPTextConfig(**SD2_TEXT_ENCODER))
        clip = open_clip.create_model(SD2_CLIP, pretrained=None, device="meta")
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return _architecture_counts(unet, vae, clip, _params(te), SD2_TEXT_ENCODER["vocab_size"],
                                SD2_TEXT_ENCODER["hidden_size"], SD2_RESOLUTION, SD2_RESOLUTION, size, "meta")


CHILDREN = {"ti": child_ti, "generate": child_generate, "clip": child_clip, "encoder": child_encoder,
            "make-root": child_make_root, "components": child_components, "sd2": child_sd2}


# ---------------------------------------------------------------- the parent: runs, tables, projection


class Runner:
    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self.env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "DI_ASSETS_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.env.setdefault("DI_ASSETS_CACHE", str(tmp / "cache"))
        self.models: dict[str, dict] = {}  # per size, what models_of says: children get it as JSON

    def run(self, cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
        t = now()
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=str(self.tmp))
        wall = now() - t
        if p.returncode:
            sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
        return wall, p

    def child(self, name: str, size: str, w: dict, *extra: str) -> tuple[float, dict]:
        cmd = [sys.executable, __file__, "--child", name, "--size", size, "--models", json.dumps(self.models.get(size, {})),
               "--root", str(self.tmp / f"root-{size}"), "--paper-generate", self.args.paper_generate]
        for key, value in w.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        wall, p = self.run(cmd + list(extra))
        lines = p.stdout.strip().splitlines()
        return wall, json.loads(lines[-1]) if lines else {}


def example_path(repo: Path, tmp: Path) -> Path:
    """The diffusers example from a local copy of the repository: a work tree, or a bare git directory."""
    if (repo / EXAMPLE).is_file():
        return repo / EXAMPLE
    for git_dir in (repo, repo / ".git"):
        if (git_dir / "HEAD").is_file() and (git_dir / "objects").is_dir():
            out = tmp / "diffusers_example" / EXAMPLE
            out.parent.mkdir(parents=True, exist_ok=True)
            p = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{EXAMPLE}"], capture_output=True)
            if p.returncode:
                sys.exit(f"--diffusers-repo {repo}: git show HEAD:{EXAMPLE} failed: {p.stderr.decode()[-500:]}")
            out.write_bytes(p.stdout)
            return out
    sys.exit(f"--diffusers-repo {repo}: neither {EXAMPLE} nor a git directory is there")


def tqdm_step(stderr: str) -> float | None:
    """Seconds per step from the last tqdm rate the example printed (`6.46it/s` or `1.2s/it`)."""
    found = re.findall(r"Steps: 100%.*?\d+/\d+ \[[^\]]*?([\d.]+)(it/s|s/it)", stderr)
    if not found:
        return None
    value, unit = found[-1]
    return 1 / float(value) if unit == "it/s" else float(value)


def bench_ti(r: Runner, size: str, w: dict, m: dict, example: Path) -> dict:
    n = w["ti_steps"]
    if n < 2:
        sys.exit("--ti-steps must be at least 2 (the step time is the difference from a 1-step run)")

    def ex(steps: int) -> tuple[float, str]:
        out = r.tmp / f"ti-example-{size}-{steps}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, str(example), "--pretrained_model_name_or_path", m["diffusion"],
               "--train_data_dir", str(CLASS_IMAGES), "--placeholder_token", "<circle>",
               "--initializer_token", CLASS_NAME, "--resolution", str(w["ti_resolution"]), "--center_crop",
               "--train_batch_size", str(w["ti_batch"]), "--max_train_steps", str(steps),
               "--learning_rate", str(w["ti_lr"]), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
               "--adam_weight_decay", "1e-2", "--seed", "0", "--output_dir", str(out),
               "--save_steps", str(n + 1), "--checkpointing_steps", str(n + 1)]
        wall, p = r.run(cmd)
        return wall, p.stderr

    di, peer, di_loop, peer_loop = [], [], [], []
    for i in range(r.args.pairs):
        d_n, info = r.child("ti", size, w)
        p_n, err = ex(n)
        d_1, _ = r.child("ti", size, {**w, "ti_steps": 1})
        p_1, _ = ex(1)
        di.append((d_n - d_1) / (n - 1))
        peer.append((p_n - p_1) / (n - 1))
        di_loop.append(info.get("in_loop_step"))
        peer_loop.append(tqdm_step(err))
        print(f"  [{size}] ti pair {i + 1}: di-assets {di[-1]:.4f} s/step (wall {d_n:.1f}/{d_1:.1f} s), "
              f"example {peer[-1]:.4f} s/step (wall {p_n:.1f}/{p_1:.1f} s)", flush=True)
    def own(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    return {"di": statistics.median(di), "peer": statistics.median(peer), "di_own": own(di_loop),
            "peer_own": own(peer_loop)}


def bench_pair(r: Runner, work: str, size: str, w: dict, key: str = "wall") -> dict:
    """A, B, A, B: di-assets and the paper's pattern in fresh processes; whole-process wall or in-process time."""
    di, peer, extra = [], [], {}
    for i in range(r.args.pairs):
        out = {}
        for side in ("di", "paper"):
            save = ["--save", str(r.tmp / f"{work}-{size}-{side}.npy")] if work == "clip" else []
            wall, info = r.child(work, size, w, "--peer", side, *save)
            out[side] = wall if key == "wall" else info["work"]
            extra[side] = info
        di.append(out["di"])
        peer.append(out["paper"])
        print(f"  [{size}] {work} pair {i + 1}: di-assets {di[-1]:.2f} s, paper pattern {peer[-1]:.2f} s", flush=True)
    res = {"di": statistics.median(di), "peer": statistics.median(peer), "info": extra}
    if work == "clip":
        import numpy as np

        a, b = (np.load(r.tmp / f"clip-{size}-{s}.npy") for s in ("di", "paper"))
        res["max_diff"] = float(np.abs(a - b).max())
    return res


def work_counts(work: str, w: dict, args) -> tuple[dict, dict]:
    """How many times each side does each growing component in a work (the projection's n_k): (di-assets, peer).

    Tokenizer loads, scheduler configs and the like are the same at every size, so they stay in T as measured.
    """
    if work == "ti":  # per step
        b = w["ti_batch"]
        return {"unet_ti": b}, {"unet_ti": b, "vae_enc": b, "emb_update": 1}
    n, calls = w["prompts"] * w["samples"], 2 * w["prompts"]
    if work == "generate":
        gens = 1 if args.paper_generate == "per-class" else w["prompts"]
        compute = {"unet_gen": n * w["gen_steps"], "vae_dec": n, "clip_img": n}
        return ({"load_unet_vae": 1, "load_te": 1, "load_clip": 1, **compute},
                {"load_unet_vae": gens, "load_te": gens, "load_clip": calls, **compute})
    if work == "clip":
        return {"load_clip": 1, "clip_img": n}, {"load_clip": calls, "clip_img": n}
    return {"load_te": 1, "resize": 1, "save_te": 1}, {"load_te": 1, "resize": w["tokens"], "save_te": 1}


def component_size(comp: dict) -> dict:
    """x_k: what each component's time grows with: FLOPs for compute, parameters for loads and saves,
    vocabulary x width for resizes and the embedding update."""
    f, p = comp["flops"], comp["params"]
    return {**{k: f[k] for k in ("unet_gen", "unet_ti", "vae_enc", "vae_dec", "clip_img")},
            "load_unet_vae": p["unet"] + p["vae"], "load_te": p["te"], "save_te": p["te"], "load_clip": p["clip"],
            "resize": p["embedding"], "emb_update": p["embedding"]}


def sd2_times(comps: dict, sd2: dict) -> tuple[dict, str]:
    """t_k at SD2 size: on the line through the tiny and mid points (t = a + b x) when both are measured and
    the line rises, else in proportion to x_k from the largest size measured (t = t_k x_SD2 / x_k)."""
    X = component_size(sd2)
    out, how = {}, {}
    top = comps["mid"] if "mid" in comps else comps["tiny"]
    for k, x_sd2 in X.items():
        x1, t1 = component_size(top)[k], top["seconds"][k]
        if "mid" in comps and "tiny" in comps:
            x0, t0 = component_size(comps["tiny"])[k], comps["tiny"]["seconds"][k]
            slope = (t1 - t0) / (x1 - x0) if x1 != x0 else 0
            if slope > 0:
                out[k], how[k] = t1 + slope * (x_sd2 - x1), "line"
                continue
        out[k], how[k] = t1 * x_sd2 / x1, "proportional"
    lines = sorted(k for k, v in how.items() if v == "line")
    note = ("on the line through the tiny and mid points: " + ", ".join(lines)) if lines else ""
    rest = sorted(k for k, v in how.items() if v == "proportional")
    if rest:
        note += ("; " if note else "") + "in proportion from the " + ("mid" if "mid" in comps else "tiny") + \
                " point: " + ", ".join(rest)
    return out, note


def project(measured_s: float, counts: dict, t_here: dict, t_sd2: dict) -> float:
    """T_SD2 = T + sum_k n_k * (t_k(SD2) - t_k)."""
    return measured_s + sum(n * (t_sd2[k] - t_here[k]) for k, n in counts.items())


def fmt(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def label(work: str, size: str, w: dict, args) -> str:
    if work == "ti":
        return (f"textual inversion, s/step ({size}: {w['ti_resolution']} px, batch {w['ti_batch']}, "
                f"lr {w['ti_lr']:g}, {w['ti_steps']} vs 1 steps)")
    if work == "generate":
        calls = "1 generate call" if args.paper_generate == "per-class" else f"{w['prompts']} generate calls"
        return (f"{w['prompts']} prompts x {w['samples']} samples + CLIP scoring, whole process ({size}: "
                f"{w['gen_resolution']} px, {w['gen_steps']} steps; paper: {calls}, {2 * w['prompts']} CLIP loads)")
    if work == "clip":
        return f"CLIP scoring, {2 * w['prompts']} calls x {w['samples']} images ({size})"
    return f"encoder root, {w['tokens']:,} tokens, whole process ({size})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusers-repo", type=Path,
                    help="a local copy of github.com/huggingface/diffusers (work tree or bare git dir); needed for ti")
    ap.add_argument("--size", choices=("tiny", "mid", "both"), default="tiny", help="model size(s) (default tiny)")
    ap.add_argument("--work", default=",".join(WORKS), help=f"comma-separated works (default {','.join(WORKS)})")
    ap.add_argument("--pairs", type=int, default=3, help="interleaved pairs of fresh processes; medians (default 3)")
    ap.add_argument("--paper-generate", choices=("per-class", "per-prompt"), default="per-class",
                    help="paper pattern: one generate call with the list of prompts (its notebook; default) or one "
                         "per prompt")
    ap.add_argument("--no-projection", action="store_true", help="skip the component timings and the SD2 projection")
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "di_assets_bench_peers",
                    help="where the mid-size model is built once (default: $TMPDIR/di_assets_bench_peers)")
    for key in SIZE_DEFAULTS["tiny"]:
        kind = float if key == "ti_lr" else int
        ap.add_argument(f"--{key.replace('_', '-')}", type=kind,
                        help=f"default: tiny {SIZE_DEFAULTS['tiny'][key]:g}, mid {SIZE_DEFAULTS['mid'][key]:g}")
    ap.add_argument("--child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--peer", choices=("di", "paper"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--models", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:  # the models' paths come from the parent, so that the paper's side imports no di-assets code
        print(json.dumps(CHILDREN[args.child](args, json.loads(args.models or "{}"))))
        return

    works = [x.strip() for x in args.work.split(",") if x.strip()]
    unknown = sorted(set(works) - set(WORKS))
    if unknown:
        sys.exit(f"--work: unknown {unknown}; choose from {', '.join(WORKS)}")
    sizes = ["tiny", "mid"] if args.size == "both" else [args.size]
    if "ti" in works:
        if args.diffusers_repo is None:
            sys.exit("--diffusers-repo PATH is needed for the textual-inversion comparison (or leave out ti with --work)")
        try:
            import accelerate  # noqa: F401
        except ImportError:
            sys.exit("the diffusers example needs accelerate: pip install accelerate")

    rows, projected, notes = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as d:
        tmp = Path(d)
        r = Runner(args, tmp)
        example = example_path(args.diffusers_repo.resolve(), tmp) if "ti" in works else None
        sd2 = None if args.no_projection else r.child("sd2", "tiny", {})[1]
        comps = {}
        for size in sizes:
            w = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in SIZE_DEFAULTS[size].items()}
            m = r.models[size] = models_of(size, args.models_dir)  # builds the mid model once, outside any timing
            r.child("make-root", size, w)
            results = {}
            for work in works:
                if work == "ti":
                    results[work] = bench_ti(r, size, w, m, example)
                else:
                    results[work] = bench_pair(r, work, size, w, "work" if work == "clip" else "wall")
                res = results[work]
                rows.append((label(work, size, w, args), res["di"], res["peer"]))
                if work == "ti" and res["di_own"] and res["peer_own"]:
                    notes.append(f"{size} ti, as each side reports its loop: di-assets {fmt(res['di_own'])}/step "
                                 f"(progress callback), example {fmt(res['peer_own'])}/step (its tqdm rate)")
                if work == "clip":
                    notes.append(f"{size} clip: largest |difference| between the two sides' scores {res['max_diff']:.2g}")
            if sd2 is not None:  # --pairs runs of the components, a median per component
                runs = [r.child("components", size, w)[1] for _ in range(args.pairs)]
                comps[size] = {**runs[0], "seconds": {k: statistics.median(run["seconds"][k] for run in runs)
                                                      for k in runs[0]["seconds"]}}
                comps[size]["results"], comps[size]["w"] = results, w
                print(f"  [{size}] components: " + ", ".join(f"{k} {fmt(v)}" for k, v in comps[size]["seconds"].items()),
                      flush=True)

    print("\n| work | di-assets | peer | ratio (peer/di-assets) |\n|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {fmt(a)} | {fmt(b)} | {b / a:.2f} |")
    print("\nPeers: ti = the diffusers example (its own process); the other works = the paper's pattern, emulated "
          "here. One thread, fresh processes, interleaved, median of "
          f"{args.pairs} pairs.")
    for note in notes:
        print(f"  {note}")

    if sd2 is None or not comps:
        return
    t_sd2, how = sd2_times(comps, sd2)
    print(f"\nProjected to SD2 768-v (UNet {sd2['params']['unet'] / 1e6:.0f}M, VAE {sd2['params']['vae'] / 1e6:.0f}M, "
          f"text encoder {sd2['params']['te'] / 1e6:.0f}M parameters; scorer {SD2_CLIP} "
          f"{sd2['params']['clip'] / 1e6:.0f}M) at {SD2_RESOLUTION} px, each work with the counts it was measured with:")
    print("\n| work (as measured, at SD2 size) | di-assets | peer | ratio (peer/di-assets) |\n|---|---|---|---|")
    for size, comp in comps.items():
        for work, res in comp["results"].items():
            n_di, n_peer = work_counts(work, comp["w"], args)
            a = project(res["di"], n_di, comp["seconds"], t_sd2)
            b = project(res["peer"], n_peer, comp["seconds"], t_sd2)
            print(f"| {label(work, size, comp['w'], args)} | {fmt(a)} | {fmt(b)} | {b / a:.2f} |")
    print("\nT_SD2 = T + sum_k n_k * (t_k(SD2) - t_k): T the work's measured median, n_k how often it does component k "
          "(loads per call, images x steps, tokens, ...), t_k the component's time measured alone at that size, "
          "t_k(SD2) its time at SD2 size, from how it grows with x_k (FLOPs for compute, parameters for loads and "
          f"saves, vocabulary x width for resizes and the embedding update): {how}. Assumes this CPU's cost per FLOP "
          "and per byte goes on as measured, and the rest (start-up, tokenizers, Python, data loading, batching) "
          "stays as it was.")
    for size, comp in comps.items():
        print(f"Components at {size} (t_k): " + ", ".join(f"{k} {fmt(v)}" for k, v in comp["seconds"].items()))
    print("Components at SD2 (t_k(SD2)): " + ", ".join(f"{k} {fmt(v)}" for k, v in t_sd2.items()))

if __name__ == "__main__":
    main()
