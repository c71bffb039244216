"""The shift catalog: `base` plus the 23 ImageNet* distribution shifts.

Each shift has a prompt template with the `<TOKEN>` placeholder (the class token, or the
class name for the baseline) and a shift caption that the CLIP metric compares images with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from .classes import check_key

TOKEN = "<TOKEN>"


@dataclass(frozen=True)
class Shift:
    key: str
    prompt: str
    caption: str

    def __post_init__(self):
        check_prompt(self.prompt)


def check_prompt(prompt: str) -> str:
    if TOKEN not in prompt:
        raise ValueError(
            f"prompt {prompt!r} has no {TOKEN} placeholder; write e.g. 'a photo of a {TOKEN} in the grass'"
        )
    return prompt


def class_caption(name: str) -> str:
    """The caption a class's images are scored against (sim_class): `a photo of a dog`."""
    return f"a photo of a {name}"


def _s(key: str, prompt: str, caption: str) -> Shift:
    return Shift(key, prompt.replace("{}", TOKEN), caption)


IMAGENET_STAR: tuple[Shift, ...] = (
    _s("base", "a photo of a {}", "a photo"),
    _s("in_the_grass", "a photo of a {} in the grass", "a photo in the grass"),
    _s("in_the_beach", "a photo of a {} on the beach", "a photo on the beach"),
    _s("in_the_forest", "a photo of a {} in the forest", "a photo in the forest"),
    _s("in_the_water", "a photo of a {} in the water", "a photo in the water"),
    _s("on_the_road", "a photo of a {} on the road", "a photo on the road"),
    _s("on_the_rocks", "a photo of a {} on the rocks", "a photo on the rocks"),
    _s("in_the_snow", "a photo of a {} in the snow", "a photo in the snow"),
    _s("in_the_rain", "a photo of a {} in the rain", "a photo in the rain"),
    _s("in_the_fog", "a photo of a {} in the fog", "a photo in the fog"),
    _s("and_a_flower", "a photo of a {} and a flower", "a photo of a flower"),
    _s("pencil_sketch", "a pencil sketch of a {}", "a pencil sketch"),
    _s("in_bright_sunlight", "a photo of a {} in bright sunlight", "a photo in bright sunlight"),
    _s("at_night", "a photo of a {} at night", "a photo at night"),
    _s("at_dusk", "a photo of a {} at dusk", "a photo at dusk"),
    _s("studio_lighting", "a photo of a {} in studio lighting", "a photo in studio lighting"),
    _s("blue", "a photo of a blue {}", "a photo of something blue"),
    _s("green", "a photo of a green {}", "a photo of something green"),
    _s("red", "a photo of a red {}", "a photo of something red"),
    _s("yellow", "a photo of a yellow {}", "a photo of something yellow"),
    _s("orange", "a photo of an orange {}", "a photo of something orange"),
    _s("person_and_a", "a photo of a person and a {}", "a photo of a person"),
    _s("oil_painting", "an oil painting of a {}", "an oil painting"),
    _s("embroidery", "an embroidery of a {}", "an embroidery"),
)

CATALOG: dict[str, Shift] = {s.key: s for s in IMAGENET_STAR}


def select_shifts(spec=None) -> list[Shift]:
    """Resolve a shift selection from config.

    `spec` is None (the whole ImageNet* catalog), a list whose items are catalog keys or
    `{key, prompt, caption}` mappings, or a path to a YAML/JSON file holding such a list.
    """
    if spec is None:
        return list(IMAGENET_STAR)
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"shift catalog file {path} does not exist")
        spec = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    shifts: list[Shift] = []
    for item in spec:
        if isinstance(item, str):
            if item not in CATALOG:
                raise ValueError(f"unknown shift {item!r}; known shifts: {', '.join(CATALOG)}")
            shifts.append(CATALOG[item])
        else:
            missing = {"key", "prompt", "caption"} - set(item)
            if missing:
                raise ValueError(f"shift {item!r} lacks {sorted(missing)}; each needs key, prompt and caption")
            shifts.append(Shift(str(item["key"]), str(item["prompt"]), str(item["caption"])))
    keys = [s.key for s in shifts]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise ValueError(f"shift keys must be unique; repeated: {sorted(dupes)}")
    for k in keys:
        check_key("shift key", k)
    return shifts


def shifts_as_dicts(shifts: list[Shift]) -> list[dict]:
    return [asdict(s) for s in shifts]
