"""The CLIP metric: cosine similarity between images and a caption."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .models import ModelSpec, load_clip, torch_dtype


class ClipScorer:
    """Batched CLIP similarities; the model loads once per process, captions embed once."""

    def __init__(self, model: ModelSpec | None = None, batch_size: int = 64):
        self.spec = (model or ModelSpec()).resolved()
        self.model, self.preprocess, self.tokenizer = load_clip(self.spec)
        self.batch_size = batch_size
        self._dtype = torch_dtype(self.spec.dtype)  # the model's weights are in this dtype (bf16/fp16 on GPU)
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def model_id(self) -> str:
        return f"{self.spec.clip_model}/{self.spec.clip_pretrained}"

    @torch.inference_mode()
    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            feats = self.model.encode_text(self.tokenizer(missing).to(self.spec.device)).float()
            feats = feats / feats.norm(dim=-1, keepdim=True)
            self._text_cache.update(zip(missing, feats.cpu()))
        return torch.stack([self._text_cache[c] for c in captions])

    @torch.inference_mode()
    def image_features(self, images) -> torch.Tensor:
        feats = []
        for start in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(im) for im in images[start:start + self.batch_size]])
            f = self.model.encode_image(x.to(self.spec.device, self._dtype)).float()
            feats.append((f / f.norm(dim=-1, keepdim=True)).cpu())
        return torch.cat(feats) if feats else torch.empty(0, 0)

    def similarity(self, images, captions: Sequence[str]) -> torch.Tensor:
        """(num_images, num_captions) cosine similarities."""
        if len(images) == 0:
            return torch.empty(0, len(captions))
        return self.image_features(images) @ self.text_features(captions).T


_scorers: dict[ModelSpec, ClipScorer] = {}


def get_scorer(model: ModelSpec | None = None) -> ClipScorer:
    spec = (model or ModelSpec()).resolved()
    if spec not in _scorers:
        _scorers[spec] = ClipScorer(spec)
    return _scorers[spec]


def clip_similarity(images, caption: str, *, model: ModelSpec | None = None) -> torch.Tensor:
    """Cosine similarity of each image with `caption`, as in the paper: a 1-D CPU tensor."""
    return get_scorer(model).similarity(list(images), [caption])[:, 0]


# ---------------------------------------------------------------- the CLIP filter

BASE_CAPTION = "a photo"  # the base shift's caption: what an image shows when no shift took hold


@dataclass(frozen=True)
class FilterRule:
    """Which counterfactuals to keep. The default needs no constant tuned per model:

    - `zero_shot`: the image is CLIP's zero-shot choice among the dataset's class captions;
    - `calibrated`: its similarity to its class caption reaches the midpoint between what a match
      looks like for this model (the median similarity of the class's real images to that caption)
      and what a mismatch looks like (the median similarity of the same images to the other
      classes' captions), so that an image no class caption fits (a failed generation that CLIP
      still ranks first among few classes) is dropped;
    - `shift_over_base`: a shifted image matches its shift caption better than the base caption.

    Fixed thresholds are optional extras.
    """

    zero_shot: bool = True
    calibrated: bool = True
    shift_over_base: bool = True
    min_sim_class: float | None = None
    min_sim_shift: float | None = None


def class_floor(class_sims: torch.Tensor, own: int, real_sim_class: float | None) -> float | None:
    """The calibrated floor of sim_class for a partition (None where it cannot be estimated)."""
    if real_sim_class is None or class_sims.shape[1] < 2 or len(class_sims) == 0:
        return None
    others = torch.cat([class_sims[:, :own], class_sims[:, own + 1:]], 1)
    return (real_sim_class + others.median().item()) / 2


def drop_reasons(class_sims: torch.Tensor, own: int, class_keys: Sequence[str], sim_shift: torch.Tensor,
                 sim_base: torch.Tensor, shift_caption: str, rule: FilterRule = FilterRule(),
                 floor: float | None = None) -> list[str | None]:
    """Why each image is dropped (None: kept). `class_sims` is (images, classes): the similarity of
    each image to every class caption of the dataset; `own` is the index of the image's class;
    `floor` the calibrated floor of sim_class (`class_floor`)."""
    out = []
    choice = class_sims.argmax(1).tolist() if len(class_sims) else []
    for i, pick in enumerate(choice):
        why = []
        if rule.zero_shot and pick != own:
            why.append(f"zero-shot: {class_keys[pick]}")
        if rule.calibrated and floor is not None and class_sims[i, own] < floor:
            why.append(f"sim_class below the class's floor {floor:.3f}")
        if rule.shift_over_base and shift_caption != BASE_CAPTION and sim_shift[i] <= sim_base[i]:
            why.append("shift not shown")
        if rule.min_sim_class is not None and class_sims[i, own] < rule.min_sim_class:
            why.append(f"sim_class < {rule.min_sim_class:g}")
        if rule.min_sim_shift is not None and sim_shift[i] < rule.min_sim_shift:
            why.append(f"sim_shift < {rule.min_sim_shift:g}")
        out.append("; ".join(why) or None)
    return out
