"""Project settings: which dataset, where to store, which models, shifts and hyperparameters.

Read from a YAML file named by `--config` or the DI_ASSETS_CONFIG environment variable;
everything has a default that runs the bundled example on the embedded tiny models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

PACKAGE_DIR = Path(__file__).parent
EXAMPLE_DATASET = PACKAGE_DIR / "example_data"


def default_storage() -> Path:
    if os.environ.get("DI_ASSETS_STORAGE"):
        return Path(os.environ["DI_ASSETS_STORAGE"])
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"]) / "di_storage"
    return Path.cwd() / ".di_storage"


@dataclass
class Settings:
    dataset: str = str(EXAMPLE_DATASET)
    storage: str = field(default_factory=lambda: str(default_storage()))
    # ModelSpec fields: family, diffusion, clip_model, clip_pretrained, device, dtype
    models: dict = field(default_factory=lambda: {"family": "tiny"})
    # None: base + the 23 ImageNet* shifts; or a list of keys / {key, prompt, caption}; or a file
    shifts: list | str | None = None
    textual_inversion: dict = field(default_factory=dict)  # TextualInversionConfig overrides
    generation: dict = field(default_factory=dict)  # num_samples, seed + GenerationConfig overrides
    scoring: dict = field(default_factory=dict)  # the CLIP filter: see defs.resources.ScoringParams
    # Classifiers under diagnosis (see di_assets.ml.classifiers.ClassifierSpec); None: the family's
    # default (tiny: the reference world's `diagnosed` and `judge`; sd: none); []: no diagnosis.
    classifiers: list | None = None
    # Also generate and score every class and shift with the class name in place of the token (the
    # paper's `use_token=False` baseline), under <storage>/baseline/; views baseline_scores, token_vs_name.
    baseline: bool = False
    observe_cron: str = "0 * * * *"  # when the schedule observes the dataset folder (hourly)
    removed_classes: str = "trash"  # a removed class's files: "trash" (storage/trash/) or "delete"

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides) -> "Settings":
        path = path or os.environ.get("DI_ASSETS_CONFIG")
        data: dict = {}
        if path:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"config file {p} does not exist")
            data = yaml.safe_load(p.read_text()) or {}
            known = {f.name for f in fields(cls)}
            unknown = set(data) - known
            if unknown:
                raise ValueError(f"{p}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
            # relative paths in a config file are relative to the file
            for k in ("dataset", "storage"):
                if k in data and not Path(data[k]).is_absolute():
                    data[k] = str((p.parent / data[k]).resolve())
            if isinstance(data.get("shifts"), str) and not Path(data["shifts"]).is_absolute():
                data["shifts"] = str((p.parent / data["shifts"]).resolve())
            if isinstance(data.get("classifiers"), list):
                data["classifiers"] = [_resolve_classifier_paths(c, p.parent) for c in data["classifiers"]]
        data.update({k: v for k, v in overrides.items() if v is not None})
        s = cls(**data)
        s.dataset = str(Path(s.dataset).resolve())
        s.storage = str(Path(s.storage).resolve())
        return s

    def classifier_specs(self) -> list:
        from di_assets.ml.classifiers import ClassifierSpec

        items = self.classifiers
        if items is None:
            family = self.models.get("family", "tiny")
            items = DEFAULT_CLASSIFIERS if family == "tiny" else []
        if not isinstance(items, list):
            raise ValueError(f"classifiers must be a list of {{name, kind, ...}} entries, not {items!r}")
        specs = [ClassifierSpec.from_dict(
            {"family": self.models.get("family", "tiny"), "device": self.models.get("device", "auto"), **item}) for item in items]
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"classifier names must be unique; repeated: {dupes}")
        return specs


def _resolve_classifier_paths(item, base: Path):
    """A classifier's local files, relative to the settings file (an open_clip tag stays a tag)."""
    from di_assets.ml.classifiers import LOCAL_WEIGHTS

    if not isinstance(item, dict):
        return item
    item = dict(item)
    for key in ("weights", "labels", "mapping"):
        value = item.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = base / value
            if key != "weights" or item.get("kind") in LOCAL_WEIGHTS or candidate.exists():
                item[key] = str(candidate.resolve())
    return item


# The embedded default's models under diagnosis: the reference world's shape classifier trained on
# grass and beach only (its planted failure is at night and in the water), and the judge trained on
# every context (no failure to find).
DEFAULT_CLASSIFIERS = [
    {"name": "diagnosed", "kind": "reference", "model": "diagnosed"},
    {"name": "judge", "kind": "reference", "model": "judge"},
]
