"""Resources: where files live, which models run on which device, and the hyperparameters."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import dagster as dg
from pydantic import ConfigDict, Field

from di_assets.ml.defaults import (GENERATION, TEXTUAL_INVERSION, describe, describe_classes_per_batch,
                                   describe_workers)

if TYPE_CHECKING:
    from di_assets.settings import Settings


BASELINE_DIR = "baseline"  # the class-name baseline's images and scores, in the same layout
# Settings are checked whole before any work (see Settings.validate): a key no field knows is an error.
FORBID_EXTRA = ConfigDict(extra="forbid")


def _choices(*choices: str, pattern: str | None = None) -> dict:
    """Field constraints for a string that must be one of `choices` (`choices` also names them in errors)."""
    return {"pattern": pattern or "^(" + "|".join(re.escape(c) for c in choices) + ")$",
            "json_schema_extra": {"choices": list(choices)}}


class StorageResource(dg.ConfigurableResource):
    """The class-image dataset (ImageFolder layout) and the storage root of every artifact."""

    model_config = FORBID_EXTRA
    root: str = Field(description="Storage root: tokens/, encoder_root/, images/, scores/, scores.duckdb")
    dataset: str = Field(description="Class-image folder: one sub-folder of images per class")
    # its choices are checked by Settings.validate, and by retire_class when a class goes
    removed_classes: str = Field(default="trash", json_schema_extra={"choices": ["trash", "delete"]},
                                 description="What happens to a removed class's files: trash or delete")

    def classes(self):
        from di_assets.ml.classes import discover_classes

        return {c.key: c for c in discover_classes(self.dataset)}

    def class_folder(self, key: str):
        classes = self.classes()
        if key not in classes:
            raise KeyError(f"class {key!r} has no folder in {self.dataset}; was it removed?")
        return classes[key]

    @property
    def tokens_root(self) -> Path:
        return Path(self.root) / "tokens"

    def token_dir(self, key: str) -> Path:
        return self.tokens_root / key

    @property
    def encoder_root(self) -> Path:
        return Path(self.root) / "encoder_root"

    def variant_root(self, baseline: bool = False) -> Path:
        """Where a set of counterfactuals lives: the root, or `baseline/` for the class-name baseline."""
        return Path(self.root) / BASELINE_DIR if baseline else Path(self.root)

    def images_dir(self, key: str, shift: str, baseline: bool = False) -> Path:
        return self.variant_root(baseline) / "images" / key / shift

    def scores_file(self, key: str, shift: str | None, baseline: bool = False) -> Path:
        """A class x shift pair's score file; with `shift` None, the class grain's one file of the class."""
        folder = self.variant_root(baseline) / "scores" / f"class={key}"
        return (folder / f"shift={shift}" if shift is not None else folder) / "part.parquet"

    @property
    def scores_db(self) -> Path:
        return Path(self.root) / "scores.duckdb"

    def class_artifacts(self, key: str) -> list[Path]:
        from di_assets.ml.diagnosis import PREDICTIONS_DIR, REAL_PREDICTIONS_DIR

        root = Path(self.root)
        # the token's and the baseline's images and scores, and every classifier's predictions of the
        # class, so that all of them leave the views
        counterfactuals = [self.variant_root(b) / sub for b in (False, True)
                           for sub in (Path("images") / key, Path("scores") / f"class={key}")]
        predictions = [p for d in (PREDICTIONS_DIR, REAL_PREDICTIONS_DIR)
                       for p in sorted(root.glob(f"{d}/classifier=*/class={key}"))]
        return [self.token_dir(key), *counterfactuals, *predictions]

    def retire_class(self, key: str) -> Path | None:
        """Move a removed class's token, images and scores to trash/ (or delete them); return where."""
        import shutil
        import time

        if self.removed_classes not in ("trash", "delete"):
            raise ValueError(f"removed_classes must be 'trash' or 'delete', not {self.removed_classes!r}")
        dest = Path(self.root) / "trash" / f"{time.strftime('%Y%m%d-%H%M%S')}-{key}"
        for path in self.class_artifacts(key):
            if not path.exists():
                continue
            if self.removed_classes == "delete":
                shutil.rmtree(path)
            else:
                target = dest / path.relative_to(self.root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), str(target))
        return dest if self.removed_classes == "trash" else None


class ModelResource(dg.ConfigurableResource):
    """Model family, model ids and device. Models load once per process and are reused."""

    model_config = FORBID_EXTRA
    family: str = Field(default="tiny", **_choices("tiny", "sd"),
                        description="'tiny' (embedded, offline) or 'sd' (Stable Diffusion 1.x/2.x)")
    diffusion: Optional[str] = Field(default=None, description="sd: Hub id or local diffusers folder")
    clip_model: Optional[str] = Field(default=None, description="open_clip architecture (sd default ViT-H-14)")
    clip_pretrained: Optional[str] = Field(default=None, description="open_clip pretrained tag or local checkpoint")
    device: str = Field(default="auto", **_choices("auto", "cpu", "cuda", "cuda:N", "mps",
                                                   pattern=r"^(auto|cpu|cuda|cuda:[0-9]+|mps)$"),
                        description="auto, cpu, cuda, cuda:1, mps")
    dtype: str = Field(default="auto", **_choices("auto", "float32", "float16", "bfloat16"),
                       description="auto, float32, float16, bfloat16")
    compile: bool = Field(default=False, description="torch.compile the UNet (slow first step, faster after)")
    channels_last: bool = Field(default=False, description="channels-last memory format for the UNet and VAE")
    vae_slicing: bool = Field(default=False, description="VAE decodes one image at a time (less memory)")
    vae_tiling: bool = Field(default=False, description="VAE works in tiles (less memory at high resolution)")
    threads: Optional[int] = Field(default=None, gt=0,
                                   description="torch's CPU threads; default $DI_ASSETS_THREADS, else the CPUs this "
                                               "process may use (affinity, cgroup CPU limit)")
    omp_wait_policy: Optional[str] = Field(default=None, **_choices("passive", "active"),
                                           description="OpenMP idle threads: passive (sleep, the default: fair "
                                                       "beside other processes) or active (spin)")
    devices: Optional[list[str]] = Field(
        default=None,
        description="GPUs that concurrent steps lease one each when device is auto (e.g. [cuda:0, cuda:1]); "
                    "default $DI_ASSETS_DEVICES, else every visible CUDA device",
    )

    def spec(self):
        from di_assets.ml.models import ModelSpec

        return ModelSpec(family=self.family, diffusion=self.diffusion, clip_model=self.clip_model,
                         clip_pretrained=self.clip_pretrained, device=self.device, dtype=self.dtype,
                         compile=self.compile, channels_last=self.channels_last, vae_slicing=self.vae_slicing,
                         vae_tiling=self.vae_tiling)

    @contextmanager
    def leased_spec(self, timeout: Optional[float] = None) -> Iterator:
        """The spec on a GPU that this step holds alone until the block ends (see ml.devices)."""
        from di_assets.ml.devices import leased_spec
        from di_assets.ml.threads import apply_threads

        spec = self.spec()  # (imports the models, which size the threads to the CPUs by default)
        apply_threads(self.threads)  # CPU threads that fit this process's share of the machine
        with leased_spec(spec, self.devices, timeout=timeout) as spec:
            yield spec


def _ti(key: str, what: str, **constraints):
    return Field(default=None, description=describe(TEXTUAL_INVERSION, key, what), **constraints)


def _gen(key: str, what: str, **constraints):
    return Field(default=None, description=describe(GENERATION, key, what), **constraints)


POSITIVE = {"gt": 0}
IMAGE_SIZE = {"gt": 0, "multiple_of": 8}  # the VAE works in blocks of 8 pixels


class TextualInversionParams(dg.Config):
    model_config = FORBID_EXTRA

    steps: Optional[int] = _ti("steps", "Optimisation steps per token", **POSITIVE)
    learning_rate: Optional[float] = _ti("learning_rate", "AdamW learning rate", gt=0, allow_inf_nan=False)
    batch_size: Optional[int] = _ti("batch_size", "Images per step", **POSITIVE)
    gradient_accumulation: Optional[int] = _ti("gradient_accumulation", "Steps whose gradients add up per update",
                                                **POSITIVE)
    resolution: Optional[int] = _ti("resolution", "Training image size (SD2 768, SD1 512)", **IMAGE_SIZE)
    num_vectors: Optional[int] = _ti("num_vectors", "Embedding vectors per token", **POSITIVE)
    seed: Optional[int] = _ti("seed", "Random seed")
    pin_norm: Optional[bool] = _ti("pin_norm", "Keep the token's norm at the initialiser's")
    checkpoint_every: Optional[int] = _ti("checkpoint_every", "Steps between checkpoints (a rerun resumes)",
                                           **POSITIVE)
    classes_per_batch: Optional[int] = Field(default=None, description=describe_classes_per_batch(), **POSITIVE)
    workers: Optional[int] = Field(default=None, description=describe_workers(), **POSITIVE)

    def resolved(self, family: str) -> "TextualInversionParams":
        """Every unset field holds `family`'s default: what `ti_config(family)` uses (`resolution`'s
        default is None, the model's native size, which only the loaded model knows)."""
        return _resolved(self, TEXTUAL_INVERSION, family)


class GenerationParams(dg.Config):
    model_config = FORBID_EXTRA

    num_samples: int = Field(default=4, gt=0, description="Images per class and shift (ImageNet* used 50)")
    seed: int = Field(default=0, description="Sample j uses seed + j, in every shift")
    num_inference_steps: Optional[int] = _gen("num_inference_steps", "Denoising steps", **POSITIVE)
    guidance_scale: Optional[float] = _gen("guidance_scale", "Classifier-free guidance scale", ge=0,
                                            allow_inf_nan=False)
    scheduler: Optional[str] = _gen("scheduler", "euler, euler_a, ddim, dpm, pndm or ddpm",
                                     **_choices("euler", "euler_a", "ddim", "dpm", "pndm", "ddpm"))
    resolution: Optional[int] = _gen("resolution", "Image size", **IMAGE_SIZE)
    negative_prompt: Optional[str] = _gen("negative_prompt", "Negative prompt")
    batch_size: Optional[int] = _gen("batch_size", "Images per pipeline call", **POSITIVE)

    def resolved(self, family: str) -> "GenerationParams":
        """Every unset field holds `family`'s default: what `generation_config(family)` uses."""
        return _resolved(self, GENERATION, family)


def defaults_row(family: str) -> str:
    """The row of ml/defaults.py's tables that a family uses, as `for_family` picks it."""
    return "sd" if family == "sd" else "tiny"


def _resolved(config, table: dict, family: str):
    """`config` with each unset (None) field set to the family's default in `table`; set fields stay."""
    defaults = table[defaults_row(family)]
    values = config.model_dump()
    return type(config)(**{k: defaults[k] if v is None and k in defaults else v for k, v in values.items()})


class ScoringParams(dg.Config):
    """The CLIP filter that sets `kept`; every dropped image gets its reasons in `drop_reason`."""

    model_config = FORBID_EXTRA
    zero_shot: bool = Field(default=True, description="Keep an image only if CLIP's zero-shot choice among the "
                                                      "dataset's class captions is its own class")
    calibrated: bool = Field(default=True, description="Keep an image only if its class similarity reaches the "
                                                       "midpoint between the class's real images' similarity to "
                                                       "its caption and the image's similarity to other captions")
    real_images: int = Field(default=32, gt=0, description="Real images per class that calibrate the floor (the "
                                                           "first, sorted by file name)")
    shift_over_base: bool = Field(default=True, description="Keep a shifted image only if it matches its shift "
                                                            "caption better than the base caption 'a photo'")
    min_sim_class: Optional[float] = Field(default=None, ge=-1, le=1, allow_inf_nan=False,
                                           description="Optional: drop images below this class similarity")
    min_sim_shift: Optional[float] = Field(default=None, ge=-1, le=1, allow_inf_nan=False,
                                           description="Optional: drop images below this shift similarity")

    def rule(self):
        from di_assets.ml.clip_metric import FilterRule

        return FilterRule(**self.model_dump(exclude={"real_images"}))


class InterfaceParams(dg.ConfigurableResource):
    """Hyperparameters of the three stages; unset fields take the model family's defaults.

    `for_settings` (what the code location uses) fills them in, so the launchpad and the resource's
    page show the value every setting will have."""

    textual_inversion: TextualInversionParams = TextualInversionParams()
    generation: GenerationParams = GenerationParams()
    scoring: ScoringParams = ScoringParams()
    resolved_for: Optional[str] = Field(default=None, **_choices("tiny", "sd"),
                                        description="The model family whose defaults fill the settings left unset "
                                                    "(the settings' models.family); a run on another family stops")

    @classmethod
    def for_settings(cls, settings: "Settings") -> "InterfaceParams":
        """The settings' hyperparameters, every unset one set to its default for `models.family`."""
        family = settings.models.get("family", "tiny")
        return cls(textual_inversion=TextualInversionParams(**settings.textual_inversion).resolved(family),
                   generation=GenerationParams(**settings.generation).resolved(family),
                   scoring=ScoringParams(**settings.scoring), resolved_for=family)

    def _check_family(self, family: str) -> None:
        if self.resolved_for is not None and defaults_row(family) != defaults_row(self.resolved_for):
            raise ValueError(f"params hold the {self.resolved_for!r} family's defaults (the settings' models.family), "
                             f"but the models are {family!r}: set models.family in the settings file, not in the "
                             f"run's config")

    def ti_config(self, family: str):
        from di_assets.ml.textual_inversion import TextualInversionConfig

        self._check_family(family)
        return TextualInversionConfig.for_family(family, **self.textual_inversion.model_dump())

    def generation_config(self, family: str):
        from di_assets.ml.generate import GenerationConfig

        self._check_family(family)
        g = self.generation.model_dump()
        g.pop("num_samples"), g.pop("seed")
        return GenerationConfig.for_family(family, **g)


def resolved_settings(settings: "Settings") -> dict:
    """Every setting a run uses, defaults filled in for the model family, as JSON-ready values: for the
    run's record (e.g. a run tag `json.dumps(resolved_settings(settings), sort_keys=True)`).

    Model names left unset (`diffusion`, `clip_model`, ...) stay None: the model loaders pick them
    (see ml.models). Loads no model and imports no torch."""
    from dataclasses import asdict

    from di_assets.ml.shifts import select_shifts

    params = InterfaceParams.for_settings(settings)
    models = ModelResource(**settings.models)
    return {
        "source": settings.source,
        "dataset": settings.dataset,
        "storage": settings.storage,
        "models": {k: getattr(models, k) for k in ModelResource.model_fields},
        "shifts": [s.key for s in select_shifts(settings.shifts)],
        "textual_inversion": params.textual_inversion.model_dump(),
        "generation": params.generation.model_dump(),
        "scoring": params.scoring.model_dump(),
        "classifiers": [asdict(spec) for spec in settings.classifier_specs()],
        "baseline": settings.baseline,
        "observe_cron": settings.observe_cron,
        "removed_classes": settings.removed_classes,
    }
