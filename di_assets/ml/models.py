"""Model families: one registry that resolves a family name to loadable models.

- `tiny`: the embedded default. A small UNet, VAE and CLIP text encoder with the real CLIP
  BPE tokenizer, built deterministically from configs, written with `save_pretrained` and
  read back with `from_pretrained`; and a tiny open_clip scorer registered with
  `add_model_config`. Nothing is downloaded.
- `sd`: any diffusers Stable Diffusion 1.x/2.x folder or Hub id, and any open_clip model by
  name and pretrained tag or local checkpoint.

Every loader is cached per process, so a run loads each model once.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .io import atomic_dir
from .threads import apply_threads

log = logging.getLogger("di_assets")
apply_threads()  # torch's CPU threads: the CPUs this process may use, not every core it sees

# Loading bars per shard are noise in a pipeline's logs; our own progress lines say more.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

TINY_CLIP_NAME = "di-tiny-clip"
TINY_VERSION = "tiny-v3"  # bump when the tiny architecture changes, so caches rebuild
TINY_SEED = 0
FAMILIES = ("tiny", "sd")
# Trained on the reference world by `python -m di_assets.reference_world.train_clip` and
# `... .train_diffusion` (see the .json record beside each).
SHIPPED = Path(__file__).resolve().parent.parent / "reference_world" / "weights"
SHIPPED_CLIP = SHIPPED / "clip.safetensors"
SHIPPED_DIFFUSION = SHIPPED / "diffusion"
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelSpec:
    """Which models to use, on which device. Hashable, so it keys the per-process caches."""

    family: str = "tiny"
    diffusion: str | None = None  # sd: Hub id or local folder; tiny: built in the cache
    clip_model: str | None = None  # open_clip architecture name
    clip_pretrained: str | None = None  # open_clip pretrained tag or local checkpoint
    device: str = "auto"
    dtype: str = "auto"
    # Speed and memory flags for the diffusion UNet/VAE; none changes the results beyond float noise.
    compile: bool = False  # torch.compile the UNet (slow first step, faster after)
    channels_last: bool = False  # NHWC convolutions, faster on tensor cores
    vae_slicing: bool = False  # decode a batch one image at a time: less memory at large batches
    vae_tiling: bool = False  # decode/encode large images in tiles: less memory at high resolution

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")

    def resolved(self) -> "ModelSpec":
        """Fill family defaults and resolve `auto` device/dtype.

        Cheap: the CLIP fields are names and paths only (open_clip is not imported and the tiny
        scorer is neither registered nor built here; `load_clip` does that when a CLIP is used).
        """
        if self.family == "tiny":
            diffusion = self.diffusion or str(tiny_diffusion_dir())
            clip_model = self.clip_model or TINY_CLIP_NAME
            clip_pretrained = self.clip_pretrained or str(tiny_clip_path())
        else:
            diffusion = self.diffusion or "stabilityai/stable-diffusion-2"
            clip_model = self.clip_model or "ViT-H-14"
            clip_pretrained = self.clip_pretrained or "laion2b_s32b_b79k"
        device = resolve_device(self.device)
        return replace(self, diffusion=diffusion, clip_model=clip_model, clip_pretrained=clip_pretrained,
                       device=device, dtype=resolve_dtype(self.dtype, device))

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str = "auto") -> str:
    """`auto`: cuda, then mps, then cpu. Anything else is kept as given (`cuda:1`, `cpu`)."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """auto: float32 on CPU, bf16 on CUDA where supported, else fp16. bf16 may be asked for on CPU, to check
    the GPU's precision there (it was no faster, even with AMX); fp16 fails on CPU in diffusers."""
    if dtype != "auto":
        if dtype == "float16" and device == "cpu":
            raise ValueError(f"dtype {dtype} is not supported on CPU; use float32, bfloat16 or auto")
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "mps":
        return "float16"
    return "float32"


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ---------------------------------------------------------------- the tiny family


def cache_root() -> Path:
    return Path(os.environ.get("DI_ASSETS_CACHE", Path.home() / ".cache" / "di_assets"))


def tiny_diffusion_dir(trained: bool = True) -> Path:
    """The tiny text-to-image model: the one trained on the reference world, else (or with
    `trained=False`) the architecture with its deterministic random weights."""
    if trained and (SHIPPED_DIFFUSION / "model_index.json").exists():
        return SHIPPED_DIFFUSION
    path = cache_root() / TINY_VERSION / "diffusion"
    if not (path / "model_index.json").exists():
        _build_tiny_diffusion(path)
    return path




def tiny_clip_path() -> Path:
    """Where the tiny scorer's weights are (or will be built): a path only, no import, no build."""
    if SHIPPED_CLIP.exists():
        return SHIPPED_CLIP
    return cache_root() / TINY_VERSION / "clip" / "open_clip_model.safetensors"


def tiny_clip_checkpoint() -> Path:
    """The tiny scorer's weights: the ones trained on the reference world, else random ones."""
    register_tiny_clip()
    path = tiny_clip_path()
    if not path.exists():
        _build_tiny_clip(path)
    return path


# What `tokens.json` stores for the tiny models: never a path of the machine that wrote it.
TINY_MARKER = "di-assets:tiny"  # the shipped model trained on the reference world
TINY_UNTRAINED_MARKER = f"di-assets:{TINY_VERSION}-untrained"  # the architecture with its seeded weights


def _same_path(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def portable_base_model(diffusion: str | None) -> str | None:
    """The name an encoder root stores for its base model: a Hub id or a user's folder as given,
    a marker for the tiny models. Absolute paths of a tiny model (old roots, other machines) map
    to their marker too."""
    if not diffusion or diffusion.startswith("di-assets:"):
        return diffusion
    untrained = cache_root() / TINY_VERSION / "diffusion"
    if _same_path(diffusion, SHIPPED_DIFFUSION):
        return TINY_MARKER
    if _same_path(diffusion, untrained):
        return TINY_UNTRAINED_MARKER
    if not Path(diffusion).exists():  # written elsewhere: recognise the package's and the cache's layout
        parts = Path(diffusion.replace("\\", "/")).parts
        if parts[-4:] == ("di_assets", "reference_world", "weights", "diffusion"):
            return TINY_MARKER
        if parts[-2:] == (TINY_VERSION, "diffusion"):
            return TINY_UNTRAINED_MARKER
    return diffusion


def base_model_location(stored: str | None) -> str | None:
    """Where to load a stored base model from on this machine (the inverse of `portable_base_model`)."""
    stored = portable_base_model(stored)
    if stored == TINY_MARKER:
        return str(SHIPPED_DIFFUSION if (SHIPPED_DIFFUSION / "model_index.json").exists() else tiny_diffusion_dir())
    if stored == TINY_UNTRAINED_MARKER:
        return str(tiny_diffusion_dir(trained=False))
    return stored


def clip_bpe_files(out_dir: Path) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` for the CLIP BPE tokenizer from open_clip's vocabulary.

    The order of ids follows CLIP exactly (bytes, bytes+</w>, merges, start, end), so every
    prompt gets the ids that Stable Diffusion's tokenizer gives it.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    return out_dir / "vocab.json", out_dir / "merges.txt"


def _build_tiny_diffusion(path: Path) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    log.info("building the tiny diffusion model in %s", path)
    with atomic_dir(path) as tmp:
        vocab, merges = clip_bpe_files(tmp / "_bpe")
        tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>", model_max_length=77)
        torch.manual_seed(TINY_SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        torch.manual_seed(TINY_SEED + 1)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(48, 96), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8,
            # the pooled prompt also joins the time embedding, so every ResNet block hears it:
            # a small UNet learns global attributes (which shape, which background) much sooner
            addition_embed_type="text", addition_embed_type_num_heads=4,
        )
        torch.manual_seed(TINY_SEED + 2)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(16, 32, 32), norm_num_groups=8, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        )
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        for f in (tmp / "_bpe").iterdir():
            f.unlink()
        (tmp / "_bpe").rmdir()


def register_tiny_clip() -> None:
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        # add_model_config names the architecture after the file's stem
        open_clip.add_model_config(Path(__file__).with_name(f"{TINY_CLIP_NAME}.json"))


def _build_tiny_clip(path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    from .io import atomic_path

    log.info("building the tiny CLIP scorer in %s", path)
    torch.manual_seed(TINY_SEED + 3)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))


# ---------------------------------------------------------------- cached loaders


def _is_local(path: str) -> bool:
    return Path(path).exists()


def load_diffusion_components(spec: ModelSpec):
    """UNet and VAE of a diffusion model (frozen), loaded once per process."""
    return _load_diffusion_components(spec.resolved())


@functools.lru_cache(maxsize=4)
def _load_diffusion_components(spec: ModelSpec):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtype = torch_dtype(spec.dtype)
    kw = {"local_files_only": True}  # a Hub id is read from the local cache; nothing is downloaded
    log.info("loading diffusion model %s on %s (%s)", spec.diffusion, spec.device, spec.dtype)
    unet = UNet2DConditionModel.from_pretrained(spec.diffusion, subfolder="unet", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(spec.diffusion, subfolder="vae", torch_dtype=dtype, **kw)
    unet.to(spec.device).eval().requires_grad_(False)
    vae.to(spec.device).eval().requires_grad_(False)
    apply_speed_flags(spec, unet, vae)
    return unet, vae


def apply_speed_flags(spec: ModelSpec, unet, vae) -> None:
    """PyTorch SDPA attention always; the optional flags of `spec` on top."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    # diffusers picks SDPA on torch 2 already; setting it makes that a guarantee, not a default.
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    if spec.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if spec.vae_slicing:
        vae.enable_slicing()
    if spec.vae_tiling:
        vae.enable_tiling()
    if spec.compile:
        unet.compile()  # in place, so `unet.config` and the pipeline see the same module


def native_resolution(unet, vae) -> int:
    """The image size a model was trained at: latent size times the VAE's downsampling."""
    return unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)


def load_base_text_encoder(spec: ModelSpec):
    """The base model's tokenizer and text encoder (float32, frozen), loaded once per process.

    Shared: callers that add tokens or resize must work on a copy (`copy.deepcopy`).
    """
    return _load_base_text_encoder(spec.resolved())


@functools.lru_cache(maxsize=4)
def _load_base_text_encoder(spec: ModelSpec):
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"local_files_only": True}  # a Hub id is read from the local cache; nothing is downloaded
    tokenizer = CLIPTokenizer.from_pretrained(spec.diffusion, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(spec.diffusion, subfolder="text_encoder", **kw)
    text_encoder.eval().requires_grad_(False)
    return tokenizer, text_encoder


def load_scheduler(spec: ModelSpec, name: str = "ddpm"):
    """A scheduler built from the diffusion model's own scheduler config."""
    import diffusers

    spec = spec.resolved()
    classes = {
        "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
        "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler",
    }
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(classes)}")
    kw = {"local_files_only": True}  # a Hub id is read from the local cache; nothing is downloaded
    return getattr(diffusers, classes[name]).from_pretrained(spec.diffusion, subfolder="scheduler", **kw)


def load_clip(spec: ModelSpec):
    """The open_clip scorer, its image transform and its tokenizer, loaded once per process."""
    return _load_clip(spec.resolved())


# open_clip's precision names for our dtypes; its fp16/bf16 keep the LayerNorms in float32
CLIP_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@functools.lru_cache(maxsize=2)
def _load_clip(spec: ModelSpec):
    import open_clip

    register_tiny_clip()
    if spec.clip_model == TINY_CLIP_NAME and _same_path(spec.clip_pretrained, tiny_clip_path()):
        tiny_clip_checkpoint()  # built on first use
    log.info("loading CLIP %s (%s) on %s (%s)", spec.clip_model, spec.clip_pretrained, spec.device, spec.dtype)
    pretrained = spec.clip_pretrained
    if pretrained and not Path(pretrained).exists():  # a pretrained tag: its file in the cache, never fetched
        pretrained = cached_clip_checkpoint(spec.clip_model, pretrained)
    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.clip_model, pretrained=pretrained, device=spec.device, precision=CLIP_PRECISION[spec.dtype],
    )
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(spec.clip_model)
    return model, preprocess, tokenizer


# ---------------------------------------------------------------- checks before any work

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def looks_like_path(value: str) -> bool:
    """Whether a model setting names a local path rather than a Hub id (`org/name`) or a tag:
    absolute, starting with `.` or `~`, with a backslash, or with more than one `/`."""
    return Path(value).is_absolute() or value.startswith((".", "~")) or "\\" in value or value.count("/") > 1


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache that `from_pretrained` reads, from the environment as it is now."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def in_hub_cache(repo_id: str, filename: str = "model_index.json") -> bool:
    """Whether a Hub repository's file is in the local cache: no network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir()), str)
    except ValueError:  # not a valid repo id (HFValidationError)
        return False


def cached_clip_checkpoint(arch: str, tag: str) -> str:
    """The local file of open_clip's pretrained `tag` for `arch`, from the Hugging Face cache (no network)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    repo = ((open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub") or "").strip("/")
    if not repo:
        raise FileNotFoundError(f"models.clip_pretrained: open_clip knows no pretrained tag {tag!r} for {arch} on "
                                "the Hugging Face Hub; give a local checkpoint file")
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, name, cache_dir=hub_cache_dir())
        if isinstance(found, str):
            return found
    raise FileNotFoundError(f"models.clip_pretrained: {arch} {tag} ({repo}) is not in the Hugging Face cache "
                            f"({hub_cache_dir()}), and di-assets never downloads weights: fetch it first "
                            f"(`hf download {repo}`) or give a local checkpoint file")


def check_model_files(spec: ModelSpec) -> None:
    """Before any work: the models that `spec` names are here, as one line `models.<key>: ...`.

    A local diffusion folder or CLIP checkpoint must exist; a diffusion Hub id must be in the local
    Hugging Face cache (weights are never downloaded); the dtype must run on the device. Nothing is
    loaded or built, and the network is not used. Raises FileNotFoundError or ValueError.
    """
    try:
        resolve_dtype(spec.dtype, resolve_device(spec.device))
    except ValueError as exc:
        raise ValueError(f"models.dtype: {exc}") from None
    diffusion, clip_model, clip_pretrained = spec.diffusion, spec.clip_model, spec.clip_pretrained
    if spec.family == "sd":  # the defaults count too (the tiny family's are shipped or built)
        sd = replace(spec, device="cpu", dtype="float32").resolved()
        diffusion, clip_model, clip_pretrained = sd.diffusion, sd.clip_model, sd.clip_pretrained
    if diffusion:
        path = Path(diffusion)
        if _is_local(diffusion) or looks_like_path(diffusion):  # as the loaders tell a folder from a Hub id
            if not path.exists():
                hint = " (~ is not expanded: write the full path)" if diffusion.startswith("~") else ""
                raise FileNotFoundError(f"models.diffusion: folder {diffusion} does not exist{hint}")
            if not path.is_dir():
                raise NotADirectoryError(f"models.diffusion: {diffusion} is a file, not a diffusers model folder")
            if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
                raise FileNotFoundError(f"models.diffusion: folder {diffusion} holds no diffusers model "
                                        "(no model_index.json); write it with save_pretrained")
        elif not in_hub_cache(diffusion):
            raise FileNotFoundError(
                f"models.diffusion: {diffusion} is neither a local folder nor in the Hugging Face cache "
                f"({hub_cache_dir()}), and di-assets never downloads weights: fetch it first "
                f"(`hf download {diffusion}`) or give a local diffusers folder")
    if clip_pretrained and (looks_like_path(clip_pretrained) or "/" in clip_pretrained
                            or clip_pretrained.endswith(CHECKPOINT_SUFFIXES)):
        path = Path(clip_pretrained)
        if not path.exists():
            hint = " (~ is not expanded: write the full path)" if clip_pretrained.startswith("~") else ""
            raise FileNotFoundError(f"models.clip_pretrained: checkpoint file {clip_pretrained} does not exist{hint}")
        if path.is_dir():
            raise IsADirectoryError(f"models.clip_pretrained: {clip_pretrained} is a folder, not a checkpoint file")
    elif clip_pretrained and clip_model:
        cached_clip_checkpoint(clip_model, clip_pretrained)
