"""Class folders (torchvision ImageFolder layout) and their partition keys."""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

# Every key that names a partition and a folder (class, shift, classifier) has this one alphabet: no
# separator, no "..", no "|" (MultiPartitions' separator), no quote, nothing a shell or SQL must escape.
KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,99}")
_FORBIDDEN = re.compile(r"[^a-z0-9_.\-]+")


def check_key(kind: str, key) -> str:
    """`key` if it is a safe partition and folder name, else one clear ValueError."""
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise ValueError(f"{kind} {key!r} is not a valid key: use 1-100 characters of a-z, 0-9, _ . - "
                         "starting with a letter or digit (keys name partitions and folders)")
    return key


def class_key(name: str) -> str:
    """A partition-safe key for a class folder name: `hot dog, frank|2` -> `hot_dog_frank_2`."""
    key = _FORBIDDEN.sub("_", name.strip().lower()).strip("_.-")
    if not key:
        raise ValueError(f"class name {name!r} gives an empty key; rename the folder with letters or digits")
    if len(key) > 100:
        raise ValueError(f"class folder name {name[:40]!r}... is too long for a key (over 100 characters); shorten it")
    return check_key("class key", key)


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


# The last listing per dataset folder in this process, with the folder's own stat: an update asks for the
# classes in each of its steps (7 times), and at ImageNet-21k a listing is 21,000 entries.
_LISTED: dict[str, tuple[tuple, list[ClassFolder]]] = {}


def discover_classes(dataset_root: str | Path) -> list[ClassFolder]:
    """Every sub-folder of `dataset_root` is a class; keys must be unique.

    The folder is listed again only when its own file_signature (size, mtime, ctime, inode) differs from the last
    listing's in this process: adding, removing or renaming a class folder changes its mtime. A listing
    taken within a clock tick of the folder's last change is not kept (a change in the same tick could
    keep the mtime), as observe.without_racy does for files; nor is one of a folder holding a link,
    whose target can come or go without the dataset folder changing."""
    from .observe import file_signature, without_racy

    root = Path(dataset_root)
    start = time.time_ns()
    try:
        st = os.stat(root)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"dataset folder {root} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"dataset {root} is a file, not a folder of class folders")
    signature = file_signature(st)
    last = _LISTED.get(str(root))
    if last is not None and last[0] == signature:
        return list(last[1])
    classes, linked = _list_classes(root)
    if not linked and without_racy({root: signature}, start)[root]:
        _LISTED[str(root)] = (signature, classes)
    else:
        _LISTED.pop(str(root), None)
    return list(classes)


def _list_classes(root: Path) -> tuple[list[ClassFolder], bool]:
    """The class folders, and whether the dataset folder holds a link (to a folder or not, or broken)."""
    found: dict[str, ClassFolder] = {}
    # os.scandir: its entries know whether they are folders without a stat each (a link is followed),
    # and names sort as strings; iterdir, is_dir and sorting Paths cost twice as much at 1,000 classes
    with os.scandir(root) as entries:
        listed = [(e.name, e.is_dir(), e.is_symlink()) for e in entries if not e.name.startswith(".")]
    names = sorted(name for name, folder, _ in listed if folder)
    for name in names:
        sub = root / name
        c = ClassFolder(key=class_key(name), name=display_name(name), path=sub)
        if c.key in found:
            raise ValueError(
                f"class folders {found[c.key].path.name!r} and {sub.name!r} both map to key {c.key!r}; rename one"
            )
        found[c.key] = c
    return list(found.values()), any(link for _, _, link in listed)
