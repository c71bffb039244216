import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from di_assets.ml.encoder_root import class_tokens, create_token_dictionary, embeds_digest, resolve_class
from di_assets.ml.imagenet_star import import_imagenet_star
from di_assets.ml.models import load_base_text_encoder


class Payload:
    """Stands for a pickle that would run code on load."""


def _load(root):
    return CLIPTokenizer.from_pretrained(root / "tokenizer"), CLIPTextModel.from_pretrained(root / "text_encoder")


def test_thousand_tokens_with_a_single_resize(tiny, tmp_path, monkeypatch):
    resizes = []
    original = CLIPTextModel.resize_token_embeddings

    def counting(self, *a, **k):
        resizes.append(a)
        return original(self, *a, **k)

    monkeypatch.setattr(CLIPTextModel, "resize_token_embeddings", counting)
    n = 1000
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(32, generator=g) for _ in range(n)]
    tokens = [f"<class-{i}>" for i in range(n)]
    names = [f"class {i}" for i in range(n)]
    root = create_token_dictionary(embeds, tokens, names, tmp_path / "root", model=tiny)
    assert len(resizes) == 1

    base_tok, base_enc = load_base_text_encoder(tiny)
    tok, enc = _load(root)
    assert len(tok) == len(base_tok) + n
    meta = json.loads((root / "tokens.json").read_text())
    assert [c["index"] for c in meta["classes"]] == list(range(n))
    weight = enc.get_input_embeddings().weight
    for i in (0, 499, 999):
        tid = tok.convert_tokens_to_ids(tokens[i])
        assert meta["classes"][i]["token_ids"] == [tid]
        assert torch.allclose(weight[tid], embeds[i])
    # Only the new rows differ from the base model.
    assert torch.equal(weight[: len(base_tok)], base_enc.get_input_embeddings().weight)
    # The new tokens tokenize as one id each inside a prompt.
    ids = tok("a photo of a <class-7> in the grass").input_ids
    assert tok.convert_tokens_to_ids("<class-7>") in ids


def test_classes_resolve_by_index_key_and_name(tiny, tmp_path):
    root = create_token_dictionary([torch.zeros(32), torch.ones(2, 32)], ["<a>", "<b>"], ["hot dog", "cat"],
                                   tmp_path / "r", model=tiny)
    assert resolve_class(root, 0).key == "hot_dog"
    assert resolve_class(root, "hot dog").index == 0
    b = resolve_class(root, "cat")
    assert b.prompt_text == "<b> <b>_1" and len(b.token_ids) == 2
    assert [c.index for c in class_tokens(root)] == [0, 1]
    with pytest.raises(IndexError, match="has 2 classes"):
        resolve_class(root, 5)
    with pytest.raises(KeyError, match="no class"):
        resolve_class(root, "zebra")


@pytest.mark.parametrize("tokens, match", [(["<a>", "<a>"], "unique"), (["<a>", "photo"], "already exists")])
def test_bad_tokens_are_refused_and_nothing_is_written(tiny, tmp_path, tokens, match):
    with pytest.raises(ValueError, match=match):
        create_token_dictionary([torch.zeros(32)] * 2, tokens, ["x", "y"], tmp_path / "r", model=tiny)
    assert not (tmp_path / "r").exists()


def test_wrong_dimension_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="dimension 1024"):
        create_token_dictionary([torch.zeros(1024)], ["<a>"], ["x"], tmp_path / "r", model=tiny)


def test_import_imagenet_star_tokens(tiny, tmp_path):
    src = tmp_path / "tokens"
    src.mkdir()
    g = torch.Generator().manual_seed(1)
    e0, e1, e2 = (torch.randn(32, generator=g) for _ in range(3))
    torch.save(e0, src / "0.bin")  # a bare tensor
    torch.save({"<goldfish>": e1.unsqueeze(0)}, src / "1.bin")  # diffusers learned_embeds.bin
    torch.save({"placeholder": ("<shark>", e2)}, src / "2.bin")  # the paper's checkpoint layout
    names = tmp_path / "names.txt"
    names.write_text("tench\ngoldfish\ngreat white shark\n")

    from di_assets.cli import main

    assert main(["import-imagenet-star", str(src), str(tmp_path / "root"), "--class-names", str(names),
                 "--family", "tiny"]) == 0
    root = tmp_path / "root"
    classes = class_tokens(root)
    assert [(c.index, c.key, c.token) for c in classes] == [
        (0, "tench-0", "<tench-0>"), (1, "goldfish-1", "<goldfish>"), (2, "great_white_shark-2", "<shark>")]
    _, enc = _load(root)
    w = enc.get_input_embeddings().weight
    for c, e in zip(classes, (e0, e1, e2)):
        assert torch.allclose(w[c.token_ids[0]], e)


def test_import_refuses_pickled_code_and_gaps(tiny, tmp_path):
    src = tmp_path / "tokens"
    src.mkdir()
    torch.save(torch.zeros(32), src / "0.bin")
    torch.save(torch.zeros(32), src / "2.bin")
    with pytest.raises(ValueError, match=r"lacks \[1\]"):
        import_imagenet_star(src, tmp_path / "r", model=tiny)
    torch.save({"<x>": Payload()}, src / "1.bin")  # an arbitrary object: refused under weights_only
    with pytest.raises(ValueError, match="1.bin is not a readable token file"):
        import_imagenet_star(src, tmp_path / "r", model=tiny)
    assert not (tmp_path / "r").exists()


def test_incremental_update_keeps_indices_and_other_rows(tiny, tmp_path):
    from di_assets.ml.encoder_root import update_token_dictionary

    g = torch.Generator().manual_seed(2)
    a, b, c, b2, d = (torch.randn(32, generator=g) for _ in range(5))
    root = tmp_path / "root"
    update_token_dictionary(root, [a, b, c], ["<a>", "<b>", "<c>"], ["a", "b", "c"], class_keys=["a", "b", "c"],
                            model=tiny)
    tok0, enc0 = _load(root)
    w0 = enc0.get_input_embeddings().weight.detach().clone()
    # b changed, d is new, c left: one resize, b's row replaced, d appended, a untouched.
    update_token_dictionary(root, [a, b2, d], ["<a>", "<b>", "<d>"], ["a", "b", "d"], class_keys=["a", "b", "d"],
                            model=tiny)
    tok1, enc1 = _load(root)
    w1 = enc1.get_input_embeddings().weight
    assert len(tok1) == len(tok0) + 1 and w1.shape[0] == w0.shape[0] + 1
    by_key = {ct.key: ct for ct in class_tokens(root)}
    assert {k: ct.index for k, ct in by_key.items()} == {"a": 0, "b": 1, "d": 3}  # c's index is not reused
    assert torch.allclose(w1[by_key["b"].token_ids[0]], b2)
    assert torch.allclose(w1[by_key["d"].token_ids[0]], d)
    changed = (w1[: w0.shape[0]] != w0).any(dim=1).nonzero().flatten().tolist()
    assert changed == [by_key["b"].token_ids[0]]  # only b's row moved
    assert resolve_class(root, 3).key == "d"
    with pytest.raises(IndexError, match="no class with index 2"):
        resolve_class(root, 2)


def _flat_strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _flat_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _flat_strings(v)


def test_numbered_class_folders_resolve_by_key_not_index(tiny, tmp_path):
    """Keys "0".."11" sort as strings, so key "2" is not index 2; a str is a key, an int an index."""
    from di_assets.ml.encoder_root import update_token_dictionary
    from di_assets.ml.generate import GenerationConfig, generate_samples

    keys = [str(i) for i in range(12)]
    g = torch.Generator().manual_seed(3)
    root = update_token_dictionary(tmp_path / "root", [torch.randn(32, generator=g) for _ in keys],
                                   [f"<{k}>" for k in keys], keys, class_keys=keys, model=tiny)
    by_index = {ct.index: ct for ct in class_tokens(root)}
    assert by_index[2].key != "2"  # the situation of the issue
    assert resolve_class(root, "2").key == "2" and resolve_class(root, "2").token == "<2>"
    assert resolve_class(root, 2).key == by_index[2].key
    assert resolve_class(root, np.int64(2)).key == by_index[2].key  # a numpy index is an index too
    cfg = GenerationConfig.for_family("tiny", num_inference_steps=1)
    s = generate_samples(root, "2", "a photo of a <TOKEN>", seeds=[0], config=cfg, model=tiny)
    assert s[0].text == "a photo of a <2>"
    with pytest.raises(KeyError, match="not an index"):
        resolve_class(root, "12")  # no such key; never read as index 12
    with pytest.raises(IndexError):
        resolve_class(root, 12)


def test_changing_num_vectors_rebuilds_that_class_only(tiny, tmp_path):
    from di_assets.ml.encoder_root import embeds_digest, update_token_dictionary
    from di_assets.ml.generate import generate

    g = torch.Generator().manual_seed(4)
    a, b, a2 = torch.randn(32, generator=g), torch.randn(32, generator=g), torch.randn(2, 32, generator=g)
    root = tmp_path / "root"
    kw = dict(class_keys=["a", "b"], model=tiny)
    update_token_dictionary(root, [a, b], ["<a>", "<b>"], ["a", "b"], **kw)
    before = {ct.key: ct for ct in class_tokens(root)}
    _, enc0 = _load(root)
    w0 = enc0.get_input_embeddings().weight.detach().clone()

    update_token_dictionary(root, [a2, b], ["<a>", "<b>"], ["a", "b"], **kw)  # a: 1 vector -> 2
    after = {ct.key: ct for ct in class_tokens(root)}
    assert after["b"] == before["b"]  # index, token ids, digest
    assert after["a"].index == before["a"].index and len(after["a"].token_ids) == 2
    assert after["a"].token_ids[0] == before["a"].token_ids[0]
    tok1, enc1 = _load(root)
    w1 = enc1.get_input_embeddings().weight
    assert tok1.convert_tokens_to_ids(["<a>", "<a>_1"]) == list(after["a"].token_ids)
    assert torch.allclose(w1[list(after["a"].token_ids)], a2)
    assert torch.equal(w1[before["b"].token_ids[0]], w0[before["b"].token_ids[0]])
    meta = json.loads((root / "tokens.json").read_text())
    entry = {e["key"]: e for e in meta["classes"]}
    assert entry["a"]["token_ids"] == list(after["a"].token_ids) and entry["a"]["embeds_sha"] == embeds_digest(a2)
    assert entry["b"]["token_ids"] == list(before["b"].token_ids) and entry["b"]["index"] == before["b"].index
    assert len(generate(root, "a", "a photo of a <TOKEN>", num_samples=1, random_seed=0, model=tiny,
                        num_inference_steps=1)) == 1

    update_token_dictionary(root, [a, b], ["<a>", "<b>"], ["a", "b"], **kw)  # and back to 1 vector
    back = {ct.key: ct for ct in class_tokens(root)}
    assert back["a"].token_ids == before["a"].token_ids and back["b"] == before["b"]
    tok2, enc2 = _load(root)
    assert "<a>_1" not in tok2.get_vocab()  # retired: no pipeline expands <a> to two vectors any more
    assert len(tok2) == len(tok1)  # no id moved
    assert tok2.convert_tokens_to_ids(["<a>", "<b>"]) == [before["a"].token_ids[0], before["b"].token_ids[0]]
    assert torch.allclose(enc2.get_input_embeddings().weight[before["a"].token_ids[0]], a)
    assert len(generate(root, "a", "a photo of a <TOKEN>", num_samples=1, random_seed=0, model=tiny,
                        num_inference_steps=1)) == 1


def test_a_root_moves_to_another_folder(tiny, tmp_path, caplog):
    import logging
    import shutil

    import di_assets
    from di_assets.ml.encoder_root import update_token_dictionary
    from di_assets.ml.generate import generate, model_spec_for

    g = torch.Generator().manual_seed(5)
    m, n = torch.randn(32, generator=g), torch.randn(32, generator=g)
    made = create_token_dictionary([m], ["<m>"], ["m"], tmp_path / "a" / "root", model=tiny)
    text = (made / "tokens.json").read_text()
    meta = json.loads(text)
    package = str(Path(di_assets.__file__).resolve().parent.parent)
    assert not [s for s in _flat_strings(meta) if Path(s).is_absolute() or package in s or str(tmp_path) in s]
    ref = generate(made, 0, "a photo of a <TOKEN>", num_samples=1, random_seed=0, num_inference_steps=2)

    moved = Path(shutil.copytree(made, tmp_path / "b" / "root"))
    shutil.rmtree(made)
    here = generate(moved, 0, "a photo of a <TOKEN>", num_samples=1, random_seed=0, num_inference_steps=2)
    assert (np.asarray(here[0]) == np.asarray(ref[0])).all()

    # A root written before, with the absolute path of another machine's package, still works.
    meta["base_model"] = "/home/someone/src/di-assets/di_assets/reference_world/weights/diffusion"
    (moved / "tokens.json").write_text(json.dumps(meta))
    assert model_spec_for(moved, None).resolved().diffusion == tiny.resolved().diffusion
    old = generate(moved, 0, "a photo of a <TOKEN>", num_samples=1, random_seed=0, num_inference_steps=2)
    assert (np.asarray(old[0]) == np.asarray(ref[0])).all()
    # ... and an update keeps it (the same base model: no rebuild), rewriting the path portably
    with caplog.at_level(logging.WARNING, logger="di_assets"):
        update_token_dictionary(moved, [m, n], ["<m>", "<n>"], ["m", "n"], class_keys=["m", "n"], model=tiny)
    assert "rebuilding" not in caplog.text
    assert [(ct.key, ct.index) for ct in class_tokens(moved)] == [("m", 0), ("n", 1)]
    assert not [s for s in _flat_strings(json.loads((moved / "tokens.json").read_text())) if Path(s).is_absolute()]


def test_the_asset_reads_only_changed_token_files_and_its_check_trusts_the_rest(tiny, tmp_path, monkeypatch):
    """refresh_root (the encoder_root asset's update) and root_check_result read a token file only when its
    signature differs from the one the root recorded, or is racy; a rewritten file is read and caught."""
    import time

    from di_assets.defs import encoder_root as asset
    from di_assets.defs.resources import StorageResource
    from di_assets.ml import textual_inversion as ti

    storage = StorageResource(root=str(tmp_path / "store"), dataset=str(tmp_path / "data"))
    names = {k: k for k in ("a", "b", "c")}
    g = torch.Generator().manual_seed(0)
    for k in names:
        (tmp_path / "data" / k).mkdir(parents=True)
        ti.save_learned_embeds(storage.token_dir(k) / ti.EMBEDS_FILE, f"<{k}>", torch.randn(1, 32, generator=g))
    assert asset.refresh_root(storage, names, tiny) == (["a", "b", "c"], [])  # racy or no root yet: all read
    time.sleep(0.15)  # past the racy window
    assert asset.refresh_root(storage, names, tiny) == (["a", "b", "c"], [])  # recorded racy: read again
    time.sleep(0.15)

    read = []
    real = ti.load_learned_embeds
    monkeypatch.setattr(ti, "load_learned_embeds", lambda path: read.append(Path(path).parent.name) or real(path))
    passed, meta = asset.root_check_result(storage, list(names))
    assert passed and read == [] and meta["classes_with_token"] == 3

    ti.save_learned_embeds(storage.token_dir("b") / ti.EMBEDS_FILE, "<b>", torch.randn(1, 32, generator=g))
    passed, meta = asset.root_check_result(storage, list(names))
    assert not passed and meta["stale"] == "b" and read == ["b"]  # racy now: read, and its new digest differs
    time.sleep(0.15)
    read.clear()
    assert asset.refresh_root(storage, names, tiny) == (["b"], ["a", "c"]) and read == ["b"]
    read.clear()
    passed, _ = asset.root_check_result(storage, list(names))
    assert passed and read == []
    held = {ct.key: ct.embeds_sha for ct in class_tokens(storage.encoder_root)}
    assert held["b"] == embeds_digest(real(storage.token_dir("b") / ti.EMBEDS_FILE)[1])
