"""The CLIP metric: cosine similarity between images and a caption."""

from __future__ import annotations

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
