"""Issue 12: classes that leave, come back, or are renamed never leave the encoder root stuck.

A class's token stays in the root's tokenizer only while the class does: a removed or renamed
class's rows are retired (renamed out of use, never reused), so its token is free again, and
every class that stays keeps its index and its token ids. Through Dagster, a class folder that
comes back gets a new data version, so its token (which went to trash with it) is learned again.
"""

import json
import random
import shutil

import dagster as dg
import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from di_assets.ml.encoder_root import RETIRED, class_tokens, create_token_dictionary, update_token_dictionary
from di_assets.ml.models import load_base_text_encoder
from di_assets.ml.textual_inversion import placeholder_tokens

DIM = 32  # the tiny family's text width


def _load(root):
    return (CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
            CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True))


def _build(root, classes: dict, tiny):
    """The root holding exactly `classes` (key -> embedding), as the encoder_root asset builds it."""
    keys = sorted(classes)
    return update_token_dictionary(root, [classes[k] for k in keys], [f"<{k}>" for k in keys], keys,
                                   class_keys=keys, model=tiny)


def _state(root) -> dict:
    return {ct.key: (ct.index, ct.token_ids) for ct in class_tokens(root)}


def _check_consistent(root, classes: dict, tiny):
    """tokens.json, tokenizer and text encoder agree, and no absent class's token is in the vocabulary."""
    tok, enc = _load(root)
    vocab = tok.get_vocab()
    weight = enc.get_input_embeddings().weight
    base = len(load_base_text_encoder(tiny)[0])
    cts = {ct.key: ct for ct in class_tokens(root)}
    assert set(cts) == set(classes)
    assert len({ct.index for ct in cts.values()}) == len(cts)
    owned = set()
    for key, ct in cts.items():
        names = placeholder_tokens(ct.token, len(ct.token_ids))
        assert tok.convert_tokens_to_ids(names) == list(ct.token_ids)
        assert f"{ct.token}_{len(ct.token_ids)}" not in vocab  # a prompt expands to exactly its vectors
        assert torch.equal(weight[list(ct.token_ids)], classes[key].reshape(-1, DIM))
        owned.update(ct.token_ids)
    # every other added row is retired, under its retired name
    for i, name in enumerate(tok.convert_ids_to_tokens(list(range(base, len(tok)))), base):
        assert (i in owned) or name == RETIRED.format(i), (i, name)
    return tok


def test_a_removed_class_can_come_back(tiny, tmp_path):
    g = torch.Generator().manual_seed(10)
    a, b, c, b2 = (torch.randn(DIM, generator=g) for _ in range(4))
    root = tmp_path / "root"
    _build(root, {"a": a, "b": b, "c": c}, tiny)
    first = _state(root)
    _, enc0 = _load(root)
    w0 = enc0.get_input_embeddings().weight.detach().clone()

    _build(root, {"a": a, "c": c}, tiny)  # b removed
    assert _state(root) == {k: first[k] for k in ("a", "c")}
    removed = root.parent / "removed"
    shutil.copytree(root, removed)

    _build(root, {"a": a, "b": b2, "c": c}, tiny)  # b is back, learned again
    back = _state(root)
    assert back["a"] == first["a"] and back["c"] == first["c"]
    assert back["b"][0] == 3  # a new index: b's old one is not reused
    _check_consistent(root, {"a": a, "b": b2, "c": c}, tiny)
    _, enc = _load(root)
    w = enc.get_input_embeddings().weight
    for k in ("a", "c"):  # the rows of the classes that stayed did not move
        assert torch.equal(w[list(first[k][1])], w0[list(first[k][1])])
    assert "<b>" not in _check_consistent(removed, {"a": a, "c": c}, tiny).get_vocab()  # retired on removal


def test_a_renamed_class_frees_its_old_token(tiny, tmp_path):
    g = torch.Generator().manual_seed(11)
    circle, square, box, square2 = (torch.randn(DIM, generator=g) for _ in range(4))
    root = tmp_path / "root"
    _build(root, {"circle": circle, "square": square}, tiny)
    first = _state(root)
    _build(root, {"circle": circle, "box": box}, tiny)  # folder square -> box
    assert _state(root)["circle"] == first["circle"]
    assert "<square>" not in _check_consistent(root, {"circle": circle, "box": box}, tiny).get_vocab()
    _build(root, {"circle": circle, "box": box, "square": square2}, tiny)  # a new class named square
    _check_consistent(root, {"circle": circle, "box": box, "square": square2}, tiny)
    assert _state(root)["circle"] == first["circle"]


def test_a_class_that_changes_its_number_of_vectors_then_leaves_and_returns(tiny, tmp_path):
    g = torch.Generator().manual_seed(12)
    a, b, b3, b_back = torch.randn(DIM, generator=g), torch.randn(DIM, generator=g), \
        torch.randn(3, DIM, generator=g), torch.randn(2, DIM, generator=g)
    root = tmp_path / "root"
    _build(root, {"a": a, "b": b}, tiny)
    _build(root, {"a": a, "b": b3}, tiny)  # b: 1 -> 3 vectors
    _build(root, {"a": a}, tiny)  # b leaves with 3 rows
    assert not {"<b>", "<b>_1", "<b>_2"} & set(_check_consistent(root, {"a": a}, tiny).get_vocab())
    _build(root, {"a": a, "b": b_back}, tiny)  # back with 2 vectors
    _check_consistent(root, {"a": a, "b": b_back}, tiny)


def test_a_root_left_stuck_by_an_older_version_heals(tiny, tmp_path):
    """Roots written before the fix hold a removed class's token under its name; the next build retires it."""
    g = torch.Generator().manual_seed(13)
    circle, square, star, square2 = (torch.randn(DIM, generator=g) for _ in range(4))
    root = tmp_path / "root"
    _build(root, {"circle": circle, "square": square, "star": star}, tiny)
    first = _state(root)
    meta = json.loads((root / "tokens.json").read_text())  # what the older version wrote on removal
    meta["classes"] = [e for e in meta["classes"] if e["key"] != "square"]
    (root / "tokens.json").write_text(json.dumps(meta))
    assert "<square>" in _load(root)[0].get_vocab()

    _build(root, {"circle": circle, "square": square2, "star": star}, tiny)
    after = _state(root)
    assert after["circle"] == first["circle"] and after["star"] == first["star"]
    _check_consistent(root, {"circle": circle, "square": square2, "star": star}, tiny)


def test_a_token_that_is_a_word_of_the_base_vocabulary_is_still_refused(tiny, tmp_path):
    g = torch.Generator().manual_seed(14)
    a, b = torch.randn(DIM, generator=g), torch.randn(DIM, generator=g)
    root = tmp_path / "root"
    _build(root, {"a": a, "b": b}, tiny)
    _build(root, {"a": a}, tiny)
    before = (root / "tokens.json").read_text()
    for token in ("photo", "<a>"):  # a base word; another class's token
        with pytest.raises(ValueError, match="already exists in the tokenizer's vocabulary"):
            update_token_dictionary(root, [a, b], ["<a>", token], ["a", "x"], class_keys=["a", "x"], model=tiny)
    assert (root / "tokens.json").read_text() == before  # nothing written
    with pytest.raises(ValueError, match="already exists"):
        create_token_dictionary([a], ["photo"], ["x"], tmp_path / "fresh", model=tiny)


def test_random_comings_goings_and_renames_always_build_and_keep_indices(tiny, tmp_path):
    rng = random.Random(1212)
    g = torch.Generator().manual_seed(1212)
    names = ["circle", "square", "star", "heart", "moon", "box"]
    root = tmp_path / "root"
    classes = {k: torch.randn(DIM, generator=g) for k in ("circle", "square", "star")}
    _build(root, classes, tiny)
    prev = _state(root)
    seen_indices = {ct[0] for ct in prev.values()}
    ever, returned, ops = set(classes), 0, []
    for step in range(30):
        absent = [n for n in names if n not in classes]
        choices = (["add", "rename"] if absent else []) + (["remove"] if len(classes) > 1 else []) + ["retrain"]
        op = rng.choice(choices)
        if op == "add":
            k = rng.choice(absent)
            classes[k] = torch.randn(rng.choice([1, 1, 2]), DIM, generator=g)
        elif op == "remove":
            k = rng.choice(sorted(classes))
            del classes[k]
        elif op == "rename":  # the folder is renamed: the images stay, the key and token change
            k, new = rng.choice(sorted(classes)), rng.choice(absent)
            classes[new] = classes.pop(k)
            k = f"{k}->{new}"
        else:  # relearned (changed images), maybe with another number of vectors
            k = rng.choice(sorted(classes))
            classes[k] = torch.randn(rng.choice([1, 2, 3]), DIM, generator=g)
        ops.append((op, k))
        returned += len((set(classes) - set(prev)) & ever)
        ever |= set(classes)
        _build(root, classes, tiny)
        now = _state(root)
        for key in set(prev) & set(now):  # a class in two consecutive builds keeps its index ...
            assert now[key][0] == prev[key][0], (step, ops)
            n = min(len(now[key][1]), len(prev[key][1]))
            assert now[key][1][:n] == prev[key][1][:n], (step, ops)  # ... and its ids
        for key in set(now) - set(prev):  # a class that is new (or back) gets a fresh index
            assert now[key][0] not in seen_indices, (step, ops)
        seen_indices |= {v[0] for v in now.values()}
        _check_consistent(root, classes, tiny)
        prev = now
    assert {op for op, _ in ops} == {"add", "remove", "rename", "retrain"}
    assert returned, ops  # some class came back under a name it had before: the case of the issue
    from di_assets.ml.generate import generate

    key = sorted(classes)[0]  # and the root still generates
    assert len(generate(root, key, "a photo of a <TOKEN>", num_samples=1, random_seed=0, model=tiny,
                        num_inference_steps=1)) == 1


# -- end to end, through the Dagster layer -----------------------------------------------------

@pytest.mark.slow
def test_remove_return_and_rename_through_dagster(tmp_path):
    from di_assets.defs import CLASSES, build_defs
    from di_assets.defs.driver import LocalDriver
    from di_assets.settings import Settings
    from di_assets_tests.conftest import copy_classes

    data = copy_classes(tmp_path / "data", classes=("circle", "square", "star"), per_class=4)
    store = tmp_path / "store"
    settings = Settings.load(dataset=str(data), storage=str(store), shifts=["base"],
                             textual_inversion={"steps": 2}, generation={"num_samples": 1}, classifiers=[])
    (tmp_path / "home").mkdir()

    def state():
        meta = json.loads((store / "encoder_root" / "tokens.json").read_text())
        return {c["key"]: (c["index"], c["token_ids"]) for c in meta["classes"]}

    def update(driver):  # what `di-assets update` does
        driver.sensor()
        driver.observe()
        return driver.settle()

    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        driver = LocalDriver(build_defs(settings), instance)
        driver.tick()
        update(driver)
        first = state()
        assert set(first) == {"circle", "square", "star"}

        shutil.move(str(data / "square"), str(tmp_path / "square"))  # removed ...
        update(driver)
        assert state() == {k: first[k] for k in ("circle", "star")}

        shutil.move(str(tmp_path / "square"), str(data / "square"))  # ... and back, the same images
        done = update(driver)
        assert "square" in done["class_token"]  # learned again: its old token went to trash
        now = state()
        assert {k: now[k] for k in ("circle", "star")} == {k: first[k] for k in ("circle", "star")}
        assert now["square"][0] == 3
        assert (store / "tokens" / "square" / "learned_embeds.safetensors").is_file()
        assert list((store / "images" / "square" / "base").glob("*.png"))

        (data / "star").rename(data / "box")  # renamed
        update(driver)
        renamed = state()
        assert set(renamed) == {"circle", "square", "box"}
        assert renamed["circle"] == first["circle"] and renamed["square"] == now["square"]
        (data / "box").rename(data / "star")  # and back: <star> does not block it
        update(driver)
        assert set(state()) == {"circle", "square", "star"}
        assert state()["circle"] == first["circle"] and state()["square"] == now["square"]
        assert set(instance.get_dynamic_partitions(CLASSES.name)) == {"circle", "square", "star"}
        assert list((store / "images" / "star" / "base").glob("*.png"))
        assert update(driver) == {}  # and then it is quiet
        stayed = {k: state()[k] for k in ("square", "star")}

        # Removed where no automation tick follows (as `di-assets run` does), back by an update.
        shutil.move(str(data / "circle"), str(tmp_path / "circle"))
        driver.sensor()
        assert "circle" not in state()
        shutil.move(str(tmp_path / "circle"), str(data / "circle"))
        assert "circle" in update(driver)["class_token"]
        assert set(state()) == {"circle", "square", "star"}
        assert {k: state()[k] for k in ("square", "star")} == stayed
        assert update(driver) == {}  # the observation keeps the returned folder's data version
