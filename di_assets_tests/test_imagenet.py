import time

import torch

from di_assets.ml.encoder_root import class_tokens
from di_assets.ml.imagenet import imagenet_classes, is_wnid
from di_assets.ml.imagenet_star import default_class_names, import_imagenet_star


def test_the_imagenet_table():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert [c.index for c in classes] == list(range(1000))
    assert len({c.wnid for c in classes}) == 1000 and all(is_wnid(c.wnid) for c in classes)
    assert (classes[0].wnid, classes[0].name, classes[0].short) == ("n01440764", "tench, Tinca tinca", "tench")
    assert (classes[999].wnid, classes[999].short) == ("n15075141", "toilet tissue")
    classes.pop()  # callers get a copy
    assert len(imagenet_classes()) == 1000


def test_is_wnid():
    assert is_wnid("n01440764")
    assert not any(is_wnid(s) for s in ("n0144076", "x01440764", "n014407645", "N01440764", "tench", 5, None))


def test_default_names():
    assert default_class_names(3) == ["class 0", "class 1", "class 2"]
    names = default_class_names(1000)
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"


def test_import_of_1000_tokens_names_them_after_imagenet(tiny, tmp_path):
    src = tmp_path / "tokens"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(1000):
        torch.save(torch.randn(32, generator=g), src / f"{i}.bin")
    t0 = time.perf_counter()
    root = import_imagenet_star(src, tmp_path / "root", model=tiny)
    took = time.perf_counter() - t0
    classes = class_tokens(root)
    assert [(c.index, c.key, c.name) for c in classes[:2]] == [(0, "tench-0", "tench"), (1, "goldfish-1", "goldfish")]
    assert (classes[999].key, classes[999].name) == ("toilet_tissue-999", "toilet tissue")
    # ImageNet repeats two first synonyms (crane 134/517, maillot 638/639): the index keeps keys apart
    assert len({c.key for c in classes}) == 1000
    assert took < 10, f"importing 1000 tokens took {took:.1f} s"
