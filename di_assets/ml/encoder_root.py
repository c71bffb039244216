"""The encoder root: one tokenizer + text encoder that holds every class token.

Layout (what `generate` reads):

    encoder_root/
      tokenizer/       CLIPTokenizer.save_pretrained, with the class tokens added
      text_encoder/    CLIPTextModel.save_pretrained, embeddings resized once
      tokens.json      base model, and per class: index, key, name, token, token ids

`tokens.json` names the base model portably (a Hub id, a user's folder as given, or a marker
such as `di-assets:tiny` for the embedded models), so a root can move to another machine.
`generate` also reads roots in the paper's format (`tokens.pt`; see `paper_format`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import numbers
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .classes import class_key
from .io import atomic_dir
from .models import ModelSpec, _is_local, load_base_text_encoder, portable_base_model
from .textual_inversion import TextualInversionResult, check_new_tokens, placeholder_tokens

log = logging.getLogger("di_assets")

TOKENS_FILE = "tokens.json"
PAPER_TOKENS_FILE = "tokens.pt"  # the paper's root (MadryLab/dataset-interfaces `create_encoder`)
RETIRED = "<di-retired|{}>"  # a row no class uses any more; "|" is in no class key, so no class can clash


@dataclass(frozen=True)
class ClassToken:
    index: int
    key: str
    name: str
    token: str
    token_ids: tuple[int, ...]
    embeds_sha: str = ""
    source: object = field(default=None, compare=False)  # what the caller said the vectors came from

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
    sources: Sequence | None = None,
) -> Path:
    """Add every class token to the base tokenizer and text encoder, with a single resize.

    `embeds[i]` is a learned embedding (a tensor of shape (dim,) or (num_vectors, dim), or a
    `TextualInversionResult`) for `tokens[i]`; class `i` keeps index `i` in `tokens.json`.
    The root is written to a temporary folder and swapped in, so it is never half-written.
    `sources`: as for `update_token_dictionary`.
    """
    spec = (model or ModelSpec()).resolved()
    base_tokenizer, base_encoder = load_base_text_encoder(spec)
    items = _items(embeds, tokens, class_names, class_keys, sources)
    # The base tokenizer is already loaded: it also tells where the added rows begin (no second load).
    return _assemble(copy_tokenizer(base_tokenizer), copy.deepcopy(base_encoder).cpu(), {}, 0, items, spec,
                     Path(encoder_root), base_vocab=len(base_tokenizer))


def update_token_dictionary(
    encoder_root,
    embeds: Sequence,
    tokens: Sequence[str],
    class_names: Sequence[str],
    *,
    class_keys: Sequence[str],
    model: ModelSpec | None = None,
    keep: Sequence[str] = (),
    sources: Sequence | None = None,
) -> Path:
    """Bring an encoder root up to date with these classes, incrementally.

    A class already in the root keeps its index and token ids, and its rows are replaced; a
    new class is appended (one resize for all new ones); a class not listed leaves
    `tokens.json`, and its rows stay (so no other id moves) but are retired: renamed in the
    tokenizer, so its token is free again. A class that comes back, or a new class that takes a
    removed class's token, is appended like any new class, with a new index (indices and rows
    are never reused). A class whose token now has another number of vectors keeps its index
    and its first ids: extra vectors get new rows at the end, and rows it no longer uses are
    retired too (so `<t>_1` no longer expands). Any other added row that no class owns, such as
    one a removed class left under its name in a root written by an older version, is retired
    the same way. Without an existing root, or with one of another base model, this builds a
    new root.

    `keep` names classes the root holds whose token has not changed: no vectors are passed for them,
    and their rows, ids and `tokens.json` entry stay as they are (at 1,000 classes a caller then reads
    and passes only the tokens that changed). `sources` gives, per class passed, what its vectors were
    read from (any JSON value, such as a token file's signature): `tokens.json` keeps it as the entry's
    `source`, for the caller to tell next time which classes it may keep. When every class of the root
    is kept or replaced with the same token and number of vectors, the tokenizer is copied as it is
    (neither it nor the base tokenizer is loaded).
    """
    spec = (model or ModelSpec()).resolved()
    root = Path(encoder_root)
    items = _items(embeds, tokens, class_names, class_keys, sources)
    meta = read_tokens(root) if (root / TOKENS_FILE).exists() else None
    rebuild = meta is None or portable_base_model(meta.get("base_model")) != portable_base_model(spec.diffusion)
    if keep and rebuild:
        raise ValueError(f"cannot keep classes {sorted(keep)[:10]} of {root}: it holds no root on "
                         f"{spec.diffusion}; pass their vectors")
    if meta is None and (root / PAPER_TOKENS_FILE).exists():
        raise ValueError(f"{root} is an encoder root in the paper's format; convert it first with "
                         f"export_encoder_root({str(root)!r}, out_dir, format='di-assets'), or choose another folder")
    if rebuild:
        if meta is not None:
            log.warning("encoder root %s was built on %s; rebuilding it on %s", root, meta.get("base_model"), spec.diffusion)
        order = {e["key"]: e["index"] for e in (meta or {}).get("classes", [])}
        items.sort(key=lambda it: (order.get(it[0], len(order)), it[0]))
        return create_token_dictionary([it[3] for it in items], [it[1] for it in items], [it[2] for it in items],
                                       root, model=spec, class_keys=[it[0] for it in items],
                                       sources=[it[4] for it in items])
    from transformers import CLIPTextModel, CLIPTokenizer

    existing = {e["key"]: e for e in meta["classes"]}
    unknown = sorted(set(keep) - existing.keys())
    if unknown:
        raise ValueError(f"cannot keep classes {unknown[:10]}: {root} does not hold them; pass their vectors")
    kept = [existing[k] for k in dict.fromkeys(keep)]
    both = sorted(set(keep) & {k for k, *_ in items})
    if both:
        raise ValueError(f"classes {both[:10]} are both kept and given vectors; give each once")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
    next_index = meta.get("next_index", max((e["index"] for e in meta["classes"]), default=-1) + 1)
    # The tokenizer is unchanged when every class stays, with its token and number of vectors, in a root
    # that this version wrote (it records `base_vocab`, and its writes leave no row that no class owns).
    same = (meta.get("base_vocab") is not None and {k for k, *_ in items} | set(keep) == existing.keys()
            and all(existing[k]["token"] == t and len(existing[k]["token_ids"]) == m.shape[0] for k, t, _, m, _ in items))
    tokenizer = root / "tokenizer" if same else CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    return _assemble(tokenizer, text_encoder, existing, next_index, items, spec, root, meta.get("base_vocab"), kept)


def _items(embeds, tokens, class_names, class_keys, sources=None) -> list[tuple[str, str, str, torch.Tensor, object]]:
    """(key, token, name, vectors, source) per class."""
    if not (len(embeds) == len(tokens) == len(class_names)):
        raise ValueError(
            f"embeds, tokens and class_names must have one entry per class; got {len(embeds)}, {len(tokens)}, {len(class_names)}"
        )
    if sources is not None and len(sources) != len(embeds):
        raise ValueError(f"sources must have one entry per class; got {len(sources)} for {len(embeds)} classes")
    keys = list(class_keys) if class_keys is not None else [class_key(n) for n in class_names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"class keys must be unique; got {keys}")
    return [(k, t, n, _as_matrix(e), src) for k, t, n, e, src
            in zip(keys, tokens, class_names, embeds, sources if sources is not None else [None] * len(keys))]


def embeds_digest(matrix: torch.Tensor) -> str:
    """A short content hash of a token's vectors: tells whether a root holds a given token."""
    return hashlib.sha256(_as_matrix(matrix).contiguous().numpy().tobytes()).hexdigest()[:16]


def copy_tokenizer(tokenizer):
    """A private copy of a (shared, cached) tokenizer, to add tokens to.

    `copy.deepcopy`, except that the BPE merges list (48,894 pairs of str, which nothing ever
    changes: added tokens live in the Rust backend) is shared, not copied element by element.
    """
    merges = getattr(tokenizer, "_merges", None)
    return copy.deepcopy(tokenizer, {} if merges is None else {id(merges): merges})


def _assemble(tokenizer, text_encoder, existing: dict, next_index: int, items, spec, out: Path,
              base_vocab: int | None = None, kept: Sequence[dict] = ()) -> Path:
    """`base_vocab`: the base tokenizer's size, where the added rows begin (None: read it from the base
    model). `kept`: the entries of classes that stay as they are. `tokenizer` may be the root's own
    tokenizer folder, when no class is added, removed or given another token or number of vectors."""
    dim = text_encoder.get_input_embeddings().embedding_dim
    # replaced: (index, key, token, name, vectors, source, kept ids, names of the extra vectors)
    replaced, appended = [], []
    owned: dict[int, str] = {}  # every row a class keeps, under the name its prompts expand to
    for e in kept:
        owned.update(zip(e["token_ids"], placeholder_tokens(e["token"], len(e["token_ids"]))))
    for key, tok, name, m, src in items:
        if m.shape[-1] != dim:
            raise ValueError(f"embedding for {tok} has dimension {m.shape[-1]}, but the text encoder expects {dim}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"class {name!r} ({key}): token {tok} holds non-finite values (nan/inf); "
                             f"retrain it (class_token) with a lower learning rate before building the encoder root")
        old = existing.get(key)
        if old is not None and old["token"] == tok:
            ids, k = list(old["token_ids"]), m.shape[0]
            names = placeholder_tokens(tok, k)
            owned.update(zip(ids[:k], names))  # fewer vectors than before: the surplus rows go out of use
            replaced.append((old["index"], key, tok, name, m, src, ids[:k], names[len(ids):]))
        else:
            appended.append((key, tok, name, m, src))
    if base_vocab is None:
        base_vocab = len(_base_tokenizer(spec.diffusion))
    retired = []
    if not isinstance(tokenizer, Path):
        # Every other added row (a removed class's, a renamed token's, surplus vectors, or an orphan left
        # by an older version) is retired, so that its token is free for a class that comes (back) later.
        tokenizer, retired = _retire_unowned(tokenizer, owned, spec, base_vocab)
        grown = [n for *_, extra in replaced for n in extra]
        new_names = grown + [n for _, tok, _, m, _ in appended for n in placeholder_tokens(tok, m.shape[0])]
        repeated = {t for t, k in Counter(new_names).items() if k > 1}
        if repeated:
            raise ValueError(f"tokens must be unique; repeated: {sorted(repeated)}")
        check_new_tokens(tokenizer, new_names)
        row = len(tokenizer)
        if new_names:
            tokenizer.add_tokens(new_names)
            if tokenizer.convert_tokens_to_ids(new_names) != list(range(row, row + len(new_names))):
                raise RuntimeError("the tokenizer did not append the new tokens at the end of its vocabulary")
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # one resize for all
    else:  # the root's own tokenizer, copied as it is: no row is added
        if appended or any(extra for *_, extra in replaced):
            raise RuntimeError("an encoder root update that adds tokens needs the root's tokenizer loaded")
        row = text_encoder.get_input_embeddings().num_embeddings
    placed = []
    for index, key, tok, name, m, src, ids, extra in replaced:
        placed.append((index, key, tok, name, m, src, ids + list(range(row, row + len(extra)))))
        row += len(extra)
    for key, tok, name, m, src in appended:
        placed.append((next_index, key, tok, name, m, src, list(range(row, row + m.shape[0]))))
        next_index += 1
        row += m.shape[0]
    weight = text_encoder.get_input_embeddings().weight
    entries = list(kept)
    with torch.no_grad():
        for index, key, tok, name, m, src, ids in placed:
            weight[ids] = m.to(weight.dtype)
            entries.append({"index": index, "key": key, "name": name, "token": tok, "token_ids": list(ids),
                            "embeds_sha": embeds_digest(m), **({"source": src} if src is not None else {})})
    entries.sort(key=lambda e: e["index"])

    with atomic_dir(out) as tmp:
        write_root(tmp, tokenizer, text_encoder, family=spec.family, base_model=spec.diffusion,
                   next_index=next_index, entries=entries, base_vocab=base_vocab)
    log.info("encoder root %s: %d classes (%d appended, %d replaced, %d kept, %d rows retired)", out, len(entries),
             len(appended), len(replaced), len(kept), len(retired))
    return out


def write_root(folder: Path, tokenizer, text_encoder, *, family: str, base_model: str, next_index: int,
               entries: list[dict], base_vocab: int | None = None) -> None:
    """Write a di-assets root's files into `folder` (the caller makes it atomic). `tokenizer` may be a
    saved tokenizer's folder, copied as it is. `base_vocab`, the base tokenizer's size, tells a later
    update where the added rows begin without loading the base tokenizer."""
    if isinstance(tokenizer, Path):
        shutil.copytree(tokenizer, folder / "tokenizer")
    else:
        tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    (folder / TOKENS_FILE).write_text(json.dumps({
        "family": family, "base_model": portable_base_model(base_model), "next_index": next_index,
        **({"base_vocab": base_vocab} if base_vocab is not None else {}), "classes": entries,
    }, indent=2) + "\n")


def _retire_unowned(tokenizer, owned: dict[int, str], spec: ModelSpec, base_vocab: int):
    """The tokenizer (every id unchanged) with each added row that no class owns renamed out of use.

    `owned` maps the rows that classes keep to their names. Returns the tokenizer and the ids
    newly retired. A tokenizer cannot drop or rename an added token, so when a name changes it
    is rebuilt: the base tokenizer, then every added row in id order, a retired one under a name
    no prompt holds (`RETIRED`). Rows are never removed or reused: no other class's ids move.
    `base_vocab` is the base tokenizer's size (the base tokenizer is loaded only if a name changes).
    """
    ids = list(range(base_vocab, len(tokenizer)))
    stray = sorted(i for i in owned if not base_vocab <= i < len(tokenizer))
    if stray:
        raise RuntimeError(f"tokens.json names token ids {stray[:10]} that are not added rows of the root's "
                           "tokenizer; rebuild the root")
    current = tokenizer.convert_ids_to_tokens(ids)
    names = [owned.get(i, RETIRED.format(i)) for i in ids]
    if names == current:
        return tokenizer, []
    fresh = copy_tokenizer(_base_tokenizer(spec.diffusion))
    fresh.add_tokens(names)
    if len(fresh) != len(tokenizer) or fresh.convert_tokens_to_ids(names) != ids:
        raise RuntimeError("could not rebuild the encoder root's tokenizer with the same ids; rebuild the root")
    return fresh, [i for i, was, now in zip(ids, current, names) if was != now and i not in owned]


@functools.lru_cache(maxsize=4)
def _base_tokenizer(diffusion: str):
    """The base model's tokenizer alone (shared: copy it before adding tokens)."""
    from transformers import CLIPTokenizer

    kw = {"local_files_only": True} if _is_local(diffusion) else {}
    return CLIPTokenizer.from_pretrained(diffusion, subfolder="tokenizer", **kw)


def root_marker(encoder_root) -> Path:
    """The file that makes a folder an encoder root: `tokens.json`, or the paper's `tokens.pt`."""
    root = Path(encoder_root)
    for name in (TOKENS_FILE, PAPER_TOKENS_FILE):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{encoder_root} is not an encoder root: {TOKENS_FILE} (or the paper's "
                            f"{PAPER_TOKENS_FILE}) is missing")


def read_tokens(encoder_root) -> dict:
    """`tokens.json` of a root; for a root in the paper's format, the same fields read from it."""
    return copy.deepcopy(_parsed_tokens(*_marker_version(encoder_root)))


def _marker_version(encoder_root) -> tuple[str, int, int]:
    marker = root_marker(encoder_root)
    st = marker.stat()  # the root is replaced atomically: a new version is a new inode
    return str(marker.resolve()), st.st_ino, st.st_mtime_ns


# Parsed and indexed once per version of the file (path, inode, modification time): a run over many
# classes looks a class up once per partition, and must not re-read an N-class index each time.
@functools.lru_cache(maxsize=8)
def _parsed_tokens(marker: str, inode: int, mtime_ns: int) -> dict:
    path = Path(marker)
    if path.name == PAPER_TOKENS_FILE:
        from .paper_format import read_paper_root

        return read_paper_root(path.parent)
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=8)
def _class_index(marker: str, inode: int, mtime_ns: int) -> tuple[tuple[ClassToken, ...], dict]:
    """The root's classes, and a lookup by index, and by key, else name, else token."""
    classes = tuple(ClassToken(e["index"], e["key"], e["name"], e["token"], tuple(e["token_ids"]),
                               e.get("embeds_sha", ""), e.get("source"))
                    for e in _parsed_tokens(marker, inode, mtime_ns)["classes"])
    lookup: dict = {}
    for attr in ("token", "name", "key"):  # later fields win; within one, the first class wins
        lookup.update({(0, getattr(ct, attr)): ct for ct in reversed(classes)})
    lookup.update({(1, ct.index): ct for ct in reversed(classes)})
    return classes, lookup


def root_base_model(encoder_root) -> str | None:
    """The base model a root was built on (its portable name), or None where the folder holds no root."""
    try:
        return portable_base_model(_parsed_tokens(*_marker_version(encoder_root)).get("base_model"))
    except FileNotFoundError:
        return None


def class_tokens(encoder_root) -> list[ClassToken]:
    return list(_class_index(*_marker_version(encoder_root))[0])


def resolve_class(encoder_root, c) -> ClassToken:
    """A class by index (an int) or by key, else display name, else token (a str).

    A str is never read as an index: class folders named `0`, `1`, ... `11` have those keys,
    and their indices follow another order.
    """
    classes, lookup = _class_index(*_marker_version(encoder_root))
    if isinstance(c, numbers.Integral) and not isinstance(c, bool):
        i = int(c)
        if (1, i) in lookup:
            return lookup[(1, i)]
        raise IndexError(f"no class with index {i}: the encoder root has {len(classes)} classes "
                         f"(indices {', '.join(str(ct.index) for ct in classes[:20])})")
    if not isinstance(c, str):
        raise TypeError(f"a class is an index (int) or a key, name or token (str); got {type(c).__name__} {c!r}")
    if (0, c) in lookup:
        return lookup[(0, c)]
    hint = "; a str is a key, not an index: pass int(...) for an index" if c.strip().isdigit() else ""
    raise KeyError(f"no class {c!r} in {encoder_root}; known keys: {', '.join(ct.key for ct in classes[:20])}{hint}")


def load_encoder_root(encoder_root, device: str, dtype: torch.dtype):
    """Tokenizer and text encoder of an encoder root, loaded once per process (until it is rebuilt)."""
    root = Path(encoder_root).resolve()
    return _load_encoder_root(str(root), root_marker(root).stat().st_mtime_ns, device, dtype)


@functools.lru_cache(maxsize=4)
def _load_encoder_root(root: str, stamp: int, device: str, dtype: torch.dtype):
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(root)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype, local_files_only=True)
    text_encoder.to(device).eval().requires_grad_(False)
    return tokenizer, text_encoder
