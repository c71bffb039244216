"""The 1000 ImageNet-1k classes: index, WordNet id and name, in the standard order.

`imagenet_classes.tsv` was made once from timm's data/_info files, ImageNet-1k standard order
(`imagenet_synsets.txt` for the wnids, `imagenet_synset_to_lemma.txt` for the names). Its order
agrees with torchvision's `_IMAGENET_CATEGORIES`, which only renames two repeated first
synonyms (134 "crane bird", 639 "maillot tank suit"). A name is the full WordNet lemma:
comma-separated synonyms, e.g. "tench, Tinca tinca".
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).with_name("imagenet_classes.tsv")
_WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class ImageNetClass:
    index: int
    wnid: str
    name: str  # all synonyms, comma-separated

    @property
    def short(self) -> str:
        """The first synonym: `tench`."""
        return self.name.split(",")[0].strip()


def imagenet_classes() -> list[ImageNetClass]:
    return list(_read_table())  # a copy: the cached table stays unchanged


@functools.lru_cache(maxsize=1)
def _read_table() -> tuple[ImageNetClass, ...]:
    lines = TABLE.read_text().splitlines()[1:]  # skip the header
    rows = tuple(ImageNetClass(int(i), w, n) for i, w, n in (line.split("\t") for line in lines if line))
    assert [r.index for r in rows] == list(range(1000)), f"{TABLE} is not the 1000 classes in order"
    return rows


def is_wnid(s) -> bool:
    """A WordNet noun id as ImageNet uses them: `n` and 8 digits (`n01440764`)."""
    return isinstance(s, str) and _WNID.fullmatch(s) is not None
