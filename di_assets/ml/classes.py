"""Class folders (torchvision ImageFolder layout) and their partition keys."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Dagster partition keys may not contain these; MultiPartitions uses "|" as its separator.
_FORBIDDEN = re.compile(r"[^A-Za-z0-9_.\-]+")


def class_key(name: str) -> str:
    """A partition-safe key for a class folder name: `hot dog, frank|2` -> `hot_dog_frank_2`."""
    key = _FORBIDDEN.sub("_", name.strip()).strip("_").lower()
    if not key:
        raise ValueError(f"class name {name!r} gives an empty key; rename the folder with letters or digits")
    return key


def display_name(folder_name: str) -> str:
    """The natural-language class name used in captions: underscores read as spaces."""
    return " ".join(folder_name.replace("_", " ").split())


@dataclass(frozen=True)
class ClassFolder:
    key: str
    name: str
    path: Path

    @property
    def token(self) -> str:
        return f"<{self.key}>"


def discover_classes(dataset_root: str | Path) -> list[ClassFolder]:
    """Every sub-folder of `dataset_root` is a class; keys must be unique."""
    root = Path(dataset_root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    found: dict[str, ClassFolder] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        c = ClassFolder(key=class_key(sub.name), name=display_name(sub.name), path=sub)
        if c.key in found:
            raise ValueError(
                f"class folders {found[c.key].path.name!r} and {sub.name!r} both map to key {c.key!r}; rename one"
            )
        found[c.key] = c
    return list(found.values())
