"""GPU check: the tiny family end to end, then full-size architectures with random weights, timed.

    python benchmarks/gpu_check.py               # on CUDA; under 8 minutes on one H200
    python benchmarks/gpu_check.py --dry-run     # the same code at tiny sizes on CPU, in seconds
    python benchmarks/gpu_check.py --dry-run --dtype bfloat16   # ... in the GPU's precision (bf16 weights)
    python benchmarks/gpu_check.py --compile --channels-last   # with the ModelSpec speed flags

Nothing is downloaded. Stable Diffusion 2 (768-v) is built from the configs below with random
weights, saved as a local diffusers folder and run through the project's own code paths
(`run_textual_inversion`, `generate_samples`, `ClipScorer`); speed does not depend on the
weights. The CLIP scorer is open_clip's ViT-H-14, also random. Prints a table with the peak
memory of each row (CUDA: peak allocated by torch; CPU: peak RSS of the process so far).
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLASS_IMAGES = ROOT / "di_assets" / "example_data" / "circle"

# stabilityai/stable-diffusion-2 (768-v), as in its unet/, vae/ and text_encoder/ config.json
SD2_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    upcast_attention=True, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)
SD2_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=768, scaling_factor=0.18215, act_fn="silu",
)
SD2_TEXT_ENCODER = dict(  # the OpenCLIP ViT-H/14 text tower, penultimate layer (23 of 24)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, projection_dim=512, hidden_act="gelu", layer_norm_eps=1e-5,
)
SD2_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1,
)
CLIP_MODEL = "ViT-H-14"

# --dry-run: the same architecture families, shrunk so that CPU runs them in seconds
TINY_UNET = dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
                 attention_head_dim=(2, 2, 4, 4), cross_attention_dim=32)
TINY_VAE = dict(layers_per_block=1, block_out_channels=(32, 32, 32, 32), sample_size=64)
TINY_TEXT_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32)

FULL = dict(resolution=768, ti_steps=30, ti_warmup=5, gen_steps=50, batches=(1, 8), clip_images=256,
            tiny_ti_steps=20, multi_k=(1, 8, 32), multi_steps=6)
DRY = dict(resolution=64, ti_steps=4, ti_warmup=1, gen_steps=2, batches=(1, 8), clip_images=16, tiny_ti_steps=3,
           multi_k=(1, 2), multi_steps=3)
H200_BF16_TFLOPS = 989.4  # dense bf16 peak of an H200 SXM (NVIDIA's data sheet; 1979 is with sparsity)


def unet_forward_flops(spec, res_px: int) -> float:
    """FLOPs of one UNet forward pass on one image (torch's FlopCounterMode: matmuls and convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from di_assets.ml.models import load_diffusion_components

    unet, _ = load_diffusion_components(spec.resolved())
    lat = res_px // 8
    x = torch.randn(1, unet.config.in_channels, lat, lat, device=unet.device, dtype=unet.dtype)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, device=unet.device, dtype=unet.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=unet.device), ctx)
    return float(counter.get_total_flops())


class Meter:
    """Wall time and peak memory of one row of the table."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t

    @property
    def memory(self) -> str:
        if self.cuda:
            return f"{self.torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS"


def build_sd2(folder: Path, dry: bool) -> None:
    """A Stable Diffusion 2 folder (diffusers layout) with random weights and the real CLIP tokenizer."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from di_assets.ml.models import clip_bpe_files

    vocab, merges = clip_bpe_files(folder.parent / "bpe")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>", model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **{**SD2_TEXT_ENCODER, **(TINY_TEXT_ENCODER if dry else {})},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(**{**SD2_UNET, **(TINY_UNET if dry else {})})
    vae = AutoencoderKL(**{**SD2_VAE, **(TINY_VAE if dry else {})})
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(**SD2_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_clip(path: Path, name: str) -> None:
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model(name, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def check_tiny(device: str, tmp: Path, p: dict) -> str:
    """The embedded tiny family through every stage: textual inversion, encoder root, images, scores."""
    from di_assets.ml.clip_metric import ClipScorer
    from di_assets.ml.encoder_root import create_token_dictionary
    from di_assets.ml.generate import GenerationConfig, generate_samples
    from di_assets.ml.models import ModelSpec
    from di_assets.ml.textual_inversion import run_textual_inversion

    spec = ModelSpec(family="tiny", device=device)
    res = run_textual_inversion(CLASS_IMAGES, "<tiny>", "circle", model=spec, steps=p["tiny_ti_steps"])
    root = create_token_dictionary([res], ["<tiny>"], ["circle"], tmp / "tiny_root", model=spec)
    samples = generate_samples(root, 0, "a photo of a <TOKEN> in the snow", seeds=range(4), model=spec,
                               config=GenerationConfig.for_family("tiny"))
    sims = ClipScorer(spec).similarity([s.image for s in samples], ["a photo of a circle", "a photo in the snow"])
    if not (sims.isfinite().all() and sims.abs().max() <= 1):
        raise SystemExit(f"tiny end to end: CLIP scores out of range: {sims.tolist()}")
    return f"ok: loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}, {len(samples)} images scored"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script, not the GPU")
    ap.add_argument("--compile", action="store_true", help="ModelSpec(compile=True) for the SD2 rows")
    ap.add_argument("--channels-last", action="store_true", help="ModelSpec(channels_last=True) for the SD2 rows")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="ModelSpec.dtype for the SD2 rows (default auto: bf16 on an H200, float32 on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS,
                    help="the GPU's dense bf16 peak, TFLOP/s (default: H200's %(default)s)")
    args = ap.parse_args()
    start = time.perf_counter()

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for a GPU machine; use --dry-run to check it on CPU")
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        # Tiny models gain nothing from threads, and on a busy CPU OpenMP's spinning costs 10x.
        torch.set_num_threads(1)
    p = DRY if args.dry_run else FULL
    res_px = p["resolution"]
    rows: list[tuple[str, str, str, str]] = []

    def row(label, fn, rate=None):
        """Run `fn` for one row; `rate(result, seconds)` turns its result into a throughput."""
        with Meter(device) as m:
            result = fn()
        if rate is not None:
            result = rate(result, m.seconds)
        rows.append((label, result, f"{m.seconds:.1f} s", m.memory))
        print(f"  {label}: {result} ({m.seconds:.1f} s, {m.memory})", flush=True)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ["DI_ASSETS_CACHE"] = str(tmp / "cache")  # the tiny models are built fresh, never downloaded

        from di_assets.ml.clip_metric import ClipScorer
        from di_assets.ml.encoder_root import create_token_dictionary
        from di_assets.ml.generate import GenerationConfig, generate_samples
        from di_assets.ml.models import ModelSpec, register_tiny_clip
        from di_assets.ml.textual_inversion import TextualInversionConfig, run_textual_inversion

        row("tiny family end to end", lambda: check_tiny(device, tmp, p))

        size = "tiny-size SD2 (dry run)" if args.dry_run else "SD2 768-v, random weights"
        row(f"build {size}", lambda: build_sd2(tmp / "sd2", args.dry_run) or "saved")
        register_tiny_clip()
        clip_name = "di-tiny-clip" if args.dry_run else CLIP_MODEL
        clip_path = tmp / "clip.safetensors"
        spec = ModelSpec(family="sd", diffusion=str(tmp / "sd2"), clip_model=clip_name,
                         clip_pretrained=str(clip_path), device=device,
                         compile=args.compile, channels_last=args.channels_last, dtype=args.dtype)
        print(f"  spec: {spec.resolved()}", flush=True)

        # textual inversion: steps per second after warm-up, from the progress callback's clock
        ticks: dict[int, float] = {}
        learned = []

        def textual_inversion():
            cfg = TextualInversionConfig.for_family("sd", steps=p["ti_steps"], resolution=res_px, batch_size=1)

            def tick(step, total, loss):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                ticks[step] = time.perf_counter()

            res = run_textual_inversion(CLASS_IMAGES, "<bench>", "circle", model=spec, config=cfg, progress=tick)
            n = p["ti_steps"] - p["ti_warmup"]
            rate = n / (ticks[p["ti_steps"]] - ticks[p["ti_warmup"]])
            learned.append(res)
            return f"{rate:.2f} steps/s (steps {p['ti_warmup'] + 1}-{p['ti_steps']}; the time includes loading)"

        row(f"textual inversion, {res_px} px, batch 1", textual_inversion)

        # Multi-class textual inversion: K classes in one loop (one UNet pass over K images a step).
        # The UNet's weights are frozen, so a training step costs about 2 forward passes (activation
        # gradients only): the achieved fraction of the bf16 peak counts 2 x forward FLOPs per class-step.
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_multi_ti import measure

        flops = unet_forward_flops(spec, res_px)
        base_rate = []

        def multi(k):
            try:
                r = measure("together", k, p["multi_steps"], device, family="sd", diffusion=str(tmp / "sd2"),
                            dtype=args.dtype, resolution=res_px, batch_size=1)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                return "out of memory"
            rate = r["loop"]
            base_rate.append(rate) if k == 1 else None
            share = rate * 2 * flops / (args.peak_tflops * 1e12)
            return (f"{rate:.2f} class-steps/s ({rate / base_rate[0]:.1f}x K=1), UNet at "
                    f"{100 * share:.1f}% of {args.peak_tflops:g} TFLOP/s bf16" if base_rate else f"{rate:.2f} class-steps/s")

        for k in p["multi_k"]:
            row(f"multi-class textual inversion, K={k}, {res_px} px, batch 1 per class", lambda k=k: multi(k))
        row("encoder root (1 token)", lambda: create_token_dictionary(
            learned, ["<bench>"], ["circle"], tmp / "root", model=spec) and "saved")

        images = []
        for bs in p["batches"]:
            cfg = GenerationConfig.for_family("sd", batch_size=bs, resolution=res_px, num_inference_steps=p["gen_steps"])
            # warm-up: pipeline assembly, kernel selection (and compilation with --compile)
            generate_samples(tmp / "root", 0, "a photo of a <TOKEN>", seeds=range(bs), model=spec,
                             config=GenerationConfig.for_family("sd", batch_size=bs, resolution=res_px,
                                                                num_inference_steps=2))

            def gen(bs=bs, cfg=cfg):
                samples = generate_samples(tmp / "root", 0, "a photo of a <TOKEN> in the snow", seeds=range(bs),
                                           model=spec, config=cfg)
                images.extend(s.image for s in samples)
                return len(samples)

            row(f"generate, {p['gen_steps']} steps, batch {bs}", gen, lambda n, t: f"{n / t:.2f} images/s")

        row(f"build {clip_name}, random weights", lambda: build_clip(clip_path, clip_name) or "saved")
        pool = (images * (p["clip_images"] // len(images) + 1))[:p["clip_images"]]
        scorers = []

        def load_scorer():
            scorers.append(ClipScorer(spec))  # batch size 64, the default
            scorers[0].similarity(pool[:8], ["warm-up"])
            return f"loaded ({spec.resolved().dtype})"

        row(f"load {clip_name} and warm up", load_scorer)
        scorer = scorers[0]
        row(f"CLIP {clip_name} scores, {len(pool)} images of {res_px} px, batch {scorer.batch_size}",
            lambda: scorer.similarity(pool, ["a photo of a circle", "a photo in the snow"]).shape[0],
            lambda n, t: f"{n / t:.1f} images/s")

    gpu = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores (dry run)"
    print(f"\n{gpu}, torch {torch.__version__}, dtype {spec.resolved().dtype}, "
          f"compile={args.compile}, channels_last={args.channels_last}")
    header = ("check", "result", "time", "peak memory")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
