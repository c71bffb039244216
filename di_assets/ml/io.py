"""Atomic file writes, image loading and content hashing (no torch import)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger("di_assets")

MANIFEST = "manifest.json"  # a counterfactual partition's record: prompt, settings, one entry per image
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_dead_temporaries(path: Path) -> None:
    """Remove the temporaries of `path` that a killed writer left (`.<name>.tmp-<pid>-*`, and
    `.<name>.old-<pid>`): their process is gone, so no write of theirs is under way. A live writer's
    (another process, or this one) are left alone."""
    for stale in path.parent.glob(f".{glob_escape(path.name)}.[to][ml][pd]-*"):
        kind, _, rest = stale.name[len(path.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A killed run leaves at most a `.tmp-<pid>-*` file, never a half-written artifact; the next
    write of the same path removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then swap it in place of `path` (a killed
    writer's temporaries are removed by the next write of the same path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temporaries(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj, compact: bool = False) -> None:
    """`obj` as JSON, atomically: indented for people, or `compact` for the memos of tens of thousands of
    entries (the observation memo, the counted memo) that only the code reads."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=2) + "\n")


def save_image(image, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Files in `folder` that look like images by suffix, sorted (hidden files skipped)."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _bad_image_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises on a file it cannot decode (not only OSError: a broken PNG chunk is a
    SyntaxError, a decompression bomb an Exception of its own)."""
    import struct
    import zlib

    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
            Image.DecompressionBombError)


def _composite_on_white(im):
    from PIL import Image

    rgba = (im.convert("LA") if im.mode == "La" else im).convert("RGBA")  # Pillow has no La -> RGBA
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _to_8bit(im):
    """A one-band image of more than 8 bits (`I;16*`, `I`, `F`) as `L`, scaled as a viewer shows it.

    `I;16*` (16-bit PNG/TIFF): value / 257. `I` (32-bit int): 16-bit data if every value lies in
    0..65535 (Pillow reads 16-bit files as `I` too), else stretched from its min to its max.
    `F` (float): 0..1 scaled by 255, 0..255 as is, 0..65535 divided by 257, anything else (negative
    values, larger ranges) stretched from its min to its max; NaN and -inf take the smallest
    finite value, +inf the largest.
    """
    import numpy as np
    from PIL import Image

    a = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16"):
        a = a / 257.0
    else:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
        if lo >= 0 and hi <= 1 and im.mode == "F":
            a = a * 255.0
        elif lo >= 0 and hi <= 255 and im.mode == "F":
            pass
        elif lo >= 0 and hi <= 65535:
            a = a / 257.0
        else:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def open_rgb(src):
    """Open an image file (a path or a binary file object) as an 8-bit RGB image, as a viewer shows it.

    - decoded fully here, so a truncated or corrupt file raises now (one of `_bad_image_errors()`),
      not later in a model; a file over Pillow's pixel limit raises `DecompressionBombError`;
    - turned upright by its EXIF orientation (`ImageOps.exif_transpose`);
    - 16-bit, 32-bit int and float images scaled to 8 bits (not clipped: a mid-grey 16-bit PNG
      is mid-grey, not white; see `_to_8bit`);
    - transparency (`RGBA`, `LA`, `PA`, palette or grey with a transparent colour) composited on
      white, as a viewer on a white page shows it: dropping alpha would expose whatever colour
      transparent pixels hold (often black);
    - `1`, `L`, `P`, `CMYK`, `YCbCr`, ... converted by Pillow; an animated GIF/WebP/PNG gives its
      first frame.
    """
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        im.load()
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception as exc:  # unreadable EXIF: the pixels are fine, show them unrotated
            log.debug("ignoring the EXIF orientation of %s (%s)", getattr(im, "filename", src), exc)
            upright = im.copy()
        im = upright if upright is not None else im.copy()
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im)
    if "A" in im.getbands() or "a" in im.getbands() or im.info.get("transparency") is not None:
        return _composite_on_white(im)
    return im.convert("RGB")


def _skip_reason(path: Path, exc: BaseException) -> str:
    """Why a file is not a usable image, in a few words (for one warning line)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, Image.DecompressionBombError):
        return f"over Pillow's pixel limit ({str(exc).split(',')[0]})"
    if isinstance(exc, UnidentifiedImageError):
        try:
            empty = path.stat().st_size == 0
        except OSError:
            empty = False
        return "empty file" if empty else "not an image Pillow can read"
    msg = " ".join(str(exc).split())
    return f"truncated or corrupt ({exc.__class__.__name__}: {msg})" if msg else \
        f"truncated or corrupt ({exc.__class__.__name__})"


def _list_class_folder(folder: Path) -> list[Path]:
    """A class folder's visible files, sorted; one clear line when the folder cannot be listed."""
    try:
        entries = list(folder.iterdir())
    except PermissionError:
        raise PermissionError(
            f"cannot read class folder {folder}: permission denied; fix its permissions or remove it") from None
    return sorted(q for q in entries if q.is_file() and not q.name.startswith("."))


def load_class_images(folder: str | os.PathLike, with_files: bool = False, limit: int | None = None):
    """Open every readable image in a class folder as RGB (with `with_files`: (files, images);
    with `limit`: the first `limit` readable ones, by file name). Images load as `open_rgb` shows them.

    Unreadable files (not an image, empty, truncated, over Pillow's pixel limit, no permission) are
    skipped with one warning each that names the file and the reason; a folder with no usable
    image raises a ValueError that names it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"class folder {folder} does not exist")
    bad = _bad_image_errors()
    files, images = [], []
    for p in _list_class_folder(folder):
        if limit is not None and len(images) >= limit:
            break
        try:
            images.append(open_rgb(p))
            files.append(p)
        except bad as exc:
            log.warning("skipping %s: %s", p, _skip_reason(p, exc))
    if not images:
        raise ValueError(
            f"class folder {folder} has no readable images; add .jpg/.png files or remove the folder"
        )
    return (files, images) if with_files else images


def read_counterfactuals(folder: str | Path) -> tuple[dict, list]:
    """A counterfactual partition's folder: its manifest and its images (RGB), in manifest order."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    images = [open_rgb(folder / rec["file"]) for rec in manifest["images"]]
    return manifest, images


def hash_folder(folder: str | os.PathLike, warn: bool = True) -> str:
    """Content hash of a folder's visible files (names and bytes), stable across mtimes.

    A file that cannot be read counts by its name and size (with a warning unless `warn` is
    False), so fixing its permissions later still changes the hash.
    """
    return describe_folder(folder, check_images=False, warn=warn)["hash"]


def describe_folder(folder: str | os.PathLike, check_images: bool = True, warn: bool = True) -> dict:
    """One pass over a class folder: its content hash, and (with `check_images`) how many of its
    top-level files are images that `open_rgb` loads and which files are skipped.

    An unreadable file is skipped with a warning; an unlistable folder raises PermissionError.
    """
    import io

    folder = Path(folder)
    if folder.is_dir():
        _list_class_folder(folder)  # a folder we may not list: one clear line, not an empty hash
    bad = _bad_image_errors()
    h = hashlib.sha256()
    images, skipped = 0, []
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel).encode())
        h.update(b"\0")
        try:
            data = p.read_bytes()
        except OSError as exc:
            try:
                size = p.stat().st_size
            except OSError:
                size = -1
            h.update(hashlib.sha256(f"unreadable file of {size} bytes".encode()).digest())
            if warn:
                log.warning("skipping %s: %s", p, _skip_reason(p, exc))
            if check_images and len(rel.parts) == 1:
                skipped.append(str(rel))
            continue
        h.update(hashlib.sha256(data).digest())
        if check_images and len(rel.parts) == 1:
            try:
                open_rgb(io.BytesIO(data))  # decoded, as the training will: truncated files count as skipped
                images += 1
            except bad:
                skipped.append(str(rel))
    return {"hash": h.hexdigest()[:16], "images": images, "skipped": skipped}
