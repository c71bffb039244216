"""The classifiers under diagnosis: every kind loads offline from local files and predicts.

Every model is built here with random weights and saved to tmp_path; nothing is downloaded.
Heads are set so the answer is known (weight zero, a large bias on one label).
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from di_assets.ml.classifiers import (
    KINDS, Classifier, ClassifierSpec, load_classifier, map_classes, top_k,
)
from di_assets.ml.imagenet import imagenet_classes

from .conftest import EXAMPLE

CLASSES = ("circle", "square", "star")


def example_images(per_class=3):
    out = []
    for c in CLASSES:
        for f in sorted((EXAMPLE / c).iterdir())[:per_class]:
            out.append((c, Image.open(f).convert("RGB")))
    return out


def fix_head(linear, label: int):
    """Make `label` win for every input: zero weights, a large bias on it."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.bias[label] = 10.0


def labels_file(tmp_path, labels=CLASSES) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(labels) + "\n")
    return path


# ---------------------------------------------------------------- kinds


def assert_same_logits(got, expected):
    """Equal to float noise, and the comparison means something: the images' logits differ."""
    assert (expected - expected[0]).abs().max() > 1e-3, "these logits do not depend on the image"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_torchvision_from_safetensors_and_pt(tmp_path):
    import torchvision
    from safetensors.torch import save_file
    from torchvision import transforms as T

    torch.manual_seed(0)
    # a SqueezeNet (its head is a 1x1 conv) whose random logits depend on the image
    model = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=3).eval()
    save_file(model.state_dict(), tmp_path / "random.safetensors")
    images = [im for _, im in example_images(1)]
    clf = load_classifier(ClassifierSpec(name="tv", kind="torchvision", model="squeezenet1_1",
                                         weights=str(tmp_path / "random.safetensors"),
                                         labels=str(labels_file(tmp_path)), device="cpu", batch_size=2))
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        expected = model(torch.stack([tf(im) for im in images]))
    got = clf.logits(images)  # 3 images in batches of 2
    assert got.shape == (3, 3) and got.dtype == torch.float32
    assert_same_logits(got, expected)
    assert clf.labels == list(CLASSES) and clf.wnids is None

    # a MobileNet as a .pt state dict, its answer known: label 2
    net = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=3).eval()
    fix_head(net.classifier[3], 2)
    torch.save(net.state_dict(), tmp_path / "fixed.pt")
    clf = load_classifier(ClassifierSpec(name="tv-pt", kind="torchvision", model="mobilenet_v3_small",
                                         weights=str(tmp_path / "fixed.pt"), labels=str(labels_file(tmp_path)),
                                         image_size=64, device="cpu"))
    idx, p = top_k(clf.logits(images), k=5)
    assert idx.shape == (3, 3)  # k capped at the 3 labels
    assert idx[:, 0].tolist() == [2, 2, 2] and (p[:, 0] > 0.99).all()
    assert clf.labels[idx[0, 0]] == "star"


def test_timm(tmp_path):
    import timm
    from safetensors.torch import save_file
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    save_file(model.state_dict(), tmp_path / "random.safetensors")
    spec = ClassifierSpec(name="timm", kind="timm", model="test_resnet", weights=str(tmp_path / "random.safetensors"),
                          labels=str(labels_file(tmp_path)), image_size=96, device="cpu")
    clf = load_classifier(spec)
    images = [im for _, im in example_images(1)]
    tf = create_transform(**resolve_data_config({"input_size": (3, 96, 96)}, model=model))
    x = torch.stack([tf(im) for im in images])
    assert x.shape[-2:] == (96, 96)
    with torch.no_grad():
        expected = model(x)
    assert_same_logits(clf.logits(images), expected)

    fix_head(model.fc, 1)
    torch.save(model.state_dict(), tmp_path / "fixed.pth")
    clf = load_classifier(ClassifierSpec(name="timm", kind="timm", model="test_resnet",
                                         weights=str(tmp_path / "fixed.pth"), labels=str(labels_file(tmp_path)),
                                         image_size=64, device="cpu"))
    assert top_k(clf.logits(images), 1)[0][:, 0].tolist() == [1, 1, 1]


def tiny_vit(tmp_path, id2label=("circle", "square", "star")) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, id2label=dict(enumerate(id2label)),
                       label2id={x: i for i, x in enumerate(id2label)})
    model = ViTForImageClassification(config).eval()
    fix_head(model.classifier, 0)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.1)  # the logits still depend on the image
    folder = tmp_path / "vit"
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_hf(tmp_path):
    from transformers import ViTForImageClassification, ViTImageProcessor

    folder = tiny_vit(tmp_path)
    clf = load_classifier(ClassifierSpec(name="vit", kind="hf", weights=str(folder), device="cpu"))
    assert clf.labels == list(CLASSES)
    images = [im for _, im in example_images(1)]
    got = clf.logits(images)
    assert got.argmax(1).tolist() == [0, 0, 0]
    model = ViTForImageClassification.from_pretrained(folder).eval()
    x = ViTImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    assert x.shape[-2:] == (32, 32)
    with torch.no_grad():
        assert_same_logits(got, model(pixel_values=x).logits)


def test_hf_with_wnid_labels_gets_imagenet_names(tmp_path):
    folder = tiny_vit(tmp_path, id2label=("n01440764", "n01443537", "n15075141"))
    clf = load_classifier(ClassifierSpec(name="vit", kind="hf", weights=str(folder), device="cpu"))
    assert clf.wnids == ["n01440764", "n01443537", "n15075141"]
    assert clf.labels[0] == "tench, Tinca tinca"
    assert map_classes([("n15075141", "toilet tissue"), ("tench", "tench")], clf) == {"n15075141": 2, "tench": 0}


def test_open_clip_tiny_scorer_zero_shot():
    spec = ClassifierSpec(name="clip", kind="open_clip", family="tiny", device="cpu")
    with pytest.raises(ValueError, match="class_names"):
        load_classifier(spec)
    clf = load_classifier(spec, class_names=list(CLASSES))
    assert load_classifier(spec, class_names=list(CLASSES)) is clf  # loaded once per process
    data = example_images(3)
    pred = clf.logits([im for _, im in data]).argmax(1).tolist()
    right = sum(clf.labels[p] == c for p, (c, _) in zip(pred, data))
    assert right >= 6, f"{right}/9 right"
    assert map_classes([(c, c) for c in CLASSES], clf) == {"circle": 0, "square": 1, "star": 2}


@pytest.mark.parametrize("name", ["diagnosed", "judge"])
def test_reference_classifiers_on_the_example(name):
    spec = ClassifierSpec(name=name, kind="reference", model=name, device="cpu")
    clf = load_classifier(spec)
    assert load_classifier(spec, class_names=CLASSES) is clf  # its labels do not depend on the classes
    mapping = map_classes([(c, c) for c in CLASSES], clf)
    data = example_images(8)
    images = [im for _, im in data]
    images[0] = images[0].resize((128, 128))  # another size is resized to the world's 64x64
    pred = clf.logits(images).argmax(1).tolist()
    acc = sum(p == mapping[c] for p, (c, _) in zip(pred, data)) / len(data)
    assert acc >= 0.9, f"{name}: {acc:.0%}"


ENTRY_MODULE = '''
import numpy as np

def make(class_names=None):
    labels = list(class_names or ["circle", "square", "star"])
    def predict(images):
        out = np.zeros((len(images), len(labels)), dtype=np.float64)
        out[:, -1] = 5.0
        return out
    return predict, labels

def plain():
    return (lambda images: np.zeros((len(images), 2))), ["a", "b"]

def wrong_columns():
    return (lambda images: np.zeros((len(images), 2))), ["a", "b", "c"]

def not_a_pair():
    return 5

def gray_only():
    def predict(images):
        raise RuntimeError("expected input to have 1 channel,\\n but got 3 channels instead")
    return predict, ["a"]
'''


def test_entry_point(tmp_path, monkeypatch):
    (tmp_path / "di_test_entry.py").write_text(ENTRY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "di_test_entry", raising=False)

    def spec(model):
        return ClassifierSpec(name="ep", kind="entry_point", model=model)

    images = [im for _, im in example_images(1)]
    clf = load_classifier(spec("di_test_entry:make"), class_names=["dog", "cat"])
    assert clf.labels == ["dog", "cat"]
    logits = clf.logits(images)
    assert logits.dtype == torch.float32 and logits.argmax(1).tolist() == [1, 1, 1]
    assert load_classifier(spec("di_test_entry:plain")).logits(images).shape == (3, 2)
    assert load_classifier(spec("di_test_entry:plain")).logits([]).shape == (0, 2)

    with pytest.raises(ValueError, match=r"logits of shape \(3, 2\).*expected \(3, 3\)"):
        load_classifier(spec("di_test_entry:wrong_columns")).logits(images)
    with pytest.raises(ValueError, match=r"must return \(predict, labels\)"):
        load_classifier(spec("di_test_entry:not_a_pair"))
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_classifier(spec("di_test_entry:nope"))
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_classifier(spec("no_such_module_xyz:make"))
    with pytest.raises(ValueError, match="must have the form package.module:function"):
        load_classifier(spec("di_test_entry.make"))
    with pytest.raises(ValueError) as err:
        load_classifier(spec("di_test_entry:gray_only")).logits(images)
    assert "classifier 'ep'" in str(err.value) and "1 channel" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- classes -> labels


def fake(labels, **kw) -> Classifier:
    """A classifier without a model, to test the label mapping alone."""
    spec = ClassifierSpec(name="fake", kind="entry_point", model="m:f", **kw)
    return Classifier(spec, labels, lambda images: torch.zeros(len(images), len(labels)))


def test_map_by_name_and_synonyms():
    clf = fake(["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark, white shark"])
    assert map_classes([("tench", "tench"), ("tinca", "Tinca tinca"), ("great_white_shark", "great_white-shark"),
                        ("white_shark", "White  Shark")], clf) == {
        "tench": 0, "tinca": 0, "great_white_shark": 2, "white_shark": 2}


def imagenet_tv(tmp_path) -> Classifier:
    """A 1000-output torchvision model without a labels file: the ImageNet-1k labels."""
    import torchvision
    from safetensors.torch import save_file

    model = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    save_file(model.state_dict(), tmp_path / "in1k.safetensors")
    return load_classifier(ClassifierSpec(name="in1k", kind="torchvision", model="mobilenet_v3_small",
                                          weights=str(tmp_path / "in1k.safetensors"), device="cpu"))


def test_imagenet_labels_by_wnid_and_name(tmp_path):
    clf = imagenet_tv(tmp_path)
    assert len(clf.labels) == 1000 and clf.labels[0] == "tench, Tinca tinca"
    assert clf.wnids == [c.wnid for c in imagenet_classes()]
    assert map_classes([("n01440764", "n01440764"), ("n15075141", "toilet tissue")], clf) == {
        "n01440764": 0, "n15075141": 999}
    # by name: ImageNet repeats "crane" (134 the bird, 517 the machine): same-named classes pair up in order
    classes = [("tench-0", "tench"), ("crane-134", "crane"), ("crane-517", "crane"), ("maillot-638", "maillot"),
               ("maillot-639", "maillot")]
    assert map_classes(classes, clf) == {"tench-0": 0, "crane-134": 134, "crane-517": 517, "maillot-638": 638,
                                         "maillot-639": 639}
    with pytest.raises(ValueError, match=r"several labels: crane: 134 'crane', 517 'crane'.*mapping"):
        map_classes([("crane", "crane")], clf)


def test_map_by_file(tmp_path):
    clf = fake(["circle", "square", "star, pentagram"])
    classes = [("red_circle", "red circle"), ("blue_square", "blue square"), ("yellow_star", "yellow star")]
    yml = tmp_path / "map.yaml"
    yml.write_text("red_circle: circle\nblue square: 1\nyellow_star: pentagram\n")  # by key or name; label or index
    assert map_classes(classes, clf, str(yml)) == {"red_circle": 0, "blue_square": 1, "yellow_star": 2}
    csv = tmp_path / "map.csv"
    csv.write_text("class,label\nred_circle,circle\nblue_square,square\nyellow_star,2\n")
    assert map_classes(classes, clf, str(csv)) == {"red_circle": 0, "blue_square": 1, "yellow_star": 2}
    tsv = tmp_path / "map.tsv"
    tsv.write_text("red_circle\tcircle\nblue_square\tsquare\nyellow_star\tstar\n")
    # the spec's own mapping is used when none is given
    assert map_classes(classes, fake(clf.labels, mapping=str(tsv))) == {"red_circle": 0, "blue_square": 1,
                                                                        "yellow_star": 2}

    yml.write_text("red_circle: circle\nblue_square: square\nyellow_star: star\ngreen_heart: heart\n")
    with pytest.raises(ValueError, match=r"names classes the dataset does not have: \['green_heart'\]"):
        map_classes(classes, clf, str(yml))
    yml.write_text("red_circle: circle\n")
    with pytest.raises(ValueError, match=r"lacks classes \['blue_square', 'yellow_star'\]"):
        map_classes(classes, clf, str(yml))
    yml.write_text("red_circle: circle\nblue_square: 7\nyellow_star: hexagon\n")
    with pytest.raises(ValueError, match=r"blue_square: 7; yellow_star: 'hexagon'"):
        map_classes(classes, clf, str(yml))
    with pytest.raises(FileNotFoundError, match=r"classifiers\[fake\].mapping"):
        map_classes(classes, clf, str(tmp_path / "none.yaml"))


def test_unmatched_classes_name_the_nearest_labels_in_one_line():
    clf = fake(["circle", "square", "star, pentagram", "triangle"])
    with pytest.raises(ValueError) as err:
        map_classes([("circle", "circle"), ("sqaure", "sqaure"), ("pentagon", "pentagon")], clf)
    msg = str(err.value)
    assert "\n" not in msg
    assert "classifier 'fake': classes ['sqaure', 'pentagon'] match no label" in msg
    assert "nearest labels: sqaure: square" in msg and "pentagon: pentagram" in msg
    assert "mapping:" in msg and "classifiers[fake].mapping" in msg


# ---------------------------------------------------------------- specs and errors


def test_missing_files_are_named_with_their_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file .*nope.safetensors does not exist \(set classifiers\[tv\].weights\)"):
        load_classifier(ClassifierSpec(name="tv", kind="torchvision", model="resnet18",
                                       weights=str(tmp_path / "nope.safetensors")))
    # a missing hf folder is never taken for a Hub id
    with pytest.raises(FileNotFoundError, match=r"not a local model folder.*classifiers\[vit\].weights"):
        load_classifier(ClassifierSpec(name="vit", kind="hf", weights="google/vit-base-patch16-224"))
    with pytest.raises(ValueError, match="needs weights"):
        ClassifierSpec(name="tv", kind="torchvision", model="resnet18")


def test_bad_weights_and_labels(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    model = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=3)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    base = dict(name="tv", kind="torchvision", weights=str(tmp_path / "w.safetensors"), device="cpu")
    with pytest.raises(ValueError, match="3 outputs, not ImageNet-1k's 1000; set classifiers\\[tv\\].labels"):
        load_classifier(ClassifierSpec(model="squeezenet1_1", **base))
    with pytest.raises(ValueError, match="has 2 labels but the weights have 3 outputs"):
        load_classifier(ClassifierSpec(model="squeezenet1_1", labels=str(labels_file(tmp_path, ["a", "b"])), **base))
    with pytest.raises(ValueError, match="unknown torchvision model 'squeezenet1_2'; did you mean squeezenet1_1"):
        load_classifier(ClassifierSpec(model="squeezenet1_2", labels=str(labels_file(tmp_path)), **base))
    with pytest.raises(ValueError, match="do not fit torchvision model 'mobilenet_v3_small'"):
        load_classifier(ClassifierSpec(model="mobilenet_v3_small", labels=str(labels_file(tmp_path)), **base))


def test_spec_validation_and_from_dict():
    spec = ClassifierSpec.from_dict({"name": "resnet18.in1k", "kind": "torchvision", "model": "resnet18",
                                     "weights": "w.safetensors"})
    assert spec.batch_size == 64 and spec.device == "auto" and set(KINDS) >= {spec.kind}
    with pytest.raises(ValueError, match=r"unknown keys \['weight'\]; known keys: name, kind, model, weights"):
        ClassifierSpec.from_dict({"name": "x", "kind": "timm", "weight": "w"})
    for bad in ("ResNet", "-x", "a b", "", "a/b"):
        with pytest.raises(ValueError, match="is not a valid key"):
            ClassifierSpec(name=bad, kind="reference")
    with pytest.raises(ValueError, match="unknown kind 'keras'"):
        ClassifierSpec(name="x", kind="keras")


def test_fingerprint_follows_the_weights_file(tmp_path):
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"one")
    spec = ClassifierSpec(name="tv", kind="torchvision", model="resnet18", weights=str(w))
    first = spec.fingerprint()
    assert spec.fingerprint() == first
    w.write_bytes(b"two!")
    assert spec.fingerprint() != first
    st = w.stat()
    second = spec.fingerprint()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same size, newer mtime
    assert spec.fingerprint() != second
    # folders are walked
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    hf = ClassifierSpec(name="vit", kind="hf", weights=str(folder))
    before = hf.fingerprint()
    (folder / "model.safetensors").write_bytes(b"x")
    assert hf.fingerprint() != before
    assert ClassifierSpec(name="ref", kind="reference", model="judge").fingerprint() != \
        ClassifierSpec(name="ref", kind="reference", model="diagnosed").fingerprint()


def test_top_k():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    idx, p = top_k(logits, k=2)
    assert idx.tolist() == [[1, 2], [0, 2]]
    assert torch.allclose(p, logits.softmax(1).topk(2, dim=1).values)
    assert top_k(logits, k=10)[0].shape == (2, 3)
