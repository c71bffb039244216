"""Encoder roots in the paper's format (MadryLab/dataset-interfaces, `create_encoder`), both ways.

The paper's root:

    encoder_root/
      tokenizer/       CLIPTokenizer.save_pretrained, one token added per class
      text_encoder/    CLIPTextModel.save_pretrained, in float16
      tokens.pt        torch.save({'initializer_words': [name of class i], 'tokens': [token of class i]})

Class `i` is `tokens[i]`; `initializer_words[i]` is its name (the text the paper puts in the
prompt with `use_token=False`). The paper's `generate` puts `tokens[c]` alone into the prompt;
the other vectors of a multi-vector token (`<t>_1`, ...) are the tokenizer's, found by the
diffusers naming convention. The root does not name its base model: the paper's default is
`stabilityai/stable-diffusion-2`. `export_encoder_root` writes a `di_assets.json` beside the
paper's files with the base model and the class keys; the paper's code never reads it.

`tokens.pt` is read with `torch.load(weights_only=True)`: it must hold lists of strings only.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch

from .classes import class_key
from .encoder_root import (
    PAPER_TOKENS_FILE, TOKENS_FILE, class_tokens, embeds_digest, read_tokens, root_marker, write_root,
)
from .io import atomic_dir
from .models import ModelSpec, portable_base_model

log = logging.getLogger("di_assets")

SIDECAR = "di_assets.json"
PAPER_BASE_MODEL = "stabilityai/stable-diffusion-2"  # the paper's `model_name` default
FORMATS = ("paper", "di-assets")


def read_paper_tokens(encoder_root) -> tuple[list[str], list[str]]:
    """`(initializer_words, tokens)` of a paper root's `tokens.pt`, read without running pickled code."""
    path = Path(encoder_root) / PAPER_TOKENS_FILE
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable tokens.pt ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(obj, dict) or not {"initializer_words", "tokens"} <= set(obj):
        raise ValueError(f"{path} must hold a dict with 'initializer_words' and 'tokens' (the paper's format); "
                         f"got {type(obj).__name__} {sorted(obj) if isinstance(obj, dict) else ''}")
    words, tokens = list(obj["initializer_words"]), list(obj["tokens"])
    if len(words) != len(tokens) or not all(isinstance(x, str) for x in words + tokens):
        raise ValueError(f"{path}: 'initializer_words' and 'tokens' must be lists of strings of one length; "
                         f"got {len(words)} and {len(tokens)}")
    return words, tokens


def read_paper_root(encoder_root) -> dict:
    """A paper root described with `tokens.json`'s fields (index, key, name, token, token ids per class)."""
    root = Path(encoder_root).resolve()
    stamps = tuple(p.stat().st_mtime_ns if p.exists() else 0
                   for p in (root / PAPER_TOKENS_FILE, root / SIDECAR, root / "tokenizer"))
    return json.loads(_read_paper_root(str(root), stamps))  # a fresh copy for every caller


@functools.lru_cache(maxsize=8)
def _read_paper_root(root: str, stamps: tuple) -> str:
    from transformers import CLIPTokenizer

    root = Path(root)
    words, tokens = read_paper_tokens(root)
    side = json.loads((root / SIDECAR).read_text()) if (root / SIDECAR).is_file() else {}
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    added = tokenizer.get_added_vocab()
    keys = side.get("keys") if len(side.get("keys") or ()) == len(tokens) else _keys(words)
    classes = []
    for i, (word, tok) in enumerate(zip(words, tokens)):
        if tok not in added:
            raise ValueError(f"{root}: token {tok!r} of class {i} is not in the root's tokenizer")
        ids, j = [added[tok]], 1
        while f"{tok}_{j}" in added:  # diffusers' multi-vector convention, as the paper's pipeline expands it
            ids.append(added[f"{tok}_{j}"])
            j += 1
        classes.append({"index": i, "key": keys[i], "name": word, "token": tok, "token_ids": ids, "embeds_sha": ""})
    return json.dumps({"format": "paper", "family": side.get("family", "sd"),
                       "base_model": side.get("base_model", PAPER_BASE_MODEL), "next_index": len(tokens),
                       "classes": classes})


def _keys(words: list[str]) -> list[str]:
    """A key per class: its name's key, with `-i` where two classes share one."""
    def key(w, i):
        try:
            return class_key(w)
        except ValueError:
            return f"class-{i}"
    base = [key(w, i) for i, w in enumerate(words)]
    return [k if base.count(k) == 1 else f"{k}-{i}" for i, k in enumerate(base)]


def export_encoder_root(src_root, out_dir, format: str = "paper", *, model: ModelSpec | None = None) -> Path:
    """Write the encoder root `src_root` (either format) to `out_dir` in `format`.

    - `"paper"`: what the paper's `generate` reads: `tokenizer/` (save_pretrained, plus the
      vocab.json / merges.txt / added_tokens.json that older transformers' CLIPTokenizer reads),
      `text_encoder/` in float16, and `tokens.pt`, with class `i` at position `i` (a root whose
      indices have gaps, from removed classes, is renumbered in index order, with a warning).
      Beside them, `di_assets.json` keeps the base model and the class keys for di-assets.
    - `"di-assets"`: a di-assets root (`tokens.json`, text encoder in float32), e.g. to update a
      paper root's classes with `update_token_dictionary`.

    `model` names the base model to record where the source does not (a paper root without
    `di_assets.json` is taken to be on the paper's `stabilityai/stable-diffusion-2`).
    The output is written to a temporary folder and swapped in.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    if format not in FORMATS:
        raise ValueError(f"unknown encoder root format {format!r}; choose one of {', '.join(FORMATS)}")
    src, out = Path(src_root), Path(out_dir)
    root_marker(src)  # a clear error for a folder that is no root
    if out.resolve() == src.resolve():
        raise ValueError("export_encoder_root writes a new root; give an out_dir other than the source")
    meta = read_tokens(src)
    family, base_model = meta.get("family", "tiny"), meta.get("base_model")
    if model is not None:
        family, base_model = model.family, model.resolved().diffusion
    classes = sorted(class_tokens(src), key=lambda ct: ct.index)
    tokenizer = CLIPTokenizer.from_pretrained(src / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(src / "text_encoder", torch_dtype=torch.float32,
                                                 local_files_only=True)
    with atomic_dir(out) as tmp:
        if format == "paper":
            if [ct.index for ct in classes] != list(range(len(classes))):
                log.warning("%s has class indices %s; the paper's format numbers classes 0..%d, so they are "
                            "renumbered in index order", src, [ct.index for ct in classes][:20], len(classes) - 1)
            tokenizer.save_pretrained(tmp / "tokenizer")
            _write_legacy_tokenizer_files(tokenizer, tmp / "tokenizer")
            text_encoder.to(torch.float16).save_pretrained(tmp / "text_encoder")
            torch.save({"initializer_words": [ct.name for ct in classes], "tokens": [ct.token for ct in classes]},
                       tmp / PAPER_TOKENS_FILE)
            (tmp / SIDECAR).write_text(json.dumps({
                "format": "paper", "family": family, "base_model": portable_base_model(base_model),
                "keys": [ct.key for ct in classes],
            }, indent=2) + "\n")
        else:
            weight = text_encoder.get_input_embeddings().weight.detach()
            entries = [{"index": ct.index, "key": ct.key, "name": ct.name, "token": ct.token,
                        "token_ids": list(ct.token_ids), "embeds_sha": embeds_digest(weight[list(ct.token_ids)])}
                       for ct in classes]
            write_root(tmp, tokenizer, text_encoder, family=family, base_model=base_model,
                       next_index=meta.get("next_index", len(classes)), entries=entries)
    log.info("exported encoder root %s to %s (%s format, %d classes)", src, out, format, len(classes))
    return out


def _write_legacy_tokenizer_files(tokenizer, folder: Path) -> None:
    """The slow CLIPTokenizer's files (transformers 4.x, the paper's), beside `tokenizer.json`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend.model, "save"):
        return
    backend.model.save(str(folder))  # vocab.json and merges.txt of the BPE model
    vocab_size = len(json.loads((folder / "vocab.json").read_text()))
    added = {t: i for t, i in sorted(tokenizer.get_added_vocab().items(), key=lambda kv: kv[1]) if i >= vocab_size}
    (folder / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False) + "\n")
    special = {k: str(getattr(tokenizer, k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if getattr(tokenizer, k, None) is not None}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


__all__ = ["export_encoder_root", "read_paper_root", "read_paper_tokens", "PAPER_TOKENS_FILE", "TOKENS_FILE"]
