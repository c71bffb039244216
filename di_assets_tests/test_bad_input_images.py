"""Dataset images load as a viewer shows them; bad files are skipped with one warning each."""

import builtins
import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from di_assets.ml.io import describe_folder, hash_folder, load_class_images, open_rgb

WHITE = (255, 255, 255)


def _save(im: Image.Image, path: Path, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def _good(folder: Path, n: int = 2) -> list[Path]:
    return [_save(Image.new("RGB", (16, 16), (40 * i, 90, 200)), folder / f"good{i}.png", "PNG") for i in range(n)]


# ---- colour and orientation ------------------------------------------------------------------

def test_16bit_grey_png_loads_mid_grey_not_white(tmp_path):
    p = _save(Image.new("I;16", (8, 8), 32896), tmp_path / "c" / "grey16.png", "PNG")  # 128 * 257
    assert Image.open(p).mode.startswith("I")
    (im,) = load_class_images(tmp_path / "c")
    assert im.mode == "RGB"
    assert np.asarray(im).mean() == pytest.approx(128, abs=1)


def test_exif_rotated_jpeg_loads_as_displayed(tmp_path):
    # Stored 64x32, blue, with a red 8x8 block at the top-left; Orientation 6 means "rotate 90
    # degrees clockwise to display": shown 32x64, the block at the top-right.
    a = np.zeros((32, 64, 3), np.uint8)
    a[...] = (0, 0, 255)
    a[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(Image.fromarray(a), tmp_path / "rot.jpg", "JPEG", exif=exif, quality=95)
    im = open_rgb(p)
    assert im.size == (32, 64)
    r, g, b = im.getpixel((28, 3))  # top-right corner
    assert r > 200 and b < 60
    r, g, b = im.getpixel((3, 3))  # top-left corner: blue
    assert b > 200 and r < 60


def _palette(colours):
    im = Image.new("P", (8, 8), 1)
    im.putpalette([c for rgb in colours for c in rgb] + [0] * (768 - 3 * len(colours)))
    return im


def _half(mode, left, right):
    """An 8x8 image of `mode`: `left` in columns 0-3, `right` in 4-7."""
    im = Image.new(mode, (8, 8), right)
    im.paste(left, (0, 0, 4, 8))
    return im


def _animated_gif(path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _animated_webp(path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)


# mode, file, how to make it, {pixel: expected RGB}
P_TRNS = _palette([(0, 0, 0), (220, 20, 30)])
P_TRNS.paste(0, (0, 0, 4, 8))
MODES = [
    ("1", "png", lambda: Image.new("1", (8, 8), 1), {(1, 1): WHITE}),
    ("L", "png", lambda: Image.new("L", (8, 8), 100), {(1, 1): (100, 100, 100)}),
    ("P", "png", lambda: _palette([(0, 0, 0), (200, 30, 40)]), {(1, 1): (200, 30, 40)}),
    # index 0 is transparent (black underneath): shown on white
    ("P+tRNS", "png", lambda: P_TRNS, {(1, 1): WHITE, (6, 1): (220, 20, 30)}),
    ("LA", "png", lambda: _half("LA", (0, 0), (90, 255)), {(1, 1): WHITE, (6, 1): (90, 90, 90)}),
    ("RGB", "png", lambda: Image.new("RGB", (8, 8), (10, 20, 30)), {(1, 1): (10, 20, 30)}),
    ("RGBA", "png", lambda: _half("RGBA", (0, 0, 0, 0), (0, 0, 255, 255)), {(1, 1): WHITE, (6, 1): (0, 0, 255)}),
    ("CMYK", "tiff", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), {(1, 1): (255, 0, 0)}),
    ("I", "tiff", lambda: Image.new("I", (8, 8), 32896), {(1, 1): (128, 128, 128)}),
    ("I;16", "png", lambda: Image.new("I;16", (8, 8), 32896), {(1, 1): (128, 128, 128)}),
    ("I;16B", "tiff", lambda: Image.new("I;16B", (8, 8), 32896), {(1, 1): (128, 128, 128)}),
    ("F", "tiff", lambda: Image.new("F", (8, 8), 0.5), {(1, 1): (128, 128, 128)}),
    ("YCbCr", "tiff", lambda: Image.new("YCbCr", (8, 8), (100, 128, 128)), {(1, 1): (100, 100, 100)}),
    ("GIF", "gif", None, {(1, 1): (255, 0, 0)}),  # animated: the first frame
    ("WEBP", "webp", None, {(1, 1): (255, 0, 0)}),
]


@pytest.mark.parametrize("mode,ext,make,expected", MODES, ids=[m[0] for m in MODES])
def test_every_mode_loads_as_rgb_with_its_colour(tmp_path, mode, ext, make, expected):
    p = tmp_path / f"img.{ext}"
    if mode == "GIF":
        _animated_gif(p)
    elif mode == "WEBP":
        _animated_webp(p)
    else:
        im = make()
        kw = {"transparency": 0} if mode == "P+tRNS" else {}
        _save(im, p, ext.upper(), **kw)
        if mode != "P+tRNS":
            assert Image.open(p).mode == mode  # the file really holds that mode
    for im in (open_rgb(p), open_rgb(io.BytesIO(p.read_bytes()))):
        assert im.mode == "RGB" and im.size == (8, 8)
        for xy, rgb in expected.items():
            assert im.getpixel(xy) == pytest.approx(rgb, abs=2), (mode, xy)


# ---- bad files ---------------------------------------------------------------------------------

def _noise(size=(48, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))


def _bad_files(folder: Path) -> dict[str, str]:
    """One file of each bad kind; name -> the reason its warning gives."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")
    for ext, fmt in (("png", "PNG"), ("jpg", "JPEG")):
        b = io.BytesIO()
        _noise().save(b, fmt)
        (folder / f"truncated.{ext}").write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
    _save(_noise((64, 64)), folder / "bomb.png", "PNG")  # over the (lowered) pixel limit
    return {"empty.png": "empty file", "notes.png": "not an image", "truncated.png": "truncated",
            "truncated.jpg": "truncated", "bomb.png": "pixel limit"}


@pytest.fixture
def small_pixel_limit(monkeypatch):
    # Pillow refuses images over 2x MAX_IMAGE_PIXELS: 64x64 = 4096 > 2 * 1000, while 16x16 passes.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


def _warnings_about(caplog, name):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "di_assets" and name in r.getMessage()]


def test_bad_files_are_skipped_with_one_warning_each(tmp_path, caplog, small_pixel_limit):
    folder = tmp_path / "cls"
    good = _good(folder)
    bad = _bad_files(folder)
    with caplog.at_level(logging.WARNING, logger="di_assets"):
        files, images = load_class_images(folder, with_files=True)
    assert files == good and len(images) == 2
    for name, reason in bad.items():
        (msg,) = _warnings_about(caplog, name)
        assert str(folder / name) in msg and reason in msg and "\n" not in msg
    # the observation counts the same files as skipped (decoded, not only the header)
    d = describe_folder(folder)
    assert d["images"] == 2 and sorted(d["skipped"]) == sorted(bad)


def test_a_folder_of_bad_files_only_gives_the_one_line_error(tmp_path, caplog, small_pixel_limit):
    folder = tmp_path / "cls"
    _bad_files(folder)
    with pytest.raises(ValueError, match=r"^class folder .*cls has no readable images; add .jpg/.png files") as e:
        load_class_images(folder)
    assert "\n" not in str(e.value)


def _old_hash(folder: Path) -> str:
    """hash_folder before this change: data versions of readable folders must not move."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel).encode())
        h.update(b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def test_hash_of_a_readable_folder_is_unchanged(tmp_path):
    folder = tmp_path / "cls"
    _good(folder, 3)
    _save(_noise(), folder / "sub" / "x.png", "PNG")
    (folder / ".hidden").write_text("x")
    assert hash_folder(folder) == _old_hash(folder)


# ---- unreadable files and folders ---------------------------------------------------------------

def _deny(monkeypatch, *denied: Path):
    """Simulate mode 000 on `denied` (for runs as root, which reads everything)."""
    denied = {str(p) for p in denied}
    real_open, real_iterdir = builtins.open, Path.iterdir

    def fake_open(file, *a, **kw):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *a, **kw)

    def fake_iterdir(self):
        if str(self) in denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(Path, "iterdir", fake_iterdir)


def _check_unreadable_file(folder, locked, caplog, unlock):
    with caplog.at_level(logging.WARNING, logger="di_assets"):
        h = hash_folder(folder)
        d = describe_folder(folder)
        images = load_class_images(folder)
    assert len(images) == 2 and d["images"] == 2 and d["skipped"] == [locked.name]
    assert d["hash"] == h
    msgs = _warnings_about(caplog, locked.name)
    assert msgs and all("permission denied" in m for m in msgs)
    unlock()
    assert hash_folder(folder) != h  # fixing the permission changes the data version


def test_unreadable_file_is_skipped_not_a_traceback_simulated(tmp_path, caplog, monkeypatch):
    folder = tmp_path / "cls"
    _good(folder)
    locked = _save(_noise(), folder / "locked.png", "PNG")
    _deny(monkeypatch, locked)
    _check_unreadable_file(folder, locked, caplog, monkeypatch.undo)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files of mode 000")
def test_unreadable_file_is_skipped_not_a_traceback(tmp_path, caplog):
    folder = tmp_path / "cls"
    _good(folder)
    locked = _save(_noise(), folder / "locked.png", "PNG")
    locked.chmod(0)
    try:
        _check_unreadable_file(folder, locked, caplog, lambda: locked.chmod(0o644))
    finally:
        locked.chmod(0o644)


def _check_unreadable_folder(folder):
    for f in (hash_folder, describe_folder, load_class_images):
        with pytest.raises(PermissionError, match=r"^cannot read class folder .*cls: permission denied; "
                                                  r"fix its permissions or remove it$"):
            f(folder)


def test_unreadable_class_folder_gives_one_line_simulated(tmp_path, monkeypatch):
    folder = tmp_path / "cls"
    _good(folder)
    _deny(monkeypatch, folder)
    _check_unreadable_folder(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders of mode 000")
def test_unreadable_class_folder_gives_one_line(tmp_path):
    folder = tmp_path / "cls"
    _good(folder)
    folder.chmod(0)
    try:
        _check_unreadable_folder(folder)
    finally:
        folder.chmod(0o755)
