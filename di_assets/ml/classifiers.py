"""The classifiers under diagnosis: load one offline, map the dataset's classes to its labels, predict.

Kinds (`ClassifierSpec.kind`):

- `reference`: the reference world's shipped shape classifiers (`judge`, `diagnosed`).
- `torchvision` / `timm`: an architecture by name with a local weights file.
- `hf`: a local `save_pretrained` folder of an image-classification model and its processor.
- `open_clip`: zero-shot over the dataset's class captions (`a photo of a <class>`).
- `entry_point`: `package.module:function` returning `(predict, labels)`.

Nothing is ever downloaded: weights are local files (open_clip aside, which resolves its
pretrained tags as the CLIP metric does). No torch import at module level, so settings can
parse specs without loading torch.
"""

from __future__ import annotations

import csv
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .classes import check_key
from .imagenet import imagenet_classes, is_wnid

if TYPE_CHECKING:
    import torch
    from PIL import Image

KINDS = ("reference", "torchvision", "timm", "hf", "open_clip", "entry_point")
LOCAL_WEIGHTS = ("torchvision", "timm", "hf")  # kinds whose `weights` is a local file or folder (open_clip: a tag too)
_ENTRY_POINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
# the shipped reference-world weights (as in reference_world.train_classifier, without importing torch)
REFERENCE_WEIGHTS = Path(__file__).resolve().parent.parent / "reference_world" / "weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClassifierSpec:
    """Which classifier to diagnose. Hashable, so it keys the per-process cache."""

    name: str  # in settings and paths: a key (see ml.classes.check_key)
    kind: str  # one of KINDS
    model: str | None = None  # reference: judge|diagnosed; torchvision/timm/open_clip: architecture; entry_point: pkg.mod:fn
    weights: str | None = None  # torchvision/timm: local file; hf: local folder; open_clip: tag or checkpoint
    labels: str | None = None  # torchvision/timm: one label per line, in output order
    mapping: str | None = None  # class -> label file (YAML/JSON mapping, or CSV/TSV class,label)
    image_size: int | None = None  # torchvision/timm input size override
    batch_size: int = 64
    family: str = "tiny"  # reference/open_clip defaults (ModelSpec family)
    device: str = "auto"

    def __post_init__(self):
        check_key("classifier name", self.name)
        if self.kind not in KINDS:
            raise ValueError(f"classifier '{self.name}': unknown kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind in ("torchvision", "timm", "entry_point") and not self.model:
            what = "package.module:function" if self.kind == "entry_point" else "an architecture name, e.g. resnet18"
            raise ValueError(f"classifier '{self.name}' ({self.kind}) needs model: {what}")
        if self.kind in LOCAL_WEIGHTS and not self.weights:
            raise ValueError(f"classifier '{self.name}' ({self.kind}) needs weights: a local "
                             f"{'folder' if self.kind == 'hf' else 'file'} (nothing is downloaded)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"classifier '{self.name}': batch_size must be a positive integer, got {self.batch_size!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ValueError(f"classifier '{self.name}': image_size must be a positive integer, got {self.image_size!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierSpec":
        if not isinstance(d, dict):
            raise ValueError(f"a classifier must be a mapping of settings, got {d!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"classifier {d.get('name', '?')!r}: unknown keys {unknown}; known keys: {', '.join(known)}")
        missing = [k for k in ("name", "kind") if k not in d]
        if missing:
            raise ValueError(f"classifier {d.get('name', '?')!r} lacks {missing}; each needs name and kind")
        return cls(**d)

    def missing_files(self) -> list[tuple[str, str]]:
        """(setting, path) of each local file this spec names that does not exist."""
        keys = ("weights", "labels", "mapping") if self.kind in LOCAL_WEIGHTS else ("labels", "mapping")
        return [(self.setting(k), getattr(self, k)) for k in keys
                if getattr(self, k) and not Path(getattr(self, k)).exists()]

    def setting(self, key: str) -> str:
        """How settings name one of this spec's keys, for error messages."""
        return f"classifiers[{self.name}].{key}"

    def local_files(self) -> list[Path]:
        """The local files this spec reads (folders walked), as far as known without loading."""
        paths = [self.weights, self.labels, self.mapping]
        if self.kind == "reference":
            paths.append(REFERENCE_WEIGHTS / f"{self.model or 'diagnosed'}.safetensors")
        if self.kind == "open_clip" and self.family == "tiny" and not self.model and not self.weights:
            paths.append(REFERENCE_WEIGHTS / "clip.safetensors")  # the tiny scorer's shipped weights
        if self.kind == "entry_point" and self.model and _ENTRY_POINT.fullmatch(self.model):
            try:  # the module's source file, without running it (parent packages do import)
                found = importlib.util.find_spec(self.model.split(":")[0])
                paths.append(found.origin if found else None)
            except (ImportError, ValueError):
                pass
        out = []
        for p in filter(None, paths):
            p = Path(p)
            if p.is_dir():
                out += sorted(f for f in p.rglob("*") if f.is_file())
            elif p.is_file():
                out.append(p)
        return out

    def fingerprint(self) -> str:
        """A cheap digest of the spec and the (size, mtime) of every local file it reads."""
        stats = []
        for f in self.local_files():
            st = f.stat()
            stats.append([str(f), st.st_size, st.st_mtime_ns])
        blob = json.dumps({"spec": asdict(self), "files": stats}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Classifier:
    """A loaded classifier: `labels[i]` names output `i`; `logits` batches images through it."""

    def __init__(self, spec: ClassifierSpec, labels: Sequence[str], forward: Callable, wnids: Sequence[str] | None = None):
        self.spec = spec
        self.name = spec.name
        if wnids is None:
            labels, wnids = _named(labels)
        self.labels = list(labels)
        self.wnids = list(wnids) if wnids is not None else None
        self._forward = forward  # list[PIL] -> logits of one batch

    def __repr__(self):
        return f"Classifier({self.name!r}, kind={self.spec.kind!r}, {len(self.labels)} labels)"

    def logits(self, images: list["Image.Image"]) -> "torch.Tensor":
        """(N, len(labels)) float32 logits on the CPU."""
        import torch

        images = list(images)
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.spec.batch_size):
                batch = images[start:start + self.spec.batch_size]
                try:
                    y = torch.as_tensor(self._forward(batch)).detach().float().cpu()
                except Exception as exc:  # the model refused the images: say which model, in one line
                    raise ValueError(f"classifier '{self.name}' ({self.spec.kind}) failed on these images: "
                                     f"{_one_line(exc)}") from exc
                if y.ndim != 2 or y.shape != (len(batch), len(self.labels)):
                    raise ValueError(f"classifier '{self.name}' returned logits of shape {tuple(y.shape)} for "
                                     f"{len(batch)} images; expected ({len(batch)}, {len(self.labels)}): one column per label")
                out.append(y)
        return torch.cat(out) if out else torch.empty(0, len(self.labels))


def load_classifier(spec: ClassifierSpec, class_names: Sequence[str] | None = None) -> Classifier:
    """Load a classifier once per process (again when one of its files changes)."""
    # only zero-shot and entry-point classifiers depend on the class names; the others load once for any
    uses_names = spec.kind in ("open_clip", "entry_point")
    names = tuple(class_names) if class_names is not None and uses_names else None
    return _load_cached(spec, names, spec.fingerprint())


@functools.lru_cache(maxsize=4)
def _load_cached(spec: ClassifierSpec, class_names: tuple[str, ...] | None, _fingerprint: str) -> Classifier:
    return _LOADERS[spec.kind](spec, class_names)


def top_k(logits: "torch.Tensor", k: int = 5) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(indices, softmax probabilities) of the k most likely labels per row; k capped at the labels."""
    probs = logits.float().softmax(dim=1)
    p, i = probs.topk(max(1, min(k, probs.shape[1])), dim=1)
    return i, p


# ---------------------------------------------------------------- loaders


def _device(spec: ClassifierSpec) -> str:
    from .models import resolve_device

    return resolve_device(spec.device)


def _module_forward(model, preprocess: Callable, device: str) -> Callable:
    """A forward over PIL images: preprocess each, stack, run the module on `device`."""
    import torch

    model.to(device).eval().requires_grad_(False)

    def forward(images):
        x = torch.stack([preprocess(im) for im in images]).to(device)
        y = model(x)
        return getattr(y, "logits", y)

    return forward


def _load_reference(spec, class_names):
    from PIL import Image

    from di_assets.reference_world.train_classifier import load_classifier as load_shipped, to_tensor
    from di_assets.reference_world.world import SHAPES, SIZE

    model = load_shipped(spec.model or "diagnosed")
    device = _device(spec)
    model.to(device).eval().requires_grad_(False)

    def forward(images):
        # the world's images are 64x64; generated ones at another size are resized to it
        images = [im if im.size == (SIZE, SIZE) else im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
                  for im in images]
        return model(to_tensor(images).to(device))

    return Classifier(spec, SHAPES, forward)


def _read_state_dict(spec: ClassifierSpec) -> dict:
    import torch

    path = Path(spec.weights)
    if not path.is_file():
        raise FileNotFoundError(f"classifier '{spec.name}': weights file {path} does not exist (set {spec.setting('weights')})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"classifier '{spec.name}': {path} is not a readable state dict ({_one_line(exc)})") from exc
    else:
        raise ValueError(f"classifier '{spec.name}': weights {path} must be .safetensors, .pt, .pth or .bin")
    # common checkpoint layouts: {"state_dict": ...} / {"model": ...}, and DataParallel's "module." prefix
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"classifier '{spec.name}': {path} holds no state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _head_outputs(sd: dict, build: Callable) -> int | None:
    """How many outputs the weights' classifier head has.

    The head is timm's named classifier, else the last weight of 2+ dims (a Linear, or a 1x1
    conv head as in SqueezeNet) in the model's own order: safetensors files sort their keys.
    The model is built on the meta device, so this costs no memory.
    """
    import torch

    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # some builders compute on tensors (torchvision's regnets)
        model = build()
    heads = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    for h in [heads] if isinstance(heads, str) else heads:
        w = sd.get(f"{h}.weight")
        if w is not None and w.ndim >= 2:
            return w.shape[0]
    for k in reversed(list(model.state_dict())):
        if k.endswith("weight") and k in sd and sd[k].ndim >= 2:
            return sd[k].shape[0]
    return None


def _labels_for(spec: ClassifierSpec, outputs: int | None) -> tuple[list[str], list[str] | None]:
    """Labels from the labels file, else the ImageNet-1k names for 1000 outputs."""
    if spec.labels:
        labels = _read_labels(spec)
        if outputs is not None and outputs != len(labels):
            raise ValueError(f"classifier '{spec.name}': {spec.setting('labels')} has {len(labels)} labels but the "
                             f"weights have {outputs} outputs")
        return labels, None
    if outputs == 1000:
        classes = imagenet_classes()
        return [c.name for c in classes], [c.wnid for c in classes]
    found = "no classifier head in the weights" if outputs is None else f"the weights have {outputs} outputs"
    raise ValueError(f"classifier '{spec.name}': {found}, not ImageNet-1k's 1000; set "
                     f"{spec.setting('labels')} to a text file with one label name per line, in output order")


def _read_labels(spec: ClassifierSpec) -> list[str]:
    path = Path(spec.labels)
    if not path.is_file():
        raise FileNotFoundError(f"classifier '{spec.name}': labels file {path} does not exist (set {spec.setting('labels')})")
    labels = [line.strip() for line in path.read_text().splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels or "" in labels:
        raise ValueError(f"classifier '{spec.name}': labels file {path} must have one non-empty label per line")
    return labels


def _load_state(spec: ClassifierSpec, model, sd: dict) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"classifier '{spec.name}': weights {spec.weights} do not fit {spec.kind} model "
                         f"{spec.model!r}: {_one_line(exc)}") from exc


def _load_torchvision(spec, class_names):
    import torchvision
    from torchvision import transforms as T

    known = torchvision.models.list_models()
    if spec.model.lower() not in known:
        raise ValueError(f"classifier '{spec.name}': unknown torchvision model {spec.model!r}{_did_you_mean(spec.model, known)}")
    sd = _read_state_dict(spec)
    labels, wnids = _labels_for(spec, _head_outputs(sd, lambda: torchvision.models.get_model(spec.model, weights=None)))
    model = torchvision.models.get_model(spec.model, weights=None, num_classes=len(labels))
    _load_state(spec, model, sd)
    size = spec.image_size or 224
    # the standard ImageNet evaluation crop: resize to size/0.875, center-crop size
    tf = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return Classifier(spec, labels, _module_forward(model, lambda im: tf(im.convert("RGB")), _device(spec)), wnids)


def _load_timm(spec, class_names):
    import timm
    from timm.data import create_transform, resolve_data_config

    if not timm.is_model(spec.model):
        raise ValueError(f"classifier '{spec.name}': unknown timm model {spec.model!r}{_did_you_mean(spec.model, timm.list_models())}")
    sd = _read_state_dict(spec)
    labels, wnids = _labels_for(spec, _head_outputs(sd, lambda: timm.create_model(spec.model, pretrained=False)))
    model = timm.create_model(spec.model, pretrained=False, num_classes=len(labels))
    _load_state(spec, model, sd)
    args = {"input_size": (3, spec.image_size, spec.image_size)} if spec.image_size else {}
    tf = create_transform(**resolve_data_config(args, model=model))
    return Classifier(spec, labels, _module_forward(model, lambda im: tf(im.convert("RGB")), _device(spec)), wnids)


def _load_hf(spec, class_names):
    folder = Path(spec.weights)
    # a missing folder must not be taken for a Hub id: check before transformers sees it
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"classifier '{spec.name}': {folder} is not a local model folder with config.json "
                                f"(set {spec.setting('weights')} to a save_pretrained folder)")
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"classifier '{spec.name}': cannot load an image classifier and its image processor "
                         f"from {folder} ({_one_line(exc)})") from exc
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    labels = [id2label[i] for i in range(len(id2label))]
    device = _device(spec)
    model.to(device).eval().requires_grad_(False)

    def forward(images):
        x = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return model(pixel_values=x.to(device)).logits

    return Classifier(spec, labels, forward)


def _load_open_clip(spec, class_names):
    if class_names is None:
        raise ValueError(f"classifier '{spec.name}' (open_clip) is zero-shot over the dataset's classes: "
                         f"load it with class_names")
    from .clip_metric import ClipScorer
    from .models import ModelSpec
    from .shifts import class_caption

    scorer = ClipScorer(ModelSpec(family=spec.family, clip_model=spec.model, clip_pretrained=spec.weights,
                                  device=spec.device), batch_size=spec.batch_size)
    text = scorer.text_features([class_caption(n) for n in class_names])

    def forward(images):
        return 100 * scorer.image_features(images) @ text.T  # CLIP's logit scale

    return Classifier(spec, class_names, forward)


def _load_entry_point(spec, class_names):
    if not _ENTRY_POINT.fullmatch(spec.model):
        raise ValueError(f"classifier '{spec.name}': {spec.setting('model')} {spec.model!r} must have the form "
                         f"package.module:function")
    module_name, fn_name = spec.model.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"classifier '{spec.name}': cannot import module {module_name!r} ({_one_line(exc)})") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"classifier '{spec.name}': module {module_name!r} has no function {fn_name!r}")
    params = inspect.signature(fn).parameters
    takes_names = "class_names" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    try:
        result = fn(class_names=list(class_names) if class_names is not None else None) if takes_names else fn()
    except Exception as exc:
        raise ValueError(f"classifier '{spec.name}': {spec.model} raised {_one_line(exc)}") from exc
    if not (isinstance(result, tuple) and len(result) == 2 and callable(result[0])
            and isinstance(result[1], (list, tuple)) and result[1] and all(isinstance(x, str) for x in result[1])):
        raise ValueError(f"classifier '{spec.name}': {spec.model} must return (predict, labels): a function of a "
                         f"list of PIL images returning logits, and a non-empty list of label names")
    predict, labels = result
    return Classifier(spec, labels, predict)


_LOADERS = {"reference": _load_reference, "torchvision": _load_torchvision, "timm": _load_timm, "hf": _load_hf,
            "open_clip": _load_open_clip, "entry_point": _load_entry_point}


# ---------------------------------------------------------------- classes -> labels


def normalize(name: str) -> str:
    """Lowercase, `_` and `-` as spaces, spaces collapsed: `Great_White-shark` -> `great white shark`."""
    return " ".join(re.sub(r"[_\-]", " ", str(name)).lower().split())


def _synonyms(label: str) -> list[str]:
    return [s for s in (normalize(x) for x in label.split(",")) if s]


def _named(labels: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """(label names, wnids or None): wnid labels (an HF id2label, say) get their ImageNet names,
    and labels that are exactly the ImageNet-1k names get their wnids."""
    labels = list(labels)
    by_wnid = {c.wnid: c.name for c in imagenet_classes()}
    if labels and all(is_wnid(x) for x in labels):
        return [by_wnid.get(w, w) for w in labels], labels
    if labels in ([c.name for c in imagenet_classes()], [c.short for c in imagenet_classes()]):
        return labels, list(by_wnid)
    return labels, None


def map_classes(classes: Sequence[tuple[str, str]], clf: Classifier, mapping: str | None = None) -> dict[str, int]:
    """class_key -> label index, for (class_key, display name) pairs.

    An explicit mapping file (`mapping`, else the spec's) wins; else wnids when every class is
    one and the classifier knows its labels' wnids; else the class name among each label's
    comma-separated synonyms (normalized).
    """
    classes = [(str(k), str(n)) for k, n in classes]
    mapping = mapping or clf.spec.mapping
    if mapping:
        return _map_by_file(classes, clf, mapping)
    if clf.wnids and classes and all(is_wnid(k) or is_wnid(n) for k, n in classes):
        index = {w: i for i, w in enumerate(clf.wnids)}
        out, unmatched = {}, []
        for k, n in classes:
            w = k if is_wnid(k) else n
            if w in index:
                out[k] = index[w]
            else:
                unmatched.append(k)
        if unmatched:
            raise ValueError(f"classifier '{clf.name}': classes {unmatched} are wnids its labels do not have; "
                             f"add mapping: a file mapping each class to a label ({clf.spec.setting('mapping')})")
        return out
    return _map_by_name(classes, clf)


class _LabelIndex:
    """Labels by normalized name, for matching class names: whole name, first synonym, any synonym."""

    def __init__(self, labels: Sequence[str]):
        self.by = ({}, {}, {})
        for i, label in enumerate(labels):
            syn = _synonyms(label)
            keys = ([normalize(label)], syn[:1], list(dict.fromkeys(syn)))
            for table, names in zip(self.by, keys):
                for name in names:
                    table.setdefault(name, []).append(i)

    def tiers(self, name: str) -> list[list[int]]:
        """The labels `name` matches, best tier first."""
        name = normalize(name)
        return [table[name] for table in self.by if name in table]


def _map_by_name(classes, clf: Classifier) -> dict[str, int]:
    index = _LabelIndex(clf.labels)
    by_name: dict[str, list[str]] = {}
    for k, n in classes:
        by_name.setdefault(normalize(n), []).append(k)
    out, unmatched, ambiguous = {}, [], []
    for k, n in classes:
        tiers, same = index.tiers(n), by_name[normalize(n)]
        if not tiers:
            tiers, same = index.tiers(k), [k]
        if not tiers:
            unmatched.append((k, n))
            continue
        # Repeated names pair up in order with as many labels (ImageNet's two "crane"s and two
        # "maillot"s; open_clip's labels are the class names); a lone name needs a unique best match.
        found = next((t for t in tiers if len(t) == len(same)), None)
        if found is None:
            ambiguous.append(f"{k}: {', '.join(f'{i} {clf.labels[i]!r}' for i in tiers[0][:5])}")
        else:
            out[k] = found[same.index(k)]
    hint = f"add mapping: a file mapping each class to a label name or index ({clf.spec.setting('mapping')})"
    if unmatched:
        every = sorted({s for x in clf.labels for s in _synonyms(x)})
        near = []
        for k, n in unmatched[:10]:
            close = difflib.get_close_matches(normalize(n), every, n=3, cutoff=0.3)
            near.append(f"{n}: {', '.join(close) if close else '(none close)'}")
        more = f" (and {len(unmatched) - 10} more)" if len(unmatched) > 10 else ""
        raise ValueError(f"classifier '{clf.name}': classes {[k for k, _ in unmatched]} match no label; nearest "
                         f"labels: {'; '.join(near)}{more}; {hint}")
    if ambiguous:
        raise ValueError(f"classifier '{clf.name}': classes match several labels: {'; '.join(ambiguous)}; {hint}")
    return out


def _read_mapping(path: Path) -> dict[str, object]:
    text = path.read_text()
    if path.suffix in (".csv", ".tsv"):
        rows = [r for r in csv.reader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ",") if r]
        if any(len(r) != 2 for r in rows):
            raise ValueError(f"mapping file {path} must have two columns per row: class,label")
        if rows and [c.strip().lower() for c in rows[0]] == ["class", "label"]:
            rows = rows[1:]  # a header
        return {c.strip(): lab.strip() for c, lab in rows}
    import yaml

    data = yaml.safe_load(text)  # JSON is YAML too
    if not isinstance(data, dict):
        raise ValueError(f"mapping file {path} must hold a mapping of class -> label")
    return {str(c): lab for c, lab in data.items()}


def _label_index(label, clf: Classifier) -> int | None:
    if isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
        i = int(label)
        return i if 0 <= i < len(clf.labels) else None
    if label in clf.labels:
        return clf.labels.index(label)
    if clf.wnids and label in clf.wnids:
        return clf.wnids.index(label)
    tiers = _LabelIndex(clf.labels).tiers(label)
    return tiers[0][0] if tiers and len(tiers[0]) == 1 else None


def _map_by_file(classes, clf: Classifier, mapping: str) -> dict[str, int]:
    path = Path(mapping)
    if not path.is_file():
        raise FileNotFoundError(f"classifier '{clf.name}': mapping file {path} does not exist "
                                f"(set {clf.spec.setting('mapping')})")
    table = _read_mapping(path)
    known = {k for k, _ in classes} | {n for _, n in classes}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"classifier '{clf.name}': mapping file {path} names classes the dataset does not have: "
                         f"{unknown}; the classes are {[k for k, _ in classes]}")
    out, missing, bad = {}, [], []
    for k, n in classes:
        label = table.get(k, table.get(n))
        if label is None:
            missing.append(k)
            continue
        i = _label_index(label, clf)
        if i is None:
            bad.append(f"{k}: {label!r}")
        else:
            out[k] = i
    if missing:
        raise ValueError(f"classifier '{clf.name}': mapping file {path} lacks classes {missing}; map every class")
    if bad:
        raise ValueError(f"classifier '{clf.name}': mapping file {path} maps to labels the classifier does not have "
                         f"(a label name or an index 0..{len(clf.labels) - 1}): {'; '.join(bad)}")
    return out


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    near = difflib.get_close_matches(name.lower(), list(known), n=3)
    return f"; did you mean {', '.join(near)}?" if near else ""


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:500]}{'...' if len(msg) > 500 else ''}"
