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


def _entries(root: Path) -> dict:
    """tokens.json's classes by key, without the callers' `source`."""
    import json

    return {e["key"]: {k: v for k, v in e.items() if k != "source"}
            for e in json.loads((root / er.TOKENS_FILE).read_text())["classes"]}


def test_an_update_that_keeps_classes_reads_no_tokenizer_and_writes_the_same_root(tiny, tmp_path, monkeypatch):
    """Kept classes pass no vectors; with no class added, removed or re-tokenized, the tokenizer is copied
    byte for byte (neither it nor the base tokenizer is loaded), and the root equals a full update's."""
    from transformers import CLIPTokenizer

    g = torch.Generator().manual_seed(3)
    a, b, c, a2 = torch.randn(32, generator=g), torch.randn(2, 32, generator=g), torch.randn(32, generator=g), \
        torch.randn(32, generator=g)
    keys, tokens = ["a", "b", "c"], ["<a>", "<b>", "<c>"]
    for label in ("full", "kept"):
        er.update_token_dictionary(tmp_path / label, [a, b, c], tokens, keys, class_keys=keys, model=tiny,
                                   sources=[["a", 1], ["b", 1], ["c", 1]])
    tokenizer_before = _files(tmp_path / "kept" / "tokenizer")
    er.update_token_dictionary(tmp_path / "full", [a2, b, c], tokens, keys, class_keys=keys, model=tiny)

    loads = []
    real_load, real_base = CLIPTokenizer.from_pretrained.__func__, er._base_tokenizer
    monkeypatch.setattr(CLIPTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real_load(cls, *a, **k)))
    monkeypatch.setattr(er, "_base_tokenizer", lambda d: loads.append(d) or real_base(d))
    er.update_token_dictionary(tmp_path / "kept", [a2], ["<a>"], ["a"], class_keys=["a"], model=tiny,
                               keep=["b", "c"], sources=[["a", 2]])
    assert loads == []
    assert _files(tmp_path / "kept" / "tokenizer") == tokenizer_before
    assert _files(tmp_path / "kept" / "text_encoder") == _files(tmp_path / "full" / "text_encoder")
    assert _entries(tmp_path / "kept") == _entries(tmp_path / "full")
    assert {ct.key: ct.source for ct in er.class_tokens(tmp_path / "kept")} == {"a": ["a", 2], "b": ["b", 1],
                                                                                "c": ["c", 1]}
    assert er.read_tokens(tmp_path / "kept")["base_vocab"] == len(real_base(tiny.resolved().diffusion))

    # a new class needs the tokenizer: it is loaded, and the kept classes keep their ids
    d = torch.randn(32, generator=g)
    er.update_token_dictionary(tmp_path / "kept", [d], ["<d>"], ["d"], class_keys=["d"], model=tiny,
                               keep=["a", "b", "c"])
    assert len(loads) == 1
    after = _entries(tmp_path / "kept")
    assert {k: after[k] for k in keys} == _entries(tmp_path / "full") and after["d"]["index"] == 3


def test_keep_refuses_what_it_cannot_keep(tiny, tmp_path):
    a = torch.zeros(32)
    with pytest.raises(ValueError, match="cannot keep classes \\['a'\\] of .*: it holds no root"):
        er.update_token_dictionary(tmp_path / "r", [], [], [], class_keys=[], model=tiny, keep=["a"])
    er.update_token_dictionary(tmp_path / "r", [a], ["<a>"], ["a"], class_keys=["a"], model=tiny)
    with pytest.raises(ValueError, match="cannot keep classes \\['zz'\\]: .* does not hold them"):
        er.update_token_dictionary(tmp_path / "r", [], [], [], class_keys=[], model=tiny, keep=["a", "zz"])
    with pytest.raises(ValueError, match="classes \\['a'\\] are both kept and given vectors"):
        er.update_token_dictionary(tmp_path / "r", [a], ["<a>"], ["a"], class_keys=["a"], model=tiny, keep=["a"])
    with pytest.raises(ValueError, match="sources must have one entry per class"):
        er.update_token_dictionary(tmp_path / "r", [a], ["<a>"], ["a"], class_keys=["a"], model=tiny, sources=[])


def test_a_root_of_an_older_version_is_updated_with_its_tokenizer_loaded(tiny, tmp_path):
    """A root without `base_vocab` may hold rows no class owns: the update loads its tokenizer, retires
    them, and records `base_vocab`."""
    import json

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    root = er.update_token_dictionary(tmp_path / "r", [a, b], ["<a>", "<b>"], ["a", "b"], class_keys=["a", "b"],
                                      model=tiny)
    meta = json.loads((root / er.TOKENS_FILE).read_text())
    del meta["base_vocab"]
    meta["classes"] = [e for e in meta["classes"] if e["key"] == "a"]  # b's rows stay in the tokenizer: an orphan
    (root / er.TOKENS_FILE).write_text(json.dumps(meta))
    er.update_token_dictionary(root, [a], ["<a>"], ["a"], class_keys=["a"], model=tiny)
    from transformers import CLIPTokenizer

    base = len(er._base_tokenizer(tiny.resolved().diffusion))
    vocab = CLIPTokenizer.from_pretrained(root / "tokenizer").get_vocab()
    assert "<b>" not in vocab and vocab[er.RETIRED.format(base + 1)] == base + 1
    assert er.read_tokens(root)["base_vocab"] == base
