"""Import the published ImageNet* tokens (a folder of `{i}.bin`, one per class) into an encoder root.

Each file is a torch-saved object holding one embedding: a tensor, a `{token: tensor}` dict
(the diffusers `learned_embeds.bin` format), or a `{"placeholder": (token, tensor)}` dict.
Files are read with `weights_only=True`, so no pickled code runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from .classes import class_key
from .encoder_root import create_token_dictionary
from .imagenet import imagenet_classes
from .models import ModelSpec


def read_token_file(path: Path) -> tuple[str | None, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable token file ({exc.__class__.__name__}: {exc})") from exc
    if isinstance(obj, torch.Tensor):
        return None, obj
    if isinstance(obj, dict) and "placeholder" in obj:
        token, emb = obj["placeholder"]
        return str(token), torch.as_tensor(emb)
    if isinstance(obj, dict) and len(obj) == 1:
        (token, emb), = obj.items()
        if isinstance(emb, torch.Tensor):
            return str(token), emb
    raise ValueError(f"{path} holds no single embedding; expected a tensor or a {{token: tensor}} dict")


def default_class_names(n: int) -> list[str]:
    """Names when none are given: the ImageNet-1k first synonyms for the 1000 published tokens
    (class `i` is ImageNet class `i`), else `class i`."""
    if n == 1000:
        return [c.short for c in imagenet_classes()]
    return [f"class {i}" for i in range(n)]


def import_imagenet_star(
    tokens_dir,
    encoder_root,
    *,
    class_names: Sequence[str] | None = None,
    model: ModelSpec | None = None,
) -> Path:
    """Build an encoder root from `{i}.bin` files; class `i` keeps index `i`.

    Without `class_names`, 1000 tokens are named after the ImageNet-1k classes (first synonym).
    """
    tokens_dir = Path(tokens_dir)
    files = {int(m.group(1)): p for p in tokens_dir.glob("*.bin") if (m := re.fullmatch(r"(\d+)\.bin", p.name))}
    if not files:
        raise FileNotFoundError(f"no {{i}}.bin token files in {tokens_dir}")
    n = max(files) + 1
    missing = sorted(set(range(n)) - set(files))
    if missing:
        raise ValueError(f"token files are numbered 0..{n - 1} but {tokens_dir} lacks {missing[:10]}")
    if class_names is not None and len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names given for {n} token files")
    names = list(class_names) if class_names is not None else default_class_names(n)
    embeds, tokens, keys = [], [], []
    for i in range(n):
        token, emb = read_token_file(files[i])
        key = f"{class_key(names[i])}-{i}"
        embeds.append(emb)
        tokens.append(token or f"<{key}>")
        keys.append(key)
    return create_token_dictionary(embeds, tokens, names, encoder_root, model=model, class_keys=keys)
