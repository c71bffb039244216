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
import hashlib
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
    embeds_sha: str = ""

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
    spec = (model or ModelSpec()).resolved()
    base_tokenizer, base_encoder = load_base_text_encoder(spec)
    items = _items(embeds, tokens, class_names, class_keys)
    return _assemble(copy.deepcopy(base_tokenizer), copy.deepcopy(base_encoder).cpu(), {}, 0, items, spec,
                     Path(encoder_root))


def update_token_dictionary(
    encoder_root,
    embeds: Sequence,
    tokens: Sequence[str],
    class_names: Sequence[str],
    *,
    class_keys: Sequence[str],
    model: ModelSpec | None = None,
) -> Path:
    """Bring an encoder root up to date with these classes, incrementally.

    A class already in the root keeps its index and token ids, and its rows are replaced; a
    new class is appended (one resize for all new ones); a class not listed leaves
    `tokens.json` (its rows stay, inert, so no other id moves). Without an existing root, or
    with one of another base model, this builds a new root.
    """
    spec = (model or ModelSpec()).resolved()
    root = Path(encoder_root)
    items = _items(embeds, tokens, class_names, class_keys)
    meta = read_tokens(root) if (root / TOKENS_FILE).exists() else None
    if meta is None or meta.get("base_model") != spec.diffusion:
        if meta is not None:
            log.warning("encoder root %s was built on %s; rebuilding it on %s", root, meta.get("base_model"), spec.diffusion)
        order = {e["key"]: e["index"] for e in (meta or {}).get("classes", [])}
        items.sort(key=lambda it: (order.get(it[0], len(order)), it[0]))
        return create_token_dictionary([m for *_, m in items], [t for _, t, _, _ in items],
                                       [n for _, _, n, _ in items], root, model=spec,
                                       class_keys=[k for k, *_ in items])
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
    existing = {e["key"]: e for e in meta["classes"]}
    next_index = meta.get("next_index", max((e["index"] for e in meta["classes"]), default=-1) + 1)
    return _assemble(tokenizer, text_encoder, existing, next_index, items, spec, root)


def _items(embeds, tokens, class_names, class_keys) -> list[tuple[str, str, str, torch.Tensor]]:
    if not (len(embeds) == len(tokens) == len(class_names)):
        raise ValueError(
            f"embeds, tokens and class_names must have one entry per class; got {len(embeds)}, {len(tokens)}, {len(class_names)}"
        )
    keys = list(class_keys) if class_keys is not None else [class_key(n) for n in class_names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"class keys must be unique; got {keys}")
    return [(k, t, n, _as_matrix(e)) for k, t, n, e in zip(keys, tokens, class_names, embeds)]


def embeds_digest(matrix: torch.Tensor) -> str:
    """A short content hash of a token's vectors: tells whether a root holds a given token."""
    return hashlib.sha256(_as_matrix(matrix).contiguous().numpy().tobytes()).hexdigest()[:16]


def _assemble(tokenizer, text_encoder, existing: dict, next_index: int, items, spec, out: Path) -> Path:
    dim = text_encoder.get_input_embeddings().embedding_dim
    replaced, appended = [], []
    for key, tok, name, m in items:
        if m.shape[-1] != dim:
            raise ValueError(f"embedding for {tok} has dimension {m.shape[-1]}, but the text encoder expects {dim}")
        old = existing.get(key)
        if old is not None and old["token"] == tok and len(old["token_ids"]) == m.shape[0]:
            replaced.append((old["index"], key, tok, name, m, old["token_ids"]))
        else:
            appended.append((key, tok, name, m))
    new_names = [n for _, tok, _, m in appended for n in placeholder_tokens(tok, m.shape[0])]
    repeated = {t for t in new_names if new_names.count(t) > 1}
    if repeated:
        raise ValueError(f"tokens must be unique; repeated: {sorted(repeated)}")
    check_new_tokens(tokenizer, new_names)

    row = len(tokenizer)
    if new_names:
        tokenizer.add_tokens(new_names)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # one resize for all
    placed = list(replaced)
    for key, tok, name, m in appended:
        placed.append((next_index, key, tok, name, m, list(range(row, row + m.shape[0]))))
        next_index += 1
        row += m.shape[0]
    weight = text_encoder.get_input_embeddings().weight
    entries = []
    with torch.no_grad():
        for index, key, tok, name, m, ids in sorted(placed, key=lambda p: p[0]):
            weight[ids] = m.to(weight.dtype)
            entries.append({"index": index, "key": key, "name": name, "token": tok, "token_ids": list(ids),
                            "embeds_sha": embeds_digest(m)})

    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        (tmp / TOKENS_FILE).write_text(json.dumps({
            "family": spec.family, "base_model": spec.diffusion, "next_index": next_index, "classes": entries,
        }, indent=2) + "\n")
    log.info("encoder root %s: %d classes (%d appended, %d replaced)", out, len(entries), len(appended), len(replaced))
    return out


def read_tokens(encoder_root) -> dict:
    path = Path(encoder_root) / TOKENS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{encoder_root} is not an encoder root: {TOKENS_FILE} is missing")
    return json.loads(path.read_text())


def class_tokens(encoder_root) -> list[ClassToken]:
    return [ClassToken(e["index"], e["key"], e["name"], e["token"], tuple(e["token_ids"]), e.get("embeds_sha", ""))
            for e in read_tokens(encoder_root)["classes"]]


def resolve_class(encoder_root, c) -> ClassToken:
    """A class by index (int) or by key or display name (str)."""
    classes = class_tokens(encoder_root)
    if isinstance(c, int) or (isinstance(c, str) and c.isdigit()):
        i = int(c)
        for ct in classes:
            if ct.index == i:
                return ct
        raise IndexError(f"no class with index {i}: the encoder root has {len(classes)} classes "
                         f"(indices {', '.join(str(ct.index) for ct in classes[:20])})")
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
