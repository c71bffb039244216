"""Project settings: which dataset, where to store, which models, shifts and hyperparameters.

Read from a YAML file named by `--config` or the DI_ASSETS_CONFIG environment variable;
everything has a default that runs the bundled example on the embedded tiny models.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

PACKAGE_DIR = Path(__file__).parent
EXAMPLE_DATASET = PACKAGE_DIR / "example_data"
GRAINS = ("class_shift", "class")  # partition_grain: what one partition of counterfactuals and scores holds


def default_storage() -> Path:
    if os.environ.get("DI_ASSETS_STORAGE"):
        return Path(os.environ["DI_ASSETS_STORAGE"])
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"]) / "di_storage"
    return Path.cwd() / ".di_storage"


class SettingsError(ValueError):
    """A setting that cannot work, in one line: the file, the setting's path, what is wrong and what is allowed."""


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
    # counterfactuals, scores and predictions partitioned by class x shift (the default), or by class
    # only (one partition makes all of a class's shifts: ImageNet-21k stays within Dagster's
    # recommended 100,000 partitions per asset)
    partition_grain: str = "class_shift"
    source = None  # not a setting: where the settings came from (a file, the command line), for error messages

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides) -> "Settings":
        """The settings of `path` (else $DI_ASSETS_CONFIG, else the defaults) with `overrides`, checked
        whole (`validate`): a SettingsError names the first problem before any work starts."""
        path = path or os.environ.get("DI_ASSETS_CONFIG")
        data: dict = {}
        if path:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"config file {p} does not exist")
            try:
                data = yaml.safe_load(p.read_text())
            except yaml.YAMLError as exc:
                raise SettingsError(f"{p}: not valid YAML: {_yaml_problem(exc)}") from None
            if data is None:
                data = {}
            if not isinstance(data, dict):
                raise SettingsError(f"{p}: the file should hold a mapping of settings (dataset: ..., storage: ...), "
                                    f"not a {type(data).__name__}")
            _check_keys(str(p), "", data, [f.name for f in fields(cls)])
            # relative paths in a config file are relative to the file
            for k in ("dataset", "storage"):
                if isinstance(data.get(k), str) and not Path(data[k]).is_absolute():
                    data[k] = str((p.parent / data[k]).resolve())
            if isinstance(data.get("shifts"), str) and not Path(data["shifts"]).is_absolute():
                data["shifts"] = str((p.parent / data["shifts"]).resolve())
            if isinstance(data.get("classifiers"), list):
                data["classifiers"] = [_resolve_classifier_paths(c, p.parent) for c in data["classifiers"]]
            models = data.get("models")
            if isinstance(models, dict):  # `./models/sd`, as a path (a Hub id or a tag stays as it is)
                data["models"] = {k: str((p.parent / v).resolve()) if k in ("diffusion", "clip_pretrained")
                                  and isinstance(v, str) and v.startswith(("./", "../")) else v
                                  for k, v in models.items()}
        data.update({k: v for k, v in overrides.items() if v is not None})
        _check_keys(str(path) if path else None, "", data, [f.name for f in fields(cls)])
        s = cls(**data)
        s.source = str(path) if path else None
        s.validate()
        s.dataset = str(Path(s.dataset).resolve())
        s.storage = str(Path(s.storage).resolve())
        return s

    def validate(self) -> "Settings":
        """Check every setting before any work: unknown keys at every depth (with the nearest known
        key), types and ranges. The sections are checked by the pydantic configs that run them
        (`di_assets.defs.resources`), shifts by `select_shifts`, classifiers by `ClassifierSpec`.

        Raises a SettingsError, one line, at the first problem; returns self when all is well.
        Paths are not checked here (a dataset may appear later); the CLI checks them before a run.
        """
        from di_assets.defs.resources import (
            GenerationParams,
            ModelResource,
            ScoringParams,
            StorageResource,
            TextualInversionParams,
        )

        src = self.source
        for name in ("dataset", "storage"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise _error(src, name, f"should be a folder path, got {value!r}")
        _check_config(src, "models", self.models, ModelResource)
        self._check_shifts()
        _check_config(src, "textual_inversion", self.textual_inversion, TextualInversionParams)
        _check_config(src, "generation", self.generation, GenerationParams)
        _check_config(src, "scoring", self.scoring, ScoringParams)
        self._check_classifiers()
        if not isinstance(self.baseline, bool):
            raise _error(src, "baseline", f"should be true or false, got {self.baseline!r}")
        if not isinstance(self.observe_cron, str) or not _valid_cron(self.observe_cron):
            raise _error(src, "observe_cron", "should be a cron string of five fields (minute hour day month "
                                              f"weekday), e.g. '0 * * * *' (hourly), got {self.observe_cron!r}")
        choices = StorageResource.model_fields["removed_classes"].json_schema_extra["choices"]
        if self.removed_classes not in choices:
            raise _error(src, "removed_classes",
                         f"should be one of {', '.join(choices)}, got {self.removed_classes!r}")
        if self.partition_grain not in GRAINS:
            raise _error(src, "partition_grain",
                         f"should be one of {', '.join(GRAINS)}, got {self.partition_grain!r}")
        return self

    def _check_shifts(self) -> None:
        from di_assets.ml.shifts import CATALOG, Shift, select_shifts

        src, spec = self.source, self.shifts
        if spec is None:
            return
        items, where = spec, src
        if isinstance(spec, (str, os.PathLike)):
            path = Path(spec)
            if not path.is_file():
                raise _error(src, "shifts", f"shift catalog file {path} does not exist")
            try:  # read as select_shifts reads it
                text = path.read_text()
                items = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
            except (yaml.YAMLError, ValueError) as exc:
                problem = _yaml_problem(exc) if isinstance(exc, yaml.YAMLError) else str(exc)
                raise _error(src, "shifts", f"shift catalog file {path} cannot be read: {problem}") from None
            where = str(path)
        if not isinstance(items, list):
            raise _error(where, "shifts", "should be a list of shift keys and {key, prompt, caption} mappings, or "
                                          f"a YAML/JSON file holding one; got {items!r}")
        needed = [f.name for f in fields(Shift)]
        for i, item in enumerate(items):
            path = f"shifts[{i}]"
            if isinstance(item, str):
                if item not in CATALOG:
                    raise _error(where, path, f"unknown shift {item!r}{_nearest(item, CATALOG)}")
                continue
            if not isinstance(item, dict):
                raise _error(where, path, f"should be a shift key or a {{{', '.join(needed)}}} mapping, got {item!r}")
            _check_keys(where, path, item, needed)
            missing = [k for k in needed if k not in item]
            if missing:
                raise _error(where, path, f"lacks {', '.join(missing)}; each shift needs {', '.join(needed)}")
            for k in needed:
                if not isinstance(item[k], str):
                    raise _error(where, f"{path}.{k}", f"should be a string, got {item[k]!r}")
        try:
            select_shifts(items)
        except ValueError as exc:
            raise _error(where, "shifts", str(exc)) from None

    def _check_classifiers(self) -> None:
        from di_assets.ml.classifiers import ClassifierSpec

        src, items = self.source, self.classifiers
        if items is None:
            return
        if not isinstance(items, list):
            raise _error(src, "classifiers", f"must be a list of {{name, kind, ...}} mappings, got {items!r}")
        known = list(fields(ClassifierSpec))
        for i, item in enumerate(items):
            name = item.get("name") if isinstance(item, dict) else None
            path = f"classifiers[{name if isinstance(name, str) and name else i}]"
            if not isinstance(item, dict):
                raise _error(src, path, f"should be a mapping of {', '.join(f.name for f in known)}, got {item!r}")
            unknown = [k for k in item if k not in {f.name for f in known}]
            if unknown:  # ClassifierSpec.from_dict's check, with the nearest known key
                raise _error(src, path, f"unknown keys {', '.join(map(str, unknown))}"
                                        f"{_nearest(unknown[0], [f.name for f in known])}")
            for f in known:
                value = item.get(f.name)
                if value is not None and str(f.type).startswith("str") and not isinstance(value, str):
                    raise _error(src, f"{path}.{f.name}", f"should be a string, got {value!r}")
        try:
            self.classifier_specs()
        except (ValueError, TypeError) as exc:
            raise _error(src, "classifiers", str(exc)) from None

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


def _error(source: str | None, path: str, problem: str) -> SettingsError:
    """`<file>: <setting path>: <problem>`, one line."""
    return SettingsError(" ".join(f"{source + ': ' if source else ''}{path + ': ' if path else ''}{problem}".split()))


def _nearest(key, known) -> str:
    """`; did you mean steps?` for a typo, else the known keys."""
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(known)}"


def _check_keys(source: str | None, prefix: str, data: dict, known) -> None:
    """Every key of `data` is one of `known`: else `unknown settings key prefix.key; did you mean ...`."""
    for key in data:
        if key not in known:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise _error(source, "", f"unknown settings key {path}{_nearest(key, known)}")


def _check_config(source: str | None, prefix: str, data, config_class) -> None:
    """Build `config_class` (a pydantic config) from `data`, the settings under `prefix`; its first
    error becomes one line that names the setting, what is wrong and what is allowed."""
    from pydantic import ValidationError

    known = list(config_class.model_fields)
    if not isinstance(data, dict):
        raise _error(source, prefix, f"should be a mapping of settings ({', '.join(known)}), got {data!r}")
    _check_keys(source, prefix, data, known)
    try:
        config_class(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        path = f"{prefix}{loc}"
        field_info = config_class.model_fields.get(err["loc"][0]) if err["loc"] else None
        choices = (field_info.json_schema_extra or {}).get("choices") if field_info else None
        if err["type"] == "string_pattern_mismatch" and choices:
            what = f"should be one of {', '.join(choices)}"
        else:
            what = err["msg"].removeprefix("Input ")
            what = what[0].lower() + what[1:]
        raise _error(source, path, f"{what}, got {err['input']!r}") from None


def _valid_cron(cron: str) -> bool:
    from dagster._utils.schedules import is_valid_cron_string

    return is_valid_cron_string(cron)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what, and where (line and column, 1-based)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{problem}{where}" + (f" ({context})" if context else "")


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
