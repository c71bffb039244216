"""What makes the encoder root fast (issue 15 item 5) changes nothing in what it writes.

`create_token_dictionary` takes the base vocabulary size from the base tokenizer it has already
loaded (no second load of the base tokenizer), copies the shared tokenizer without copying its
merges list element by element (`copy_tokenizer`), and finds repeated tokens with a Counter.
The timing itself is in `benchmarks/bench_encoder_root.py`.
"""

import copy
import hashlib
from pathlib import Path

import pytest
import torch

from di_assets.ml import encoder_root as er
from di_assets.ml.models import load_base_text_encoder


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _classes(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    embeds = [torch.randn(3, 32, generator=g) if i % 7 == 0 else torch.randn(32, generator=g) for i in range(n)]
    return embeds, [f"<s{i}>" for i in range(n)], [f"s {i}" for i in range(n)]


def _as_before(embeds, tokens, names, out, spec):
    """The root as `create_token_dictionary` built it before: a plain deepcopy of the base tokenizer,
    and the base vocabulary size read from a separately loaded base tokenizer."""
    spec = spec.resolved()
    tok, enc = load_base_text_encoder(spec)
    return er._assemble(copy.deepcopy(tok), copy.deepcopy(enc).cpu(), {}, 0, er._items(embeds, tokens, names, None),
                        spec, Path(out))


def test_fast_root_is_byte_identical_and_loads_no_second_base_tokenizer(tiny, tmp_path, monkeypatch):
    embeds, tokens, names = _classes()
    before = _files(_as_before(embeds, tokens, names, tmp_path / "before", tiny))

    base_tok, _ = load_base_text_encoder(tiny)
    size, merges = len(base_tok), getattr(base_tok, "_merges", None)
    separate = []
    real = er._base_tokenizer
    monkeypatch.setattr(er, "_base_tokenizer", lambda d: separate.append(d) or real(d))
    root = er.create_token_dictionary(embeds, tokens, names, tmp_path / "after", model=tiny)
    assert separate == []  # the base vocabulary size came from the tokenizer already loaded
    assert _files(root) == before  # tokenizer.json, tokenizer_config.json, weights, tokens.json: every byte
    # the shared, cached base tokenizer is untouched
    assert len(base_tok) == size and "<s0>" not in base_tok.get_vocab()
    if merges is not None:
        assert base_tok._merges is merges and len(merges) > 1000


def test_copy_tokenizer_is_a_private_tokenizer(tiny):
    base_tok, _ = load_base_text_encoder(tiny)
    mine = er.copy_tokenizer(base_tok)
    assert mine is not base_tok and mine.backend_tokenizer is not base_tok.backend_tokenizer
    mine.add_tokens(["<only-mine>"])
    assert len(mine) == len(base_tok) + 1 and "<only-mine>" not in base_tok.get_vocab()
    text = "a photo of a cat in the snow"
    assert mine(text).input_ids == base_tok(text).input_ids


def test_update_with_retired_rows_is_byte_identical_to_a_deepcopy_rebuild(tiny, tmp_path, monkeypatch):
    """The update path rebuilds the tokenizer from a copy of the base one when rows are retired."""
    g = torch.Generator().manual_seed(9)
    a, b, c, d = (torch.randn(32, generator=g) for _ in range(4))
    a2 = torch.randn(2, 32, generator=g)
    runs = {}
    for label, copier in (("fast", er.copy_tokenizer), ("deepcopy", copy.deepcopy)):
        monkeypatch.setattr(er, "copy_tokenizer", copier)
        root = tmp_path / label
        er.update_token_dictionary(root, [a, b, c], ["<a>", "<b>", "<c>"], ["a", "b", "c"], class_keys=["a", "b", "c"],
                                   model=tiny)
        # c leaves (its row is retired), a grows to 2 vectors, d is new
        er.update_token_dictionary(root, [a2, b, d], ["<a>", "<b>", "<d>"], ["a", "b", "d"],
                                   class_keys=["a", "b", "d"], model=tiny)
        runs[label] = _files(root)
    assert runs["fast"] == runs["deepcopy"]


def test_repeated_tokens_found_across_vector_names(tiny, tmp_path):
    """`<a>` of 2 vectors expands to `<a>_1`, which another class may not take as its token."""
    with pytest.raises(ValueError, match=r"repeated: \['<a>_1'\]"):
        er.create_token_dictionary([torch.zeros(2, 32), torch.zeros(32)], ["<a>", "<a>_1"], ["x", "y"],
                                   tmp_path / "r", model=tiny)
    assert not (tmp_path / "r").exists()
