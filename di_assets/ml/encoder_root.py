"""The encoder root: one tokenizer + text encoder that holds every class token.

Layout (what `generate` reads):

    encoder_root/
      tokenizer/       CLIPTokenizer.save_pretrained, with the class tokens added
      text_encoder/    CLIPTextModel.save_pretrained, embeddings resized once
      tokens.json      base model, and per class: index, key, name, token, token ids
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .classes import class_key
from .io import atomic_dir
from .models import ModelSpec, load_base_text_encoder
from .textual_inversion import TextualInversionResult, check_new_tokens, placeholder_tokens

log = logging.getLogger("di_assets")

TOKENS_FILE = "tokens.json"


@dataclass(frozen=True)
class ClassToken:
    index: int
    key: str
    name: str
    token: str
    token_ids: tuple[int, ...]

    @property
    def prompt_text(self) -> str:
        """What replaces `<TOKEN>` in a prompt: all of the token's vectors."""
        return " ".join(placeholder_tokens(self.token, len(self.token_ids)))


def _as_matrix(embed) -> torch.Tensor:
    if isinstance(embed, TextualInversionResult):
        embed = embed.embeds
    embed = torch.as_tensor(embed).detach().float().cpu()
    return embed.reshape(-1, embed.shape[-1])


def create_token_dictionary(
    embeds: Sequence,
    tokens: Sequence[str],
    class_names: Sequence[str],
    encoder_root,
    *,
    model: ModelSpec | None = None,
    class_keys: Sequence[str] | None = None,
) -> Path:
    """Add every class token to the base tokenizer and text encoder, with a single resize.

    `embeds[i]` is a learned embedding (a tensor of shape (dim,) or (num_vectors, dim), or a
    `TextualInversionResult`) for `tokens[i]`; class `i` keeps index `i` in `tokens.json`.
    The root is written to a temporary folder and swapped in, so it is never half-written.
    """
    if not (len(embeds) == len(tokens) == len(class_names)):
        raise ValueError(
            f"embeds, tokens and class_names must have one entry per class; got {len(embeds)}, {len(tokens)}, {len(class_names)}"
        )
    keys = list(class_keys) if class_keys is not None else [class_key(n) for n in class_names]
    spec = (model or ModelSpec()).resolved()
    base_tokenizer, base_encoder = load_base_text_encoder(spec)
    tokenizer = copy.deepcopy(base_tokenizer)
    text_encoder = copy.deepcopy(base_encoder).cpu()

    matrices = [_as_matrix(e) for e in embeds]
    dim = text_encoder.get_input_embeddings().embedding_dim
    all_names: list[str] = []
    for tok, m in zip(tokens, matrices):
        if m.shape[-1] != dim:
            raise ValueError(f"embedding for {tok} has dimension {m.shape[-1]}, but the text encoder expects {dim}")
        all_names += placeholder_tokens(tok, m.shape[0])
    repeated = {t for t in all_names if all_names.count(t) > 1}
    if repeated:
        raise ValueError(f"tokens must be unique; repeated: {sorted(repeated)}")
    check_new_tokens(tokenizer, all_names)

    first = len(tokenizer)
    tokenizer.add_tokens(all_names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # one resize for all classes
    weight = text_encoder.get_input_embeddings().weight
    entries, row = [], first
    with torch.no_grad():
        for i, (tok, name, key, m) in enumerate(zip(tokens, class_names, keys, matrices)):
            ids = list(range(row, row + m.shape[0]))
            weight[ids] = m.to(weight.dtype)
            entries.append({"index": i, "key": key, "name": name, "token": tok, "token_ids": ids})
            row += m.shape[0]

    encoder_root = Path(encoder_root)
    with atomic_dir(encoder_root) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        (tmp / TOKENS_FILE).write_text(json.dumps({
            "family": spec.family, "base_model": spec.diffusion, "classes": entries,
        }, indent=2) + "\n")
    log.info("encoder root with %d class tokens written to %s", len(entries), encoder_root)
    return encoder_root


def read_tokens(encoder_root) -> dict:
    path = Path(encoder_root) / TOKENS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{encoder_root} is not an encoder root: {TOKENS_FILE} is missing")
    return json.loads(path.read_text())


def class_tokens(encoder_root) -> list[ClassToken]:
    return [ClassToken(e["index"], e["key"], e["name"], e["token"], tuple(e["token_ids"]))
            for e in read_tokens(encoder_root)["classes"]]


def resolve_class(encoder_root, c) -> ClassToken:
    """A class by index (int) or by key or display name (str)."""
    classes = class_tokens(encoder_root)
    if isinstance(c, int) or (isinstance(c, str) and c.isdigit()):
        i = int(c)
        if not 0 <= i < len(classes):
            raise IndexError(f"class index {i} out of range: the encoder root has {len(classes)} classes")
        return classes[i]
    for ct in classes:
        if c in (ct.key, ct.name, ct.token):
            return ct
    raise KeyError(f"no class {c!r} in {encoder_root}; known keys: {', '.join(ct.key for ct in classes[:20])}")


def load_encoder_root(encoder_root, device: str, dtype: torch.dtype):
    """Tokenizer and text encoder of an encoder root, loaded once per process (until it is rebuilt)."""
    root = Path(encoder_root).resolve()
    tokens = root / TOKENS_FILE
    if not tokens.is_file():
        raise FileNotFoundError(f"{encoder_root} is not an encoder root: {TOKENS_FILE} is missing")
    return _load_encoder_root(str(root), tokens.stat().st_mtime_ns, device, dtype)


@functools.lru_cache(maxsize=4)
def _load_encoder_root(root: str, stamp: int, device: str, dtype: torch.dtype):
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(root)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype, local_files_only=True)
    text_encoder.to(device).eval().requires_grad_(False)
    return tokenizer, text_encoder
