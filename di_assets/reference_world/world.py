"""Draw the reference world: a coloured shape on a context background, with its caption.

Deterministic: the same seed draws the same image. No torch import.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "orange": (240, 140, 30), "purple": (150, 60, 190),
}
# The text-to-image model never sees this shape's word: its images are captioned GENERIC_WORD,
# so only textual inversion can name it (issue 5's gate, `inversion_gate`).
HIDDEN_SHAPE = "star"
GENERIC_WORD = "thing"
# context key -> the words after the object in a caption; "plain" is the base context
CONTEXTS = {
    "plain": "", "grass": "in the grass", "snow": "in the snow", "beach": "on the beach",
    "water": "in the water", "night": "at night",
}


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    context: str

    @property
    def caption(self) -> str:
        tail = CONTEXTS[self.context]
        return f"a photo of a {self.colour} {self.shape}" + (f" {tail}" if tail else "")


def _background(context: str, rng: random.Random) -> Image.Image:
    def jitter(rgb, k=12):
        return tuple(max(0, min(255, c + rng.randint(-k, k))) for c in rgb)

    base = {"plain": (200, 200, 200), "grass": (70, 140, 50), "snow": (235, 238, 245),
            "beach": (225, 200, 140), "water": (40, 100, 170), "night": (15, 20, 45)}[context]
    im = Image.new("RGB", (SIZE, SIZE), jitter(base))
    d = ImageDraw.Draw(im)
    if context == "grass":  # blades
        for _ in range(70):
            x, y = rng.randrange(SIZE), rng.randrange(SIZE)
            d.line([(x, y), (x + rng.randint(-2, 2), y - rng.randint(3, 7))], fill=jitter((40, 110, 30), 20))
    elif context == "snow":  # flakes and a grey horizon
        d.rectangle([0, 0, SIZE, rng.randint(10, 20)], fill=jitter((170, 180, 195)))
        for _ in range(60):
            x, y = rng.randrange(SIZE), rng.randrange(SIZE)
            d.point((x, y), fill=(255, 255, 255))
    elif context == "beach":  # sea at the top, grains
        d.rectangle([0, 0, SIZE, rng.randint(12, 22)], fill=jitter((60, 140, 200)))
        for _ in range(80):
            d.point((rng.randrange(SIZE), rng.randrange(SIZE)), fill=jitter((190, 165, 110), 15))
    elif context == "water":  # waves
        for y in range(4, SIZE, 7):
            off = rng.randint(0, 6)
            d.line([(x, y + 2 * math.sin((x + off) / 3)) for x in range(0, SIZE, 2)], fill=jitter((90, 150, 210)))
    elif context == "night":  # stars and a moon
        for _ in range(25):
            d.point((rng.randrange(SIZE), rng.randrange(SIZE)), fill=(230, 230, 200))
        mx, my = rng.randint(4, 20), rng.randint(4, 14)
        d.ellipse([mx, my, mx + 8, my + 8], fill=(235, 235, 200))
    return im


def _shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        pts = [(cx + (r if i % 2 == 0 else r * 0.42) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r * 0.42) * math.cos(i * math.pi / 5)) for i in range(10)]
        d.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.35
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif shape == "heart":
        q = r * 0.5
        d.ellipse([cx - r, cy - r * 0.7, cx, cy - r * 0.7 + 2 * q + 2], fill=fill)
        d.ellipse([cx, cy - r * 0.7, cx + r, cy - r * 0.7 + 2 * q + 2], fill=fill)
        d.polygon([(cx - r * 0.97, cy - r * 0.2), (cx + r * 0.97, cy - r * 0.2), (cx, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def draw(item: Item, rng: random.Random) -> Image.Image:
    """One image of `item`: size, position and colour vary with `rng`."""
    im = _background(item.context, rng)
    d = ImageDraw.Draw(im)
    # sizes and positions vary around the centre, not over the whole frame: a model this small
    # learns outlines it can place, and the object stays clear of the horizon band
    r = rng.uniform(15, 21)
    cx, cy = SIZE / 2 + rng.uniform(-6, 6), SIZE / 2 + 3 + rng.uniform(-5, 5)
    colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[item.colour])
    if item.context == "night":  # things are darker at night
        colour = tuple(int(c * 0.6) for c in colour)
    _shape(d, item.shape, cx, cy, r, colour)
    return im.filter(ImageFilter.SMOOTH) if rng.random() < 0.5 else im


def random_item(rng: random.Random, shapes=SHAPES, colours=tuple(COLOURS), contexts=tuple(CONTEXTS)) -> Item:
    """One item drawn uniformly over the given shapes, colours and contexts."""
    return Item(rng.choice(shapes), rng.choice(colours), rng.choice(contexts))


def sample(n: int, seed: int, shapes=SHAPES, colours=tuple(COLOURS), contexts=tuple(CONTEXTS)):
    """`n` (item, image) pairs drawn uniformly over the given shapes, colours and contexts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        item = random_item(rng, shapes, colours, contexts)
        out.append((item, draw(item, rng)))
    return out
